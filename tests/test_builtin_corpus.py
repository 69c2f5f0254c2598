"""The built-in corpus (Python's own documentation): built offline, English, deduplicated, deterministic."""
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from fastbert.data import builtin, builtin_corpus_path, load_prepared, prepare_corpus
from fastbert.data.builtin import module_paragraphs, prose_paragraphs

MODULES_WITH_SIDE_EFFECTS = ("antigravity", "this", "turtle", "tkinter", "idlelib.idle")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return builtin_corpus_path(tmp_path_factory.mktemp("cache"))


def documents_of(path):
    return [block.split("\n") for block in path.read_text(encoding="utf-8").strip("\n").split("\n\n")]


def test_built_once_in_bert_format(corpus_file, monkeypatch):
    assert corpus_file.name == builtin.builtin_corpus_file_name()
    size = corpus_file.stat().st_size
    # Python 3.11's docs give about 2.4 MB of prose; other versions differ somewhat.
    assert 1_500_000 < size < 10_000_000, size
    documents = documents_of(corpus_file)
    assert len(documents) > 300  # topics + modules
    for sentences in documents:
        assert sentences and all(sentence and sentence == sentence.strip() for sentence in sentences)

    monkeypatch.setattr(builtin, "builtin_documents", lambda: pytest.fail("the cached corpus was built again"))
    stamp = corpus_file.stat().st_mtime_ns
    assert builtin_corpus_path(corpus_file.parent) == corpus_file and corpus_file.stat().st_mtime_ns == stamp


def test_it_is_english_prose(corpus_file):
    text = corpus_file.read_text(encoding="utf-8")
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    assert [word for word, _ in words.most_common(1)] == ["the"]
    assert all(words[word] > 1000 for word in ("is", "of", "and", "to", "a"))
    assert sum(char.isascii() for char in text) > 0.99 * len(text)
    lines = [line for line in text.split("\n") if line]
    assert not any(line.startswith((">>>", "...")) for line in lines)  # no doctest sessions
    assert sum(len(line.split()) >= 4 for line in lines) > 0.8 * len(lines)
    # deduplicated paragraphs leave few repeated sentences
    repeated = sum(count - 1 for count in Counter(lines).values())
    assert repeated < 0.05 * len(lines)


def test_paragraphs_are_kept_only_once(monkeypatch):
    shared = "This paragraph appears in two modules of the library."
    monkeypatch.setattr(builtin, "_raw_documents", lambda: iter([
        [shared, "The first module has one more paragraph."],
        [f"  {shared}  ", "The second module adds its own words."],
        [shared],
    ]))
    assert list(builtin.builtin_documents()) == [
        [shared, "The first module has one more paragraph."],
        ["The second module adds its own words."],
    ]


def test_prose_filter_and_module_extraction(tmp_path):
    assert prose_paragraphs("Return the sum of two numbers.\n\n>>> add(1, 2)\n3\n\n    indented code\n\nok") == \
        ["Return the sum of two numbers."]
    assert prose_paragraphs("Heading of a section\n====================\n\nA wrapped\nparagraph of words.") == \
        ["Heading of a section", "A wrapped paragraph of words."]
    source = textwrap.dedent('''\
        """The module docstring says what this module is for."""
        # A comment block that explains
        # why the helper exists at all.
        TEMPLATE = """
        # not a comment, this line is inside a string literal
        """

        class Helper:
            """The class docstring comes after the module's."""

            def run(self):
                """The method docstring follows in source order."""
                return 1  # a trailing comment is code, not prose
        ''')
    (tmp_path / "example.py").write_text(source)
    assert module_paragraphs(tmp_path / "example.py") == [
        "The module docstring says what this module is for.",
        "The class docstring comes after the module's.",
        "The method docstring follows in source order.",
        "A comment block that explains why the helper exists at all.",
    ]
    (tmp_path / "broken.py").write_text("print 'python 2'\n")
    assert module_paragraphs(tmp_path / "broken.py") == []


@pytest.mark.slow
def test_deterministic_across_processes_and_imports_nothing(corpus_file, tmp_path):
    # Another process, another hash seed: the same bytes; and no standard-library module was imported.
    script = (
        "import sys\n"
        "from fastbert.data.builtin import builtin_corpus_path\n"
        f"path = builtin_corpus_path({str(tmp_path)!r})\n"
        f"print(path, [m for m in {MODULES_WITH_SIDE_EFFECTS!r} if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    path, imported = result.stdout.rsplit(" ", 1)
    assert imported.strip() == "[]"
    assert open(path, "rb").read() == corpus_file.read_bytes()


def test_prepare_on_builtin_decodes_back(corpus_file, tmp_path):
    data = prepare_corpus("builtin", tmp_path / "data", vocab_size=1000, cache_dir=corpus_file.parent)
    documents = documents_of(corpus_file)
    assert data.num_documents == len(documents)
    assert data.num_sentences == sum(map(len, documents))
    assert load_prepared(tmp_path / "data").num_tokens == data.num_tokens > 300_000
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(data.data_dir))
    store = data.token_store()
    for d in (0, len(documents) // 2, len(documents) - 1):
        stored = [sentence.tolist() for sentence in store.document(d)]
        assert stored == hf(documents[d], add_special_tokens=False)["input_ids"]
    again = prepare_corpus("builtin", tmp_path / "data", vocab_size=1000, cache_dir=corpus_file.parent)
    assert again.reused
