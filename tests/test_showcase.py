"""The end-of-run showcase (masked held-out words + curves) and the size of the held-out eval."""
import json
import re
import sys

import numpy as np
import pytest

from fastbert.data import load_prepared
from fastbert.data.pairs import eval_documents
from fastbert.pretrain import showcase
from fastbert.pretrain.trainer import pretrain

from tests.test_pretrain import config, write_corpus


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from fastbert.data import prepare_corpus

    root = tmp_path_factory.mktemp("showcase-data")
    prepare_corpus([write_corpus(root / "corpus.txt")], root / "data", vocab_size=200)
    return root / "data"

EXAMPLE = re.compile(r"^(\d+)\. (.*)\n   ([✓~ ]) true: (\S+)\s+top-3: (.*)$", re.MULTILINE)
GUESS = re.compile(r"(\S+) \((\d+)%\)")


def held_out_sentences(data_dir, fraction):
    data = load_prepared(data_dir)
    vocab = (data_dir / "vocab.txt").read_text().splitlines()
    store = data.token_store()
    return {showcase._detokenize([vocab[t] for t in sentence])
            for d in eval_documents(data.num_documents, fraction).tolist() for sentence in store.document(d)}


def test_run_ends_with_masked_words_and_curves(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    result = pretrain(config(out, data_dir, max_steps=30, eval_every=10, eval_batches=4, lr=1e-2))
    text = (out / showcase.SHOWCASE_FILE).read_text()
    assert text in capsys.readouterr().err  # printed as well as saved
    examples = EXAMPLE.findall(text)
    assert [int(e[0]) for e in examples] == list(range(1, showcase.SHOWN + 1))
    held_out = held_out_sentences(data_dir, 0.05)
    assert len({sentence.replace("[MASK]", true_word) for _, sentence, _, true_word, _ in examples}) == showcase.SHOWN
    for _, sentence, mark, true_word, guesses in examples:
        assert sentence.count("[MASK]") == 1
        # The masked word is the true word of a sentence of a held-out document.
        assert sentence.replace("[MASK]", true_word) in held_out
        top3 = GUESS.findall(guesses)
        assert len(top3) == 3 and len({w for w, _ in top3}) == 3
        probabilities = [int(p) for _, p in top3]
        assert probabilities == sorted(probabilities, reverse=True)
        assert (mark == "✓") == (top3[0][0] == true_word)
        assert (mark == "~") == (true_word in [w for w, _ in top3[1:]])
    # Template text: after 30 steps the model guesses some words (the untrained one guesses none).
    assert any(mark == "✓" for _, _, mark, _, _ in examples)
    png = out / showcase.CURVES_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # The training rows carry the accuracies the curves plot; the eval rows their standard errors.
    train, evals = showcase.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(0 <= r["mlm_accuracy_train"] <= 1 and 0 <= r["nsp_accuracy_train"] <= 1 for r in train)
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert result.last_eval == {k: v for k, v in evals[-1].items() if k != "step"}


SUMMARY = re.compile(r"^whole words masked in (\d+) held-out sentences: first guess right ([\d.]+)% \((\d+)\), "
                     r"among the top 3 ([\d.]+)% \((\d+)\)$", re.MULTILINE)


def test_the_whole_word_accuracy_counts_the_scored_sentences_and_the_shown_are_the_first(tmp_path, data_dir):
    from transformers import BertForPreTraining as HFBertForPreTraining

    out = tmp_path / "run"
    pretrain(config(out, data_dir, max_steps=30, eval_every=30, eval_batches=2, lr=1e-2))
    model = HFBertForPreTraining.from_pretrained(out / "final").eval()
    data = load_prepared(data_dir)
    vocab = (data_dir / "vocab.txt").read_text().splitlines()
    held_out = eval_documents(data.num_documents, 0.05)
    scored = 16  # fewer than the 24 held-out sentences here: the draw stops at it
    text = showcase.write_showcase(out, model, data, held_out, max_seq_len=64, seed=0,
                                   scored=scored)
    # The figure, recounted from a separate draw of the same sentences by transformers' own model class.
    examples = showcase.masked_word_examples(model, data, held_out, vocab, count=scored, max_seq_len=64, seed=0)
    first = sum(e.guesses[0][0] == e.true_word for e in examples)
    top3 = sum(e.true_word in [w for w, _ in e.guesses] for e in examples)
    assert len(examples) == scored and 0 < first <= top3 < scored  # a trained model: some right, not all
    words, first_pct, first_n, top3_pct, top3_n = SUMMARY.search(text).groups()
    assert (int(words), int(first_n), int(top3_n)) == (scored, first, top3)
    assert float(first_pct) == pytest.approx(100 * first / scored, abs=0.051)
    assert float(top3_pct) == pytest.approx(100 * top3 / scored, abs=0.051)
    shown = EXAMPLE.findall(text)
    assert len(shown) == showcase.SHOWN
    assert [(sentence, true_word) for _, sentence, _, true_word, _ in shown] == \
        [(e.text, e.true_word) for e in examples[:showcase.SHOWN]]


def test_the_whole_word_accuracy_of_no_sentences_says_so():
    assert "none found" in showcase.WholeWordAccuracy.of([]).summary()


def test_eval_draws_the_asked_pairs_from_held_out_documents_only(tmp_path, data_dir):
    # 3 held-out documents hold fewer than 12 x 8 pairs of 64 tokens: further passes draw new ones.
    result = pretrain(config(tmp_path, data_dir, max_steps=1, eval_every=1, eval_batches=12))
    last = result.last_eval
    assert last["eval_pairs"] == 12 * 8
    assert last["nsp_accuracy_se"] == pytest.approx(np.sqrt(last["nsp_accuracy"] * (1 - last["nsp_accuracy"]) / 96))
    assert last["mlm_accuracy_se"] < last["nsp_accuracy_se"]  # ~15% of ~60 tokens per pair are masked


def test_read_metrics_keeps_the_last_run_after_a_resume(tmp_path):
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "mlm_accuracy": 0.1},
            {"step": 3, "loss": 3.5}, {"resumed_from": 2}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.0},
            {"step": 4, "mlm_accuracy": 0.3}, {"step": 3, "loss": 9.0}]  # the last: a resume without its marker
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train, evals = showcase.read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 5.0), (2, 4.0), (3, 9.0)]
    assert [(r["step"], r["mlm_accuracy"]) for r in evals] == [(2, 0.1), (4, 0.3)]


def test_no_matplotlib_means_no_png_and_a_note(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert showcase.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_bad_arguments(data_dir):
    data = load_prepared(data_dir)
    vocab = (data_dir / "vocab.txt").read_text().splitlines()
    with pytest.raises(ValueError, match="count"):
        showcase.masked_word_examples(None, data, [0], vocab, count=0)
    with pytest.raises(ValueError, match="held-out documents"):
        showcase.masked_word_examples(None, data, [], vocab)
