"""End-to-end pre-training on the CPU: loss falls, exact resume, atomic/corrupt checkpoints, DDP, export."""
import json
import os
import random
import re
import socket
from types import SimpleNamespace

import pytest
import torch

from fastbert.cli import main as cli_main
from fastbert.pretrain import checkpoint_files as ckpt
from fastbert.pretrain.config import PretrainConfig
from fastbert.pretrain.trainer import pretrain

NOUNS = ["cat", "dog", "bird", "horse", "child", "teacher", "farmer", "river", "garden", "city"]
VERBS = ["sees", "follows", "likes", "finds", "watches", "helps"]
ADJECTIVES = ["small", "old", "quiet", "happy", "green", "tall"]


def write_corpus(path, documents=60, sentences=8, seed=0):
    """Template English: learnable (agreement of articles, nouns after adjectives), varied enough for NSP."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        topic = rng.choice(NOUNS)
        for _ in range(sentences):
            lines.append(f"the {rng.choice(ADJECTIVES)} {topic} {rng.choice(VERBS)} a {rng.choice(NOUNS)} "
                         f"near the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} .")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from fastbert.data import prepare_corpus

    root = tmp_path_factory.mktemp("pretrain-data")
    prepare_corpus([write_corpus(root / "corpus.txt")], root / "data", vocab_size=200)
    return root / "data"


def config(out, data_dir, **overrides):
    # BERT's objective with dropout on (the resume tests must follow the dropout stream) and LAMB, as
    # these tests were tuned with; tests/test_pretrain_objectives.py covers the default recipe.
    options = dict(model="bert-tiny", data=str(data_dir), out=str(out), batch_size=8, seq_len=64, max_steps=8,
                   log_every=1, save_every=1000, eval_every=1000, eval_batches=2, num_workers=0, progress=False,
                   lr=3e-3, warmup=0.1, seed=3, objective="mlm+nsp", dropout=0.1, optimizer="lamb")
    options.update(overrides)
    return PretrainConfig(**options)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_logs_and_exports(tmp_path, data_dir):
    result = pretrain(config(tmp_path, data_dir, max_steps=40, eval_every=40, lr=1e-2))
    losses = result.losses
    assert len(losses) == 40 and all(map(lambda x: x == x, losses))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    records = read_metrics(tmp_path)
    step_records = [r for r in records if "loss" in r]
    assert {"step", "loss", "mlm_loss", "nsp_loss", "lr", "tokens_per_s", "grad_norm"} <= set(step_records[0])
    assert [r["step"] for r in step_records] == list(range(1, 41))
    assert all(r["tokens_per_s"] > 0 for r in step_records)
    evals = [r for r in records if "mlm_accuracy" in r]
    assert evals and 0.0 <= evals[-1]["mlm_accuracy"] <= 1.0 and 0.0 <= evals[-1]["nsp_accuracy"] <= 1.0
    assert evals[-1]["mlm_accuracy"] > 0.1  # template text: far above chance (1/200) after 40 steps
    assert 0.0 <= evals[-1]["mlm_accuracy_at_mask"] <= 1.0
    final = result.final_dir
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert [p.name for _, p in ckpt.step_dirs(tmp_path / "checkpoints")] == ["step_40"]


def test_exported_model_loads_in_transformers(tmp_path, data_dir):
    transformers = pytest.importorskip("transformers")
    import fastbert

    result = pretrain(config(tmp_path, data_dir, max_steps=3))
    tokenizer = transformers.BertTokenizerFast.from_pretrained(result.final_dir)
    hf = transformers.BertForPreTraining.from_pretrained(result.final_dir, attn_implementation="eager").eval()
    ours = fastbert.BertForPreTraining.from_pretrained(result.final_dir, strict=True)
    batch = tokenizer(["the old cat sees a dog near the river .", "a tall teacher ."], padding=True,
                      return_tensors="pt")
    import tokenizers  # final/tokenizer.json itself adds [CLS]/[SEP] (and segment ids) as BERT does

    saved = tokenizers.Tokenizer.from_file(str(result.final_dir / "tokenizer.json")).encode("the old cat", "a dog")
    assert (saved.ids, saved.type_ids) == tuple(tokenizer("the old cat", "a dog")[k] for k in ("input_ids",
                                                                                          "token_type_ids"))
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        b = hf(**batch)
    real = batch["attention_mask"].bool()
    assert (a.prediction_logits - b.prediction_logits)[real].abs().max() < 1e-4
    assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() < 1e-4


def test_resume_is_exact(tmp_path, data_dir):
    straight = pretrain(config(tmp_path / "straight", data_dir))
    # Paused half-way (as an interrupt would), then resumed with DataLoader workers this time:
    # neither the pause nor the worker count may change a single loss.
    first = pretrain(config(tmp_path / "paused", data_dir, stop_at=4))
    assert first.steps_done == 4 and not first.interrupted and first.final_dir is None
    second = pretrain(config(tmp_path / "paused", data_dir, resume=True, num_workers=2))
    assert first.losses + second.losses == straight.losses
    assert second.param_checksum == straight.param_checksum


def test_save_killed_midway_keeps_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    real_save = torch.save

    def dies_on_step_4(obj, path, *args, **kwargs):
        if str(path).endswith(ckpt.TRAINER_STATE) and obj.get("step") == 4:
            raise KeyboardInterrupt  # the process is killed while writing
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_on_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(tmp_path, data_dir, max_steps=6, save_every=2))
    monkeypatch.undo()
    steps = [s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints")]
    assert steps == [2]
    loaded = ckpt.latest_valid(tmp_path / "checkpoints", warn=print)
    assert loaded.step == 2
    result = pretrain(config(tmp_path, data_dir, max_steps=6, save_every=2, resume=True))
    assert result.steps_done == 6
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the half-written save was cleaned up


def test_corrupt_newest_checkpoint_is_reported_and_skipped(tmp_path, data_dir, capsys):
    pretrain(config(tmp_path, data_dir, max_steps=4, save_every=2))
    (tmp_path / "checkpoints" / "step_4" / ckpt.TRAINER_STATE).write_bytes(b"garbage")
    result = pretrain(config(tmp_path, data_dir, max_steps=6, save_every=2, resume=True))
    err = capsys.readouterr().err
    assert "step_4" in err and "corrupt" in err and "resumed from" in err and "step_2" in err
    assert result.steps_done == 6

    for _, path in ckpt.step_dirs(tmp_path / "checkpoints"):
        (path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="all are corrupt"):
        pretrain(config(tmp_path, data_dir, max_steps=8, resume=True))


def test_refuses_unsafe_or_bad_runs(tmp_path, data_dir):
    pretrain(config(tmp_path, data_dir, max_steps=2))
    with pytest.raises(ValueError, match="--resume"):
        pretrain(config(tmp_path, data_dir, max_steps=2))
    with pytest.raises(ValueError, match="different model config"):
        pretrain(config(tmp_path, data_dir, max_steps=4, resume=True, model="bert-mini"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pretrain(config(tmp_path / "b", data_dir, seq_len=1024))
    with pytest.raises(ValueError, match="--stop-at"):
        pretrain(config(tmp_path / "d", data_dir, stop_at=99))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli_main(["pretrain", "--corpus", str(empty), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2


@pytest.mark.parametrize("warmup", ["nan", "inf", "-0.5"])
def test_bad_warmup_is_a_clear_error(tmp_path, data_dir, capsys, warmup):
    code = cli_main(["pretrain", "--model", "bert-tiny", "--warmup", warmup, "--data", str(data_dir), "--out",
                     str(tmp_path / "o"), "--seq-len", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"--warmup must be a (finite )?number >= 0", err) and "Traceback" not in err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, world_size, port, out, data_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = pretrain(config(out, data_dir, max_steps=3, device="cpu"))
    (result_dir / f"rank{rank}.json").write_text(json.dumps({"checksum": result.param_checksum,
                                                              "losses": result.losses}))


def test_two_process_ddp_ranks_agree(tmp_path, data_dir):
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(_ddp_rank, args=(2, _free_port(), tmp_path / "run", data_dir, results), nprocs=2)
    r0, r1 = (json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["checksum"] == r1["checksum"]  # DDP kept the replicas identical
    assert r0["losses"] != r1["losses"]  # each rank trained on its own slice of the data
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_packed_and_whole_word_runs(tmp_path, data_dir):
    packed = pretrain(config(tmp_path / "packed", data_dir, max_steps=12, packing=True, lr=1e-2))
    assert packed.steps_done == 12 and packed.losses[-1] < packed.losses[0]
    records = [r for r in read_metrics(tmp_path / "packed") if "tokens_per_s" in r]
    assert all(r["tokens_per_s"] > 0 for r in records)
    whole = pretrain(config(tmp_path / "wwm", data_dir, max_steps=3, whole_word_mask=True))
    assert whole.steps_done == 3 and all(x == x for x in whole.losses)


def test_pretrained_output_fine_tunes(tmp_path, data_dir):
    from fastbert.finetune import FinetuneConfig, run_finetune

    final = pretrain(config(tmp_path / "pre", data_dir, max_steps=3)).final_dir
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            words = rng.choices(NOUNS[1:] + ADJECTIVES, k=rng.randint(3, 7))
            yes = rng.random() < 0.5
            if yes:
                words.insert(rng.randrange(len(words) + 1), "cat")
            out.append(json.dumps({"text": " ".join(words), "label": "yes" if yes else "no"}))
        return "\n".join(out) + "\n"

    (tmp_path / "train.jsonl").write_text(rows(320))
    (tmp_path / "eval.jsonl").write_text(rows(100))
    result = run_finetune(FinetuneConfig(model=str(final), train=str(tmp_path / "train.jsonl"),
                                         eval=str(tmp_path / "eval.jsonl"), output=str(tmp_path / "ft"), epochs=3,
                                         lr=3e-3, batch_size=16, seq_len=24, device="cpu"))
    assert result.eval_accuracy[-1] >= 0.85, result.eval_accuracy


def test_relative_output_dir_and_rerun_resumes_finished_run(tmp_path, data_dir, monkeypatch, capsys):
    # As the README's `make pretrain` runs it: a relative --out, and running it twice just re-exports.
    monkeypatch.chdir(tmp_path)
    argv = ["pretrain", "--corpus", str(data_dir.parent / "corpus.txt"), "--out", "runs/x", "--resume",
            "--max-steps", "2", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "200", "--num-workers", "0",
            "--no-progress", "--eval-batches", "1"]
    assert cli_main(argv) == 0
    assert (tmp_path / "runs/x/final/vocab.txt").is_file()
    assert cli_main(argv) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "runs/x/checkpoints")] == [2]


def test_mfu_is_logged_against_the_peak(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("FASTBERT_PEAK_TFLOPS", "0.5")  # a GPU's measured ceiling; here a stand-in
    pretrain(config(tmp_path, data_dir, max_steps=2))
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert all(0 < r["mfu"] < 1 for r in records), records


class _CopyOrOracle(torch.nn.Module):
    """A stand-in model: at every MLM target it guesses its input token ("copy") or the label ("oracle")."""

    def __init__(self, oracle: bool):
        super().__init__()
        self.oracle = oracle

    def forward(self, input_ids, labels, next_sentence_label, **_):
        vocab = 16
        guesses = (labels if self.oracle else input_ids)[labels != -100]
        return SimpleNamespace(prediction_logits=torch.nn.functional.one_hot(guesses, vocab).float(),
                               seq_relationship_logits=torch.nn.functional.one_hot(next_sentence_label, 2).float(),
                               loss=torch.zeros(()))


def test_eval_separates_accuracy_at_mask_inputs_from_copyable_targets():
    from fastbert.pretrain.objective import OBJECTIVES

    evaluate = OBJECTIVES["mlm+nsp"].evaluate

    mask = 3
    # Row 0: targets at positions 1 ([MASK]), 2 (kept: input == label) and 3 (random replacement).
    # Row 1: two [MASK] targets, one kept.
    input_ids = torch.tensor([[5, mask, 7, 9, 6], [5, mask, mask, 8, 6]])
    labels = torch.tensor([[-100, 10, 7, 11, -100], [-100, 12, 13, 8, -100]])
    batch = {"input_ids": input_ids, "labels": labels, "next_sentence_label": torch.tensor([0, 1])}
    copy = evaluate(_CopyOrOracle(oracle=False), [batch], torch.device("cpu"), None, mask_token_id=mask)
    # Copying the input is right at the 2 kept targets of 6, and at none of the 3 [MASK] inputs.
    assert copy["mlm_accuracy"] == pytest.approx(2 / 6) and copy["mlm_accuracy_at_mask"] == 0.0
    oracle = evaluate(_CopyOrOracle(oracle=True), [batch], torch.device("cpu"), None, mask_token_id=mask)
    assert oracle["mlm_accuracy"] == 1.0 and oracle["mlm_accuracy_at_mask"] == 1.0
    assert "mlm_accuracy_at_mask" not in evaluate(_CopyOrOracle(oracle=True), [batch], torch.device("cpu"), None)
