"""fastbert.training: the update step both jobs use (scaler, clip, optimizer, schedule, divergence rule)
and the atomic folder export."""
import errno
import io
import os

import pytest
import torch
from torch import nn

from fastbert.device import resolve_precision
from fastbert.training.export import check_replaceable, export_folder
from fastbert.training.schedule import build_scheduler
from fastbert.training.update import Updater

CPU = torch.device("cpu")


def make(precision="fp32", clip=1.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, warmup=2, max_steps=6, schedule="linear")
    return model, Updater(model.parameters(), optimizer, scheduler, resolve_precision(precision, CPU), clip=clip)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def test_fp32_update_is_the_plain_loop():
    """A disabled scaler changes nothing: the same weights as backward / clip / step / schedule by hand."""
    model, updater = make()
    reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, warmup=2, max_steps=6, schedule="linear")
    for x, y in batches(6):
        loss = nn.functional.cross_entropy(model(x), y)
        updater.backward(loss)
        norm = updater.update(loss.detach())
        expected = nn.functional.cross_entropy(reference(x), y)
        expected.backward()
        torch.testing.assert_close(norm, nn.utils.clip_grad_norm_(reference.parameters(), 1.0), rtol=0, atol=0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    assert updater.step == 6 and not updater.scaler.is_enabled() and updater.loss_scale() is None
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)
    updater.check_divergence()
    updater.check_saveable()


def test_a_nan_loss_is_divergence_from_its_step():
    model, updater = make()
    for step, (x, y) in enumerate(batches(4), start=1):
        loss = nn.functional.cross_entropy(model(x), y) * (float("nan") if step == 3 else 1.0)
        updater.backward(loss)
        updater.update(loss.detach())
    assert int(updater.first_bad_step) == 3 and int(updater.skipped_steps) == 0
    with pytest.raises(FloatingPointError, match="NaN or infinite from step 3 on"):
        updater.check_divergence()
    with pytest.raises(FloatingPointError, match="diverged"):
        updater.check_saveable()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the skipped first step
def test_fp16_overflow_is_a_skipped_step_not_divergence():
    model, updater = make("fp16")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    loss = nn.functional.cross_entropy(model(x), y) * 1e36  # finite, but inf once scaled by 2**16: a skip
    updater.backward(loss)
    updater.update(loss.detach())
    assert int(updater.skipped_steps) == 1 and int(updater.first_bad_step) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    updater.check_divergence(updater.loss_scale())  # a skip halves the scale; it has not collapsed
    with pytest.raises(FloatingPointError, match="loss scale fell"):
        updater.check_divergence(2.0**-20)


def test_nan_weights_are_never_saveable():
    model, updater = make()
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="weights hold NaN or inf"):
        updater.check_saveable()


def test_state_round_trip_continues_identically():
    model, updater = make("fp16")
    data = batches(6)
    for x, y in data[:3]:
        loss = nn.functional.cross_entropy(model(x), y)
        updater.backward(loss)
        updater.update(loss.detach())
    buffer = io.BytesIO()  # as a checkpoint holds it: a copy, read back with weights_only
    torch.save(updater.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["scaler"]["scale"] == updater.loss_scale()
    copy, resumed = make("fp16", seed=5)
    copy.load_state_dict(model.state_dict())
    resumed.load_state_dict(state, step=3)
    for x, y in data[3:]:
        for m, u in ((model, updater), (copy, resumed)):
            loss = nn.functional.cross_entropy(m(x), y)
            u.backward(loss)
            u.update(loss.detach())
    assert resumed.step == 6 and all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
    assert make("fp32")[1].state_dict()["scaler"] is None  # as checkpoints without loss scaling hold it


# --- the atomic export --------------------------------------------------------------------------------
def write_files(contents):
    def write(folder):
        for name, text in contents.items():
            (folder / name).write_text(text)
    return write


def test_export_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "out"
    export_folder(target, write_files({"a.txt": "1", "b.txt": "1"}))
    export_folder(target, write_files({"a.txt": "2"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left beside it
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "2"}
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failed_export_leaves_the_old_output_intact(tmp_path, failure):
    target = tmp_path / "out"
    export_folder(target, write_files({"model.bin": "old", "vocab.txt": "old"}))

    def fails_midway(folder):
        (folder / "model.bin").write_text("new")
        raise failure

    with pytest.raises(type(failure)) as raised:
        export_folder(target, fails_midway)
    if isinstance(failure, OSError):
        assert "No space left on device" in str(raised.value) and raised.value.filename == str(target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.bin": "old", "vocab.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_replaceable_refuses_to_lose_anything(tmp_path):
    check_replaceable(tmp_path / "absent", ["a"])
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", ["a"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a").write_text("x")
    check_replaceable(tmp_path / "old", ["a", "b"])  # a previous export of the same files
    (tmp_path / "old" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt, which the export would delete"):
        check_replaceable(tmp_path / "old", ["a", "b"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_replaceable(tmp_path / "file", ["a"])
