"""Every way a pre-training run can stop or be fed bad files: crafted pickles, corrupt and wrong-shape
checkpoints, --keep after a fallback, SIGINT/SIGTERM, two runs on one folder, write failures, divergence,
another vocabulary, fp16 + GradScaler on the CPU."""
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastbert import backend
from fastbert.cli import main as cli_main
from fastbert.modeling import BertForPreTraining
from fastbert.pretrain import checkpoint_files as ckpt
from fastbert._folder_lock import FolderLockedError
from fastbert.pretrain.trainer import pretrain
from fastbert.training import update
from tests.test_pretrain import config, data_dir, read_metrics  # noqa: F401  (data_dir is a fixture)


def step_rows(out):
    return [r for r in read_metrics(out) if "loss" in r]


class _TouchesAFile:
    """Unpickling this calls Path.touch(marker): code run by merely loading a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, data_dir):  # noqa: F811
    """A run with checkpoints at steps 2 and 4 (copied per test before damaging one)."""
    out = tmp_path_factory.mktemp("two-checkpoints") / "run"
    pretrain(config(out, data_dir, max_steps=4, save_every=2))
    return out


def fresh_copy(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    return out


def resume(out, data_dir, **overrides):  # noqa: F811
    return pretrain(config(out, data_dir, max_steps=6, save_every=2, resume=True, **overrides))


# --- item 1: a checkpoint runs no code ---------------------------------------------------------------
@pytest.mark.parametrize("name", [ckpt.TRAINER_STATE, ckpt.rng_file(0)])
def test_crafted_pickle_in_a_checkpoint_runs_no_code(tmp_path, data_dir, two_checkpoints, capsys, name):  # noqa: F811
    out = fresh_copy(two_checkpoints, tmp_path)
    newest = out / "checkpoints" / "step_4"
    marker = tmp_path / "code-ran"
    torch.save({"step": 4, "optimizer": {}, "world_size": 1, "payload": _TouchesAFile(marker)}, newest / name)
    ckpt.write_manifest(newest, 4)  # an attacker can fix the checksums too: loading itself must be safe
    result = resume(out, data_dir)
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "step_4" in err and "unsafe" in err
    assert "resumed from" in err and "step_2" in err and result.steps_done == 6
    assert (out / "checkpoints" / "step_4.corrupt" / name).is_file()  # kept aside for inspection


# --- item 3: a corrupt checkpoint never counts for --keep ---------------------------------------------
def test_keep_1_after_a_fallback_keeps_the_good_checkpoint(tmp_path, data_dir):  # noqa: F811
    out = tmp_path / "run"
    pretrain(config(out, data_dir, max_steps=8, save_every=2, stop_at=6))
    (out / "checkpoints" / "step_6" / "model.safetensors").write_bytes(b"junk")
    # Falls back to step 4, then stops at 5: the corrupt step_6 must not push step_5 out of --keep 1.
    pretrain(config(out, data_dir, max_steps=8, save_every=2, keep=1, stop_at=5, resume=True))
    assert [s for s, _ in ckpt.step_dirs(out / "checkpoints")] == [5]
    assert (out / "checkpoints" / "step_6.corrupt").is_dir()
    result = pretrain(config(out, data_dir, max_steps=8, save_every=2, keep=1, resume=True))
    assert result.steps_done == 8 and [s for s, _ in ckpt.step_dirs(out / "checkpoints")] == [8]


# --- item 4: Ctrl-C and SIGTERM resume exactly ---------------------------------------------------------
@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["sigint", "sigterm", "sigint-twice"])
def test_signal_mid_step_then_resume_equals_a_straight_run(tmp_path, data_dir, monkeypatch, signals):  # noqa: F811
    straight = pretrain(config(tmp_path / "straight", data_dir))
    real_forward = BertForPreTraining.forward
    calls = {"training": 0}

    def forward_signalled_in_step_5(self, *args, **kwargs):
        if self.training:
            calls["training"] += 1
            if calls["training"] == 5:
                out = real_forward(self, *args, **kwargs)  # dropout has drawn: the worst moment
                for sig in signals:
                    os.kill(os.getpid(), sig)
                return out
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(BertForPreTraining, "forward", forward_signalled_in_step_5)
    first = pretrain(config(tmp_path / "run", data_dir))
    monkeypatch.undo()
    assert first.interrupted and first.signal == signal.Signals(signals[0]).name and first.final_dir is None
    # One signal: step 5 finishes first. Two: stop at once, checkpointing the state from before step 5.
    assert first.steps_done == (5 if len(signals) == 1 else 4)
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "run" / "checkpoints")] == [first.steps_done]
    second = pretrain(config(tmp_path / "run", data_dir, resume=True))
    assert first.losses[:first.steps_done] + second.losses == straight.losses
    assert second.param_checksum == straight.param_checksum



# --- round two, item 11: signals during set-up and during the exit save ---------------------------------
def test_sigterm_during_set_up_stops_at_once(tmp_path, data_dir, monkeypatch, capsys):  # noqa: F811
    """Set-up (data preparation on a real corpus: hours) has nothing to save: a signal stops it there."""
    import fastbert.pretrain.trainer as trainer

    real, reached = trainer.eval_batches, []

    def signalled_in_set_up(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # long set-up work: a deferred signal would let it finish
        reached.append("the rest of set-up")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "eval_batches", signalled_in_set_up)
    argv = ["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps", "4",
            "--batch-size", "4", "--seq-len", "32", "--num-workers", "0", "--no-progress"]
    assert cli_main(argv) == 143
    err = capsys.readouterr().err
    assert "SIGTERM received during set-up" in err and "Traceback" not in err, err
    assert reached == [] and not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was trained
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it


@pytest.mark.parametrize("first_in_step, kept", [(3, [2]), (2, [])], ids=["exit-save", "periodic-save"])
def test_second_sigterm_during_a_save_stops_at_once(tmp_path, data_dir, monkeypatch, first_in_step, kept):  # noqa: F811
    """A first SIGTERM in step 3 (2): the step ends, then the exit (the step-2 periodic) checkpoint is written;
    a second SIGTERM while it is written stops at once: that save is neither finished nor restarted."""
    from fastbert.pretrain.interrupts import StopNow

    real_forward, real_manifest = BertForPreTraining.forward, ckpt.write_manifest
    calls, manifests = {"training": 0}, []

    def forward_signalled(self, *args, **kwargs):
        if self.training:
            calls["training"] += 1
            if calls["training"] == first_in_step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, *args, **kwargs)

    def manifest_signalled_in_the_save_after_the_signal(staging, step):
        manifests.append(step)
        if step == first_in_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_manifest(staging, step)

    monkeypatch.setattr(BertForPreTraining, "forward", forward_signalled)
    monkeypatch.setattr(ckpt, "write_manifest", manifest_signalled_in_the_save_after_the_signal)
    out = tmp_path / "run"
    with pytest.raises(StopNow, match="SIGTERM received again"):
        pretrain(config(out, data_dir, max_steps=6, save_every=2))
    monkeypatch.undo()
    assert manifests == kept + [first_in_step]  # the interrupted save was not restarted
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == [f"step_{s}" for s in kept]  # no staging folder left
    for step in kept:
        assert ckpt.load_trainer_state(root / f"step_{step}")["step"] == step  # the older checkpoint is intact
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

# --- item 5: one run per output folder; SIGTERM from the CLI -------------------------------------------
def test_second_run_on_one_folder_is_refused_naming_the_first(tmp_path, data_dir):  # noqa: F811
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastbert.cli", "pretrain", "--data", str(data_dir), "--out", str(out),
            "--max-steps", "100000", "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
            "--save-every", "100000", "--eval-batches", "0", "--num-workers", "0", "--no-progress",
            "--objective", "mlm+nsp", "--dropout", "0.1", "--optimizer", "lamb"]  # as tests.test_pretrain.config
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and step_rows(out)):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.2)
        with pytest.raises(FolderLockedError, match=f"in use by another run \\(pid {first.pid} "):
            pretrain(config(out, data_dir, resume=True))
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143  # 128 + SIGTERM, after writing a checkpoint
    finally:
        if first.poll() is None:
            first.kill()
    err = first.stderr.read()
    assert "SIGTERM received" in err and "Traceback" not in err
    steps = [r["step"] for r in step_rows(out)]
    assert steps == list(range(1, len(steps) + 1))  # no duplicate rows
    assert [s for s, _ in ckpt.step_dirs(out / "checkpoints")] == [steps[-1]]
    result = pretrain(config(out, data_dir, resume=True, max_steps=steps[-1] + 1))  # the lock is free again
    assert result.steps_done == steps[-1] + 1


# --- item 6: write failures are one line and leave no staging behind ------------------------------------
def test_out_that_is_a_file_is_one_line(tmp_path, data_dir, capsys):  # noqa: F811
    (tmp_path / "file").write_text("x")
    assert cli_main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path, data_dir, capsys):  # noqa: F811
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert cli_main(["pretrain", "--data", str(data_dir), "--out", str(locked / "run"), "--no-progress"]) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err and err.count("\n") == 1


def test_unwritable_folder_is_one_line_even_as_root(tmp_path, data_dir, monkeypatch, capsys):  # noqa: F811
    """The read-only case above cannot fail for root (CI runs as root): the same refusal, raised by
    the OS call that creates the output folder."""
    locked = tmp_path / "ro"
    real_mkdir = os.mkdir

    def refuse_under_locked(path, *args, **kwargs):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse_under_locked)
    assert cli_main(["pretrain", "--data", str(data_dir), "--out", str(locked / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(locked) in err and "Traceback" not in err and err.count("\n") == 1


def test_full_disk_while_saving_is_one_line_and_cleans_up(tmp_path, data_dir, monkeypatch, capsys):  # noqa: F811
    real_save = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if str(path).endswith(ckpt.TRAINER_STATE) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    argv = ["pretrain", "--data", str(data_dir), "--out", str(tmp_path), "--max-steps", "6", "--save-every", "2",
            "--batch-size", "4", "--seq-len", "32", "--num-workers", "0", "--eval-batches", "0", "--no-progress"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "step_4" in err and "checkpoints" in err
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints")] == [2]


# --- item 7: a checkpoint is verified fully before use ---------------------------------------------------
def _truncate(step_dir):
    data = (step_dir / "model.safetensors").read_bytes()
    (step_dir / "model.safetensors").write_bytes(data[: len(data) // 2])


def _zero_100kb(step_dir):
    path = step_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100_000:] = bytes(100_000)  # tensor data only: the header still parses
    path.write_bytes(bytes(data))


def _wrong_shape(step_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(step_dir / "model.safetensors")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    state[name] = state[name][:-1].contiguous()
    save_file(state, step_dir / "model.safetensors", metadata={"format": "pt"})
    ckpt.write_manifest(step_dir, 4)  # consistent checksums: only the shape check can catch it


def _optimizer_of_another_size(step_dir):
    state = torch.load(step_dir / ckpt.TRAINER_STATE, weights_only=True)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3, 5)
    torch.save(state, step_dir / ckpt.TRAINER_STATE)
    ckpt.write_manifest(step_dir, 4)


def _missing_rng(step_dir):
    (step_dir / ckpt.rng_file(0)).unlink()


@pytest.mark.parametrize("damage, message", [
    (_truncate, "bytes"), (_zero_100kb, "checksum"), (_wrong_shape, "has shape"),
    (_optimizer_of_another_size, "optimizer state"), (_missing_rng, "rng_rank0.pt is missing"),
], ids=["truncated", "zeroed-100kb", "wrong-shape", "optimizer-other-size", "missing-rng"])
def test_bad_newest_checkpoint_falls_back(tmp_path, data_dir, two_checkpoints, capsys, damage, message):  # noqa: F811
    out = fresh_copy(two_checkpoints, tmp_path)
    damage(out / "checkpoints" / "step_4")
    result = resume(out, data_dir)
    err = capsys.readouterr().err
    assert "step_4" in err and message in err and "resumed from" in err and "step_2" in err, err
    assert result.steps_done == 6
    rows = read_metrics(out)
    marker = rows.index({"resumed_from": 2})  # readers take the rows after the last marker
    assert [r["step"] for r in rows[marker + 1:] if "loss" in r] == [3, 4, 5, 6]


# --- round two, item 3: a checkpoint is checked by content, not only against its manifest -----------------
def _edit_manifest_entry(value):
    def damage(step_dir):
        manifest = json.loads((step_dir / ckpt.MANIFEST).read_text())
        manifest["files"]["model.safetensors"] = value
        (step_dir / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return damage


def _edit_trainer_state(edit):
    """Change trainer_state.pt, then re-hash: the manifest matches, only the content checks can refuse it."""
    def damage(step_dir):
        state = torch.load(step_dir / ckpt.TRAINER_STATE, weights_only=True)
        edit(state)
        torch.save(state, step_dir / ckpt.TRAINER_STATE)
        ckpt.write_manifest(step_dir, 4)
    return damage


def _edit_rng(edit):
    def damage(step_dir):
        state = torch.load(step_dir / ckpt.rng_file(0), weights_only=True)
        edit(state)
        torch.save(state, step_dir / ckpt.rng_file(0))
        ckpt.write_manifest(step_dir, 4)
    return damage


def _edit_weights(edit):
    def damage(step_dir):
        from safetensors.torch import load_file, save_file

        state = load_file(step_dir / "model.safetensors")
        edit(state)
        save_file(state, step_dir / "model.safetensors", metadata={"format": "pt"})
        ckpt.write_manifest(step_dir, 4)
    return damage


def _first_param_state(state):
    return next(iter(state["optimizer"]["state"].values()))


def _set(mapping_of, key, value):
    def edit(state):
        mapping_of(state)[key] = value
    return edit


def _drop(mapping_of, key):
    def edit(state):
        del mapping_of(state)[key]
    return edit


def _every_float_tensor(edit):
    def each(state):
        for name, tensor in state.items():
            if tensor.is_floating_point():
                state[name] = edit(tensor)
    return each


_WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"


def _nan_in_one_weight(state):
    state[_WEIGHT] = state[_WEIGHT].clone()
    state[_WEIGHT][0, 0] = float("nan")

TAMPERED = {
    "manifest-entry-null": (_edit_manifest_entry(None), "manifest entry for model.safetensors"),
    "manifest-entry-list": (_edit_manifest_entry([1, 2]), "manifest entry for model.safetensors"),
    "optimizer-state-not-a-dict": (_edit_trainer_state(_set(lambda s: s["optimizer"], "state", {0: "x"})),
                                   "optimizer state of parameter 0"),
    "optimizer-without-exp_avg": (_edit_trainer_state(_drop(_first_param_state, "exp_avg")), "exp_avg"),
    "optimizer-step-past-the-checkpoint": (_edit_trainer_state(_set(_first_param_state, "step", torch.tensor(99.0))),
                                           "optimizer state step"),
    "no-scheduler": (_edit_trainer_state(_drop(lambda s: s, "scheduler")), "lacks scheduler"),
    "scheduler-last-epoch-1e9": (_edit_trainer_state(_set(lambda s: s["scheduler"], "last_epoch", 10**9)),
                                 "schedule is at step 1000000000"),
    "step-999": (_edit_trainer_state(_set(lambda s: s, "step", 999)), "says step 999"),
    "step-5": (_edit_trainer_state(_set(lambda s: s, "step", 5)), "says step 5"),
    "numpy-keys-short": (_edit_rng(_set(lambda s: s["numpy"], "keys", torch.zeros(10, dtype=torch.int64))),
                         "numpy keys"),
    "python-state-short": (_edit_rng(_set(lambda s: s["python"], "internal", torch.zeros(5, dtype=torch.int64))),
                           "python state"),
    "torch-rng-float": (_edit_rng(_set(lambda s: s, "torch", torch.zeros(5056, dtype=torch.float32))),
                        "torch state"),
    "weights-int64-zeros": (_edit_weights(_every_float_tensor(lambda t: torch.zeros(t.shape, dtype=torch.int64))),
                            "stored as I64"),
    "weights-fp16": (_edit_weights(_every_float_tensor(lambda t: t.half())), "stored as F16"),
    "weights-nan": (_edit_weights(_nan_in_one_weight), f"{_WEIGHT} holds NaN"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_wrong_content_is_moved_aside_and_an_older_one_used(tmp_path, data_dir, two_checkpoints, capsys, case):  # noqa: F811
    damage, message = TAMPERED[case]
    out = fresh_copy(two_checkpoints, tmp_path)
    damage(out / "checkpoints" / "step_4")
    result = resume(out, data_dir)
    err = capsys.readouterr().err
    assert "step_4" in err and message in err and "resumed from" in err and "step_2" in err, err
    assert "Traceback" not in err
    assert (out / "checkpoints" / "step_4.corrupt").is_dir()
    assert result.steps_done == 6
    rows = read_metrics(out)
    marker = rows.index({"resumed_from": 2})
    assert [r["step"] for r in rows[marker + 1:] if "loss" in r] == [3, 4, 5, 6]


# --- item 8: a diverging run stops -----------------------------------------------------------------------
def test_diverging_run_stops_with_a_message_and_exports_nothing(tmp_path, data_dir, capsys, monkeypatch):  # noqa: F811
    from tests.spies import diverge_from_step

    diverge_from_step(monkeypatch, 3)  # a learning rate that overflows is refused up front: inf gradients
    argv = ["pretrain", "--data", str(data_dir), "--out", str(tmp_path), "--lr", "1e-3", "--max-steps", "20",
            "--log-every", "5", "--save-every", "10", "--batch-size", "4", "--seq-len", "32", "--num-workers", "0",
            "--eval-batches", "0", "--no-progress"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and "NaN or infinite from step" in err and "Traceback" not in err
    assert not (tmp_path / "final").exists() and not ckpt.step_dirs(tmp_path / "checkpoints")
    assert cli_main(argv[:5] + ["--weight-decay", "nan"] + argv[7:]) == 2
    assert "--weight-decay must be" in capsys.readouterr().err


# --- item 10: --resume with another vocabulary --------------------------------------------------------------
def test_resume_with_another_vocabulary_is_refused_naming_both(tmp_path, data_dir, two_checkpoints):  # noqa: F811
    out = fresh_copy(two_checkpoints, tmp_path)
    other = tmp_path / "other-data"
    shutil.copytree(data_dir, other)
    vocab = (other / "vocab.txt").read_text().splitlines()
    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]  # the same size, other ids
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    metadata = json.loads((other / "metadata.json").read_text())
    metadata["vocab_sha256"] = hashlib.sha256("\n".join(vocab).encode()).hexdigest()  # as prepare hashes it
    (other / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="different vocabulary") as err:
        pretrain(config(out, other, max_steps=6, resume=True))
    assert str(data_dir) in str(err.value) and str(other) in str(err.value)


# --- issue 13: the loop's own bookkeeping ---------------------------------------------------------------------
def test_backend_choice_does_not_leak_into_the_environment(tmp_path, data_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    seen = []
    real_forward = BertForPreTraining.forward
    monkeypatch.setattr(BertForPreTraining, "forward",
                        lambda self, *a, **k: seen.append(backend.current()) or real_forward(self, *a, **k))
    pretrain(config(tmp_path, data_dir, max_steps=2, backend="torch"))
    assert seen and set(seen) == {"torch"}
    assert "FASTBERT_BACKEND" not in os.environ and backend.current() == "auto"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # a skipped first step
def test_fp16_on_cpu_counts_every_skip_saves_the_scale_and_resumes_exactly(tmp_path, data_dir, monkeypatch):  # noqa: F811
    init = 2.0**20  # fp16 gradients overflow at first: the scaler skips steps, halving the scale each time
    monkeypatch.setattr(update, "FP16_INIT_SCALE", init)
    scale_reads = []
    real_get_scale = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: scale_reads.append(1) or real_get_scale(self))
    # fp16 matmuls are slow on the CPU: a small batch, few steps.
    fp16 = dict(precision="fp16", device="cpu", max_steps=6, log_every=3, save_every=3, batch_size=4, seq_len=32,
                eval_batches=1)
    straight = pretrain(config(tmp_path / "straight", data_dir, **fp16))
    assert len(scale_reads) <= 4  # log steps and saves only, never every step (a device sync on a GPU)
    rows = step_rows(tmp_path / "straight")
    last = rows[-1]
    # No growth within 2000 steps, so every skip halved the scale: the count must match the scale.
    assert 0 < last["skipped_steps"] == round(math.log2(init / last["loss_scale"])) < 6
    saved = torch.load(tmp_path / "straight" / "checkpoints" / "step_6" / ckpt.TRAINER_STATE, weights_only=True)
    assert saved["scaler"]["scale"] == last["loss_scale"] and saved["skipped_steps"] == last["skipped_steps"]

    first = pretrain(config(tmp_path / "paused", data_dir, stop_at=3, **fp16))
    second = pretrain(config(tmp_path / "paused", data_dir, resume=True, **fp16))
    assert first.losses + second.losses == straight.losses
    assert second.param_checksum == straight.param_checksum
    assert step_rows(tmp_path / "paused")[-1]["skipped_steps"] == last["skipped_steps"]


# --- round two, item 4: a damaged run_config.json is an error naming it -------------------------------------
@pytest.mark.parametrize("text,message", [
    ('{"pretrain": {}}', "has no 'model_config' object"),
    ("[1]", "has no 'model_config' object"),
    ("{bad", "is not valid JSON"),
])
def test_a_damaged_run_config_is_refused_naming_it(tmp_path, data_dir, two_checkpoints, text, message):  # noqa: F811
    out = fresh_copy(two_checkpoints, tmp_path)
    (out / "run_config.json").write_text(text)
    with pytest.raises(ValueError, match=f"{out / 'run_config.json'} {message}"):
        resume(out, data_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]  # nothing lost


# --- round two, item 17: checkpoints/ a symlink loop stops at once ------------------------------------------
def test_a_checkpoints_symlink_loop_stops_before_training(tmp_path, data_dir):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(out / "checkpoints")  # points at itself
    with pytest.raises(ValueError, match="checkpoints is a symbolic link that leads to no folder"):
        resume(out, data_dir)
    assert not (out / "metrics.jsonl").exists()
