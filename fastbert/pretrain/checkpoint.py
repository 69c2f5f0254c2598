"""The one owner of a pre-training run's files on disk besides its logs: ``OUT/checkpoints/`` (save,
find and verify the point to resume from, keep the last K), ``OUT/run_config.json`` (what the run is,
checked on resume) and the final export ``OUT/final/``.

A checkpoint is written by every rank (its RNG state) and rank 0 (the rest) into a hidden folder and
renamed into place once complete; it is used on ``--resume`` only once every file matches its manifest
and every field resuming reads is what this run would have written (types, shapes, dtypes, finite values,
one step number). A newer one that fails is reported
by name and moved aside as ``step_N.corrupt`` (never counted by ``--keep``); an older one is tried.
Nothing diverged is saved: the updater's divergence flags and the weights are checked before each save.
The file format itself is :mod:`fastbert.pretrain.checkpoint_files`'.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from fastbert import weights
from fastbert._atomic import write_errors_as_os_errors
from fastbert.config import BertConfig
from fastbert.pretrain import checkpoint_files as files
from fastbert.pretrain import distributed
from fastbert.pretrain.checkpoint_contents import CheckpointError, ExpectedContents
from fastbert.pretrain.checkpoint_files import LoadedCheckpoint
from fastbert.pretrain.config import PretrainConfig
from fastbert.pretrain.distributed import log
from fastbert.pretrain.rng import load_rng_state, save_rng_state, set_rng_state
from fastbert.training.export import export_folder, remove_stale_staging
from fastbert.training.update import Updater

RUN_CONFIG = "run_config.json"
# In OUT/final beside the model: how it was pre-trained (the objective, the heads it left untrained).
PRETRAINING_RECORD = "pretraining.json"


def _saved_model_config(path: Path) -> dict:
    """The ``model_config`` of a run's ``run_config.json``; a ValueError naming the file when it is not
    what a run writes (hand-edited, truncated, another program's)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or choose another --out") from None
    model_config = saved.get("model_config") if isinstance(saved, dict) else None
    if not isinstance(model_config, dict):
        raise ValueError(f"{path} has no 'model_config' object (not written by `fastbert pretrain`?); restore it "
                         "or choose another --out")
    return model_config


class Checkpointer:
    def __init__(self, config: PretrainConfig, info: distributed.DistInfo, data):
        self.config = config
        self.info = info
        self.data = data
        self.out = Path(config.out)
        self.root = self.out / "checkpoints"
        self.final_dir = self.out / "final"
        self.saved_step = 0  # the step of the newest checkpoint on disk (0: none)

    # --- before the model is built --------------------------------------------------------------------
    def claim(self, model_config: BertConfig) -> None:
        """Tidy the folder (we hold its lock) and check that this run may use it: without --resume it must
        hold no checkpoints; with it, the run it holds must have this model config."""
        if self.root.is_symlink() and not self.root.is_dir():  # a loop, or a link to nothing
            raise ValueError(f"{self.root} is a symbolic link that leads to no folder (a loop?); remove it or "
                             "point it at the checkpoints folder")
        if self.info.is_main:
            files.remove_stale_staging(self.root)  # saves killed midway
            remove_stale_staging(self.final_dir)   # exports killed midway
        if not self.config.resume:
            if files.step_dirs(self.root):
                raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose "
                                 "another --out")
            return
        saved = self.out / RUN_CONFIG
        if saved.is_file():  # resuming into a folder trained with another architecture is a mistake
            previous = _saved_model_config(saved)
            now = model_config.to_dict()
            diffs = [k for k in sorted(set(previous) | set(now))
                     if k != "architectures" and previous.get(k) != now.get(k)]
            if diffs:
                raise ValueError(f"{self.out} holds a run with a different model config ({', '.join(diffs)} differ); "
                                 "use another --out or the same --model")

    # --- resume ---------------------------------------------------------------------------------------
    def find_resume_point(self, model: torch.nn.Module, updater: Updater) -> LoadedCheckpoint | None:
        """Under --resume, the newest checkpoint that verifies against ``model`` and the updater's optimizer
        and schedule, freshly built (None: start fresh); the newer corrupt ones are moved aside. Every rank
        chooses the same one."""
        if not self.config.resume:
            return None
        corrupt: list[Path] = []
        resumed = files.latest_valid(self.root, lambda message: log(self.info, f"warning: {message}"),
                                     ExpectedContents.of(model, updater.optimizer, updater.scheduler), corrupt)
        if resumed is None:
            if files.step_dirs(self.root):
                raise CheckpointError(f"no valid checkpoint under {self.root}: all are corrupt")
            log(self.info, f"--resume: no checkpoint under {self.root} yet, starting fresh")
            return None
        if resumed.trainer_state["world_size"] != self.info.world_size:
            raise ValueError(f"{resumed.path} was written by {resumed.trainer_state['world_size']} processes; "
                             f"resume it with the same number (got {self.info.world_size})")
        saved = resumed.trainer_state.get("data") or {}
        if saved.get("vocab_sha256") != self.data.vocab_sha256:
            # Weights trained on one vocabulary are meaningless under another of the same size.
            raise ValueError(f"{resumed.path} was trained on the vocabulary of {saved.get('dir', 'another data dir')}, "
                             f"but {self.data.data_dir} has a different vocabulary: resume with the same --data, "
                             "or start a new run in another --out")
        if saved.get("phases") != self.config.phases_record:
            # The data position of step N depends on the phases: other ones would skip or repeat pairs.
            raise ValueError(f"{resumed.path} was trained with --phases {saved.get('phases')}, not "
                             f"{self.config.phases}: resume with the same --phases, or start a new run in another --out")
        distributed.barrier(self.info)  # every rank has chosen before rank 0 renames anything
        if self.info.is_main:
            for path in corrupt:
                log(self.info, f"moved the corrupt {path.name} aside to {files.move_aside(path).name}")
        return resumed

    def record_run(self, model_config: BertConfig) -> None:
        """``OUT/run_config.json``: this run's flags and model config (what :meth:`claim` checks next time)."""
        if self.info.is_main:
            from fastbert._atomic import atomic_write_text

            atomic_write_text(self.out / RUN_CONFIG, json.dumps(
                {"pretrain": dataclasses.asdict(self.config), "model_config": model_config.to_dict()}, indent=2))

    def restore(self, resumed: LoadedCheckpoint, model: torch.nn.Module, updater: Updater) -> None:
        """The checkpoint's weights into ``model`` and its optimizer, schedule and scaler into ``updater``."""
        loaded = weights.load_state_dict_into(model, weights.read_state_dict(resumed.path),
                                              tied_keys=model._tied_keys_now(), prefix=model.base_model_prefix + ".")
        if loaded.missing_keys or loaded.unexpected_keys:
            raise CheckpointError(f"checkpoint {resumed.path} does not fit the model: {loaded.describe()}")
        updater.load_state_dict(resumed.trainer_state, step=resumed.step)
        self.saved_step = resumed.step
        log(self.info, f"resumed from {resumed.path} at step {resumed.step}")

    def restore_rng(self, resumed: LoadedCheckpoint) -> None:
        """This rank's RNG states as they were at the save: the last thing before the loop, so that nothing
        in the set-up shifts the dropout stream."""
        set_rng_state(load_rng_state(resumed.path / files.rng_file(self.info.rank)))

    # --- save -----------------------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, updater: Updater, rng: dict[str, Any]) -> None:
        """``checkpoints/step_N`` after the updater's step N, each rank storing its RNG state ``rng``; keeps
        the newest --keep. A failed write leaves no staging behind and names the checkpoint."""
        updater.check_saveable()
        info, step = self.info, updater.step
        staging = None
        try:
            # Rank 0 makes the staging folder and every rank writes its RNG state into it.
            staging = files.staging_dir(self.root, step) if info.is_main else None
            if info.distributed:
                holder = [str(staging) if staging else None]
                torch.distributed.broadcast_object_list(holder, src=0)
                staging = Path(holder[0])
            save_rng_state(rng, staging / files.rng_file(info.rank))
            distributed.barrier(info)
            if info.is_main:
                model.save_pretrained(staging)
                state = {"step": step, **updater.state_dict(), "samples_per_rank": step * self.config.samples_per_step,
                         "world_size": info.world_size, "pretrain_config": dataclasses.asdict(self.config),
                         "data": {"dir": str(self.data.data_dir), "vocab_sha256": self.data.vocab_sha256,
                                  "phases": self.config.phases_record}}
                with write_errors_as_os_errors(staging / files.TRAINER_STATE):
                    torch.save(state, staging / files.TRAINER_STATE)
                files.write_manifest(staging, step)
                files.publish(staging, self.root, step, self.config.keep)
            distributed.barrier(info)
        except BaseException as err:
            if info.is_main and staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError):
                raise OSError(err.errno, f"cannot write checkpoint step_{step} ({err.strerror or err})",
                              str(self.root)) from None
            raise
        self.saved_step = step

    # --- the end --------------------------------------------------------------------------------------
    def export_final(self, model: torch.nn.Module, record: dict[str, Any]) -> Path:
        """Model + tokenizer in ``OUT/final`` (rank 0, after the last save): what transformers loads; and
        ``record`` (how it was trained) as ``pretraining.json``."""
        from fastbert._atomic import atomic_write_text
        from fastbert.data.tokenizer import copy_tokenizer_files

        def write(folder: Path) -> None:
            model.save_pretrained(folder)
            atomic_write_text(folder / PRETRAINING_RECORD, json.dumps(record, indent=2) + "\n")
            # Full paths (relative to the working directory if the output is); an old tokenizer.json gets [CLS]/[SEP].
            copy_tokenizer_files(self.data.tokenizer_files, folder)

        return export_folder(self.final_dir, write)
