"""The pre-training loop: data → MLM+NSP steps under autocast → logs, eval, checkpoints, final export.

One process per device; under torchrun every rank runs this same function (DDP). Rank 0 logs and
saves; every rank reads a disjoint slice of the data. A run is a pure function of its config and
seed: ``N`` steps straight and ``N/2`` + ``--resume`` + ``N/2`` give identical losses on CPU fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastbert import backend
from fastbert.config import BertConfig
from fastbert.device import Precision, resolve_precision
from fastbert.masking import IGNORE_INDEX
from fastbert.modeling import BertForPreTraining
from fastbert.pretrain import checkpoint as ckpt
from fastbert.pretrain import distributed
from fastbert.pretrain.interrupts import StopRequests
from fastbert.pretrain.lock import FolderLock
from fastbert.pretrain.flops import peak_tflops, training_flops
from fastbert.pretrain.optim import build_optimizer
from fastbert.pretrain.schedule import build_scheduler, warmup_steps


@dataclass
class PretrainConfig:
    model: str = "bert-tiny"                 # preset name, or a checkpoint dir to continue from
    corpus: list[str] | None = None          # text/jsonl/datasets paths or ["builtin"]; prepared into OUT/data
    data: str | None = None                  # an already prepared data dir (fastbert prepare)
    out: str = "runs/pretrain"
    max_steps: int = 1000
    batch_size: int = 32                     # per device, per micro-step
    grad_accum: int = 1
    seq_len: int = 128
    # default: 2e-2 for LAMB (measured best for bert-tiny at batch 32, docs/pretrain_sweep.md; large models
    # and batches want their own), 5e-4 for AdamW
    lr: float | None = None
    warmup: float = 0.06                     # < 1: fraction of max_steps; >= 1: steps
    schedule: str = "linear"                 # linear | poly
    optimizer: str = "lamb"                  # lamb | adamw
    weight_decay: float = 0.01
    clip: float = 1.0                        # global grad-norm clip; 0 disables
    precision: str = "auto"                  # auto | bf16 | fp16 | fp32
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    keep: int = 3
    eval_every: int = 250
    # 80 x 32 held-out pairs: the binomial standard error of NSP accuracy is <= 1 point (MLM: ~0.2).
    eval_batches: int = 80
    eval_fraction: float = 0.05              # documents held out for eval, never trained on
    resume: bool = False
    stop_at: int | None = None               # stop after this step (checkpointed), as if interrupted
    whole_word_mask: bool = False
    packing: bool = False
    compile: bool = False
    backend: str = "auto"                    # auto | triton | torch
    device: str = "auto"                     # auto | cuda | cpu
    num_workers: int = 2
    vocab_size: int = 8192                   # WordPiece vocab trained when the corpus brings none
    tokenizer: str | None = None             # vocab.txt / tokenizer.json to use instead of training one
    mlm_probability: float = 0.15
    short_seq_prob: float = 0.1
    progress: bool = True

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "save_every", "keep",
                    "eval_every", "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"--seq-len must be at least 8, got {self.seq_len}")
        choices = {"schedule": ("linear", "poly"), "optimizer": ("lamb", "adamw"),
                   "precision": ("auto", "bf16", "fp16", "fp32"), "backend": backend.BACKENDS,
                   "device": ("auto", "cuda", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_steps:
            raise ValueError(f"--stop-at must be in [1, --max-steps={self.max_steps}], got {self.stop_at}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        # `not x >= 0` is also true for NaN, which would otherwise pass every comparison.
        if not math.isfinite(self.warmup) or self.warmup < 0:
            raise ValueError(f"--warmup must be a number >= 0, got {self.warmup}")
        if not (self.clip >= 0 and self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"--clip and --weight-decay must be numbers >= 0, got {self.clip} and {self.weight_decay}")
        if self.num_workers < 0 or self.eval_batches < 0:
            raise ValueError("--num-workers and --eval-batches must be >= 0")
        if self.corpus and self.data:
            raise ValueError("give either --corpus (prepared on the fly) or --data (already prepared), not both")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm probability must be in (0, 1), got {self.mlm_probability}")


@dataclass
class PretrainResult:
    out: Path
    final_dir: Path | None
    steps_done: int
    losses: list[float] = field(default_factory=list)  # the loss of every logged step (rank-local)
    last_eval: dict[str, float] | None = None
    param_checksum: float = 0.0  # sum of all parameters (for checking ranks agree)
    interrupted: bool = False  # stopped by Ctrl-C or a signal (not --stop-at)
    signal: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run


# ---------------------------------------------------------------------------------------------------
def _log(info: distributed.DistInfo, message: str) -> None:
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _data(cfg: PretrainConfig, out: Path, info: distributed.DistInfo):
    from fastbert.data.corpus import BUILTIN
    from fastbert.data.prepare import load_prepared, prepare_corpus

    if cfg.data:
        return load_prepared(cfg.data)
    corpus = cfg.corpus or [BUILTIN]
    data_dir = out / "data"
    if info.is_main:  # rank 0 prepares (or reuses); the others wait and load
        prepare_corpus(corpus, data_dir, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size)
    distributed.barrier(info)
    return load_prepared(data_dir)


def _model_config(cfg: PretrainConfig, data) -> tuple[BertConfig, Path | None]:
    path = Path(cfg.model)
    if path.is_dir():
        config = BertConfig.from_pretrained(path)
        if config.vocab_size < data.vocab_size:
            raise ValueError(f"the model at {path} has vocab_size {config.vocab_size}, smaller than the data's "
                             f"vocabulary ({data.vocab_size})")
        start = path
    else:
        # A fresh model sized for the data's vocabulary (rounded up to a multiple of 8 for tensor cores).
        config = BertConfig.from_pretrained(cfg.model, vocab_size=int(math.ceil(data.vocab_size / 8) * 8),
                                            pad_token_id=data.pad_id)
        start = None
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is above the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    return config, start


def _collator(cfg: PretrainConfig, data, device: torch.device):
    from fastbert import masking
    from fastbert.data import MLMCollator

    # [UNK] is masked like any other token, as in BERT; the other special tokens never are.
    special = tuple(i for i in data.special_token_ids if i != data.unk_id)
    is_continuation = None
    if cfg.whole_word_mask:
        is_continuation = masking.continuation_table(masking.read_vocab(Path(data.data_dir) / "vocab.txt"))
    return MLMCollator(vocab_size=data.vocab_size, mask_token_id=data.mask_id, pad_token_id=data.pad_id,
                       special_token_ids=special, is_continuation=is_continuation, max_len=cfg.seq_len,
                       pad_to_multiple_of=8, mlm_probability=cfg.mlm_probability,
                       whole_word_mask=cfg.whole_word_mask, packing=cfg.packing,
                       # On a GPU the model then runs unpadded on metadata made in the workers: no device sync.
                       return_unpad_metadata=cfg.packing or device.type == "cuda")


class _IndexedDataset(torch.utils.data.Dataset):
    """Yields (index, example) so the collate step can seed its masking from the sample indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _SeededCollate:
    """MLM masking seeded by (run seed, the batch's sample indices): the masks of a batch do not depend
    on worker processes or on how many batches came before, so a resumed run sees the same ones."""

    def __init__(self, collator, seed: int):
        self.collator = collator
        self.seed = seed

    def __call__(self, items):
        indices = [i for i, _ in items]
        batch_seed = (self.seed * 1_000_003 + indices[0] * 7_919 + len(indices)) % (2**62)
        return self.collator([example for _, example in items], seed=batch_seed)


def _loader(dataset, collate, cfg: PretrainConfig, sampler, device: torch.device, rank: int):
    workers = cfg.num_workers
    # Its own generator: creating the iterator must not draw from the global RNG (the dropout stream).
    generator = torch.Generator().manual_seed(cfg.seed * 1009 + rank)
    return torch.utils.data.DataLoader(
        _IndexedDataset(dataset), batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, generator=generator,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, drop_last=True,
    )


MIN_LOSS_SCALE = 2.0**-16  # below this fp16 gradients underflow anyway: stop instead of training on nothing
FP16_INIT_SCALE = 2.0**16  # GradScaler's usual start; tests raise it to force overflow skips

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label", "position_ids",
               "indices", "cu_seqlens", "max_seqlen", "masked_positions")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items() if k in _MODEL_KEYS and v is not None}


@torch.no_grad()
def evaluate(model: BertForPreTraining, batches: list[dict], device: torch.device, amp_dtype,
             mask_token_id: int | None = None) -> dict[str, float]:
    """MLM accuracy, NSP accuracy and loss on held-out batches.

    With ``mask_token_id``, also ``mlm_accuracy_at_mask``: the accuracy at the targets whose input is
    [MASK] (80 % of them). Those can only be guessed from context; at the other 20 % (kept or random
    tokens) copying the input already scores about half, so the overall figure alone hides whether
    the model has learned any context."""
    was_training = model.training
    model.eval()
    correct_mlm = total_mlm = correct_nsp = total_nsp = 0
    correct_at_mask = total_at_mask = 0
    loss_sum = 0.0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for batch in batches:
        batch = _to_device(batch, device)
        with autocast:
            out = model(**batch)
        labels = batch["labels"]
        is_target = labels != IGNORE_INDEX
        targets = labels[is_target]
        hits = out.prediction_logits.argmax(-1) == targets
        correct_mlm += int(hits.sum())
        total_mlm += targets.numel()
        if mask_token_id is not None:
            at_mask = batch["input_ids"][is_target] == mask_token_id
            correct_at_mask += int(hits[at_mask].sum())
            total_at_mask += int(at_mask.sum())
        correct_nsp += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum())
        total_nsp += batch["next_sentence_label"].numel()
        loss_sum += float(out.loss)
    model.train(was_training)
    n = max(len(batches), 1)
    mlm, nsp = correct_mlm / max(total_mlm, 1), correct_nsp / max(total_nsp, 1)
    # Binomial standard errors: how far another draw of held-out pairs could move each accuracy.
    return {"eval_loss": loss_sum / n, "mlm_accuracy": mlm, "nsp_accuracy": nsp,
            "mlm_accuracy_se": math.sqrt(mlm * (1 - mlm) / max(total_mlm, 1)),
            "nsp_accuracy_se": math.sqrt(nsp * (1 - nsp) / max(total_nsp, 1)),
            "eval_pairs": total_nsp, "eval_masked_tokens": total_mlm,
            **({"mlm_accuracy_at_mask": correct_at_mask / max(total_at_mask, 1)} if mask_token_id is not None else {})}


class _Metrics:
    """metrics.jsonl (one object per logged step), TensorBoard when installed, the progress bar."""

    def __init__(self, out: Path, enabled: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        self.bar = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass
            if progress:
                try:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
                except ImportError:
                    pass

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def _check_resume_compatible(out: Path, config: BertConfig) -> None:
    """Resuming into a folder trained with another architecture is a mistake, not a fresh start."""
    saved = out / "run_config.json"
    if not saved.is_file():
        return
    previous = json.loads(saved.read_text())["model_config"]
    now = config.to_dict()
    diffs = [k for k in sorted(set(previous) | set(now)) if k != "architectures" and previous.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"{out} holds a run with a different model config ({', '.join(diffs)} differ); "
                         "use another --out or the same --model")


def _check_same_vocabulary(resumed: ckpt.LoadedCheckpoint, data) -> None:
    """Weights trained on one vocabulary are meaningless under another of the same size."""
    saved = resumed.trainer_state.get("data") or {}
    if saved.get("vocab_sha256") != data.vocab_sha256:
        raise ValueError(f"{resumed.path} was trained on the vocabulary of {saved.get('dir', 'another data dir')}, "
                         f"but {data.data_dir} has a different vocabulary: resume with the same --data, "
                         "or start a new run in another --out")


def _expected_shapes(cfg: PretrainConfig, config: BertConfig) -> ckpt.ExpectedShapes:
    """The tensor shapes a checkpoint of this run holds, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = BertForPreTraining(config)
    tied = set(model._tied_keys_now())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    optimizer = build_optimizer(model, cfg.optimizer, 1.0, cfg.weight_decay)
    indices = [i for group in optimizer.state_dict()["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return ckpt.ExpectedShapes(model=shapes, optimizer={i: tuple(p.shape) for i, p in zip(indices, params)})


def _weights_finite(model) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _save(run: _Run, rng: dict[str, Any]) -> None:
    """Write ``checkpoints/step_N`` (every rank its RNG state ``rng``); a failed write leaves no staging behind."""
    info, step = run.info, run.step
    root = run.out / "checkpoints"
    staging = None
    try:
        # Rank 0 makes the staging folder and every rank writes its RNG state into it.
        staging = ckpt.staging_dir(root, step) if info.is_main else None
        if info.distributed:
            holder = [str(staging) if staging else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            staging = Path(holder[0])
        ckpt.save_rng_state(rng, staging / ckpt.rng_file(info.rank))
        distributed.barrier(info)
        if info.is_main:
            _unwrap(run.model).save_pretrained(staging)
            scaler = run.scaler
            state = {"step": step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "skipped_steps": int(run.skipped_steps), "samples_per_rank": step * run.samples_per_step,
                     "world_size": info.world_size, "pretrain_config": dataclasses.asdict(run.cfg),
                     "data": {"dir": str(run.data.data_dir), "vocab_sha256": run.data.vocab_sha256}}
            torch.save(state, staging / ckpt.TRAINER_STATE)
            ckpt.write_manifest(staging, step)
            ckpt.publish(staging, root, step, run.cfg.keep)
        distributed.barrier(info)
    except BaseException as err:
        if info.is_main and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write checkpoint step_{step} ({err.strerror or err})", str(root)) from None
        raise


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _export_final(out: Path, model, data) -> Path:
    from fastbert.data.tokenizer import copy_tokenizer_files

    final = out / "final"
    staging = out / ".final-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _unwrap(model).save_pretrained(staging)
        # Full paths (relative to the working directory if the output is); an old tokenizer.json gets [CLS]/[SEP].
        copy_tokenizer_files(data.tokenizer_files, staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write the final model ({err.strerror or err})", str(final)) from None
        raise
    return final


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    cfg.validate()
    info = distributed.setup(cfg.device)
    try:
        return _pretrain(cfg, info)
    finally:
        distributed.cleanup(info)


@dataclass
class _Run:
    """Everything one training run carries from step to step (built by :func:`_set_up`)."""

    cfg: PretrainConfig
    info: distributed.DistInfo
    out: Path
    data: Any
    config: BertConfig
    model: BertForPreTraining          # the bare model: saved, evaluated, exported
    train_model: torch.nn.Module       # what the step calls: the model, under DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    precision: Precision
    step: int
    batches: Any                       # iterator over collated CPU batches
    eval_batches: list[dict]
    params: list[torch.nn.Parameter]
    metrics: _Metrics
    result: PretrainResult
    stop: StopRequests
    peak: float | None
    skipped_steps: torch.Tensor        # fp16 steps the scaler skipped (on the device; read on log steps)
    first_bad_step: torch.Tensor       # first step with a NaN/inf loss or grad norm, 0 = none (on the device)
    window: _Window = field(default_factory=lambda: _Window())
    phase: str = "between"             # "forward" (weights untouched yet) | "update" | "between" steps
    torch_rng_before_step: dict[str, Any] | None = None
    saved_step: int = 0                # the step of the newest checkpoint on disk
    stop_agreed: bool = False          # DDP: every rank has seen the stop request (agreed on log steps)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def samples_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum


@dataclass
class _Window:
    """Throughput since the last log line, counted from the CPU batches (the step never waits on the device)."""

    tokens: int = 0
    flops: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()


@dataclass
class _StepOutput:
    """One optimisation step's figures, still on the device (read only on log steps)."""

    loss: torch.Tensor
    mlm_loss: torch.Tensor
    nsp_loss: torch.Tensor
    grad_norm: torch.Tensor
    accuracy: torch.Tensor          # (MLM, NSP) accuracy of the last micro-batch


def _pretrain(cfg: PretrainConfig, info: distributed.DistInfo) -> PretrainResult:
    out = _output_folder(cfg)
    with contextlib.ExitStack() as stack:
        if info.is_main:
            stack.enter_context(FolderLock(out))
        stack.enter_context(backend.use(cfg.backend))
        stop = stack.enter_context(StopRequests())
        run = _set_up(cfg, info, out, stop)
        try:
            while run.step < cfg.max_steps:
                if _stop_requested(run):
                    return _pause(run, interrupted=True)
                output = _optimisation_step(run)
                if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                    _log_window(run, output)
                if run.eval_batches and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps):
                    _eval(run)
                if run.step == cfg.stop_at and run.step < cfg.max_steps:
                    return _pause(run, interrupted=False)  # a planned pause
                if run.step % cfg.save_every == 0 and run.step < cfg.max_steps:
                    _checkpoint(run)
        except KeyboardInterrupt:
            return _pause(run, interrupted=True)
        finally:
            run.metrics.close()
        return _finish(run)


# --- set-up ----------------------------------------------------------------------------------------
def _output_folder(cfg: PretrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it will hold data/, checkpoints/, final/)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _set_up(cfg: PretrainConfig, info: distributed.DistInfo, out: Path, stop: StopRequests) -> _Run:
    """Data, model, optimizer, the checkpoint to resume from, the batch streams; RNG restored last."""
    device = info.device
    precision = resolve_precision(cfg.precision, device)
    data = _data(cfg, out, info)
    config, start_from = _model_config(cfg, data)
    resumed = _find_resume_point(cfg, info, out, config, data)
    if info.is_main:
        from fastbert._atomic import atomic_write_text

        atomic_write_text(out / "run_config.json", json.dumps(
            {"pretrain": dataclasses.asdict(cfg), "model_config": config.to_dict()}, indent=2))

    _seed_everything(cfg.seed + info.rank)
    if resumed is not None:
        model = BertForPreTraining.from_pretrained(resumed.path, config=config, strict=True)
    elif start_from is not None:
        model = BertForPreTraining.from_pretrained(start_from, config=config)
    else:
        model = BertForPreTraining(config)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr or (2e-2 if cfg.optimizer == "lamb" else 5e-4),
                                cfg.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=warmup_steps(cfg.warmup, cfg.max_steps), max_steps=cfg.max_steps,
                                schedule=cfg.schedule)
    scaler = precision.grad_scaler(init_scale=FP16_INIT_SCALE)
    step = skipped = 0
    if resumed is not None:
        state = resumed.trainer_state
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, skipped = state["step"], state.get("skipped_steps", 0)
        _log(info, f"resumed from {resumed.path} at step {step}")
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    train_set, batches = _train_batches(cfg, data, info, step)
    eval_batches = _eval_batches(cfg, data, device)
    if resumed is not None:
        # Last thing before the loop, so that nothing in the set-up above shifts the dropout stream.
        ckpt.set_rng_state(ckpt.load_rng_state(resumed.path / ckpt.rng_file(info.rank)))
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = _Metrics(out, info.is_main, cfg.progress, cfg.max_steps, step)
    if resumed is not None:
        # Rows after this one continue from step N; readers drop the older rows past N (a fallback re-runs them).
        metrics.log({"resumed_from": step})
    run = _Run(cfg=cfg, info=info, out=out, data=data, config=config, model=model, train_model=train_model,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=precision, step=step,
               batches=batches, eval_batches=eval_batches, params=params, metrics=metrics,
               result=PretrainResult(out=out, final_dir=None, steps_done=step), stop=stop,
               peak=peak_tflops(device), skipped_steps=torch.tensor(skipped, dtype=torch.int64, device=device),
               first_bad_step=torch.zeros((), dtype=torch.int64, device=device), saved_step=step)
    _log(info, f"pre-training {cfg.model}: {sum(p.numel() for p in params) / 1e6:.1f} M parameters, "
               f"{info.world_size} process(es) on {device}, precision {precision.name}, "
               f"backend {cfg.backend}, {len(train_set):,} training pairs per epoch, output {out}")
    return run


def _find_resume_point(cfg: PretrainConfig, info: distributed.DistInfo, out: Path, config: BertConfig,
                       data) -> ckpt.LoadedCheckpoint | None:
    """The newest fully verified checkpoint under --resume (None: start fresh); newer corrupt ones are
    moved aside. Without --resume, refuses a folder that already holds checkpoints."""
    root = out / "checkpoints"
    if info.is_main:
        ckpt.remove_stale_staging(root)  # saves killed midway; we hold the folder's lock
    if not cfg.resume:
        if ckpt.step_dirs(root):
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        return None
    _check_resume_compatible(out, config)
    corrupt: list[Path] = []
    resumed = ckpt.latest_valid(root, lambda m: _log(info, f"warning: {m}"), _expected_shapes(cfg, config), corrupt)
    if resumed is None:
        if ckpt.step_dirs(root):
            raise ckpt.CheckpointError(f"no valid checkpoint under {root}: all are corrupt")
        _log(info, f"--resume: no checkpoint under {root} yet, starting fresh")
        return None
    if resumed.trainer_state["world_size"] != info.world_size:
        raise ValueError(f"{resumed.path} was written by {resumed.trainer_state['world_size']} processes; "
                         f"resume it with the same number (got {info.world_size})")
    _check_same_vocabulary(resumed, data)
    distributed.barrier(info)  # every rank has chosen before rank 0 renames anything
    if info.is_main:
        for path in corrupt:
            _log(info, f"moved the corrupt {path.name} aside to {ckpt.move_aside(path).name}")
    return resumed


def _train_batches(cfg: PretrainConfig, data, info: distributed.DistInfo, step: int):
    """(the training pairs, an iterator over their collated batches from the sample after ``step``)."""
    from fastbert.data.pairs import BertPairDataset, PretrainSampler

    train_set = BertPairDataset(data.data_dir, cfg.seq_len, short_seq_prob=cfg.short_seq_prob, seed=cfg.seed,
                                split="train", eval_fraction=cfg.eval_fraction)
    collate = _SeededCollate(_collator(cfg, data, info.device), cfg.seed)
    sampler = PretrainSampler(len(train_set), seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                              start_index=step * cfg.batch_size * cfg.grad_accum)
    return train_set, iter(_loader(train_set, collate, cfg, sampler, info.device, info.rank))


def _eval_batches(cfg: PretrainConfig, data, device: torch.device) -> list[dict]:
    """The held-out batches, collated once (fixed masks, so evals along the run are comparable).

    ``eval_batches * batch_size`` pairs. When the held-out documents hold fewer, further passes over
    them draw new pairs (other starts, A/B cuts, random next sentences and masks), as BERT's
    ``dupe_factor`` does for its training data."""
    if not cfg.eval_batches:
        return []
    from fastbert.data.pairs import BertPairDataset

    wanted = cfg.eval_batches * cfg.batch_size
    pairs = []
    for repeat in range(wanted):  # bounded: every pass adds at least one pair
        eval_set = BertPairDataset(data.data_dir, cfg.seq_len, short_seq_prob=cfg.short_seq_prob,
                                   seed=cfg.seed + 7_919 * repeat, split="eval", eval_fraction=cfg.eval_fraction)
        pairs += [eval_set[i] for i in range(min(len(eval_set), wanted - len(pairs)))]
        if len(pairs) == wanted:
            break
    eval_collate = _SeededCollate(_collator(cfg, data, device), cfg.seed + 1)
    return [eval_collate(list(enumerate(pairs[s:s + cfg.batch_size], start=s)))
            for s in range(0, len(pairs), cfg.batch_size)]


# --- one optimisation step -------------------------------------------------------------------------
def _optimisation_step(run: _Run) -> _StepOutput:
    """grad_accum micro-batches forward + backward, clip, optimizer and scheduler step.

    Nothing here waits on the device: the skip and divergence counters stay device tensors."""
    cfg, info, device, scaler = run.cfg, run.info, run.device, run.scaler
    # Taken before this step's dropout draws: an interrupt before the update checkpoints this state.
    # (Only torch's generators: the step draws from no other, and NumPy's get_state costs ~0.1 ms.)
    run.torch_rng_before_step = ckpt.torch_rng_state()
    run.phase = "forward"
    loss_sum = torch.zeros((), device=device)
    mlm_sum = torch.zeros((), device=device)
    nsp_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        cpu_batch = next(run.batches)
        run.window.tokens += int(cpu_batch["attention_mask"].sum())
        if run.peak is not None:
            run.window.flops += training_flops(run.config, cpu_batch["attention_mask"],
                                               cpu_batch["masked_positions"].numel(), cpu_batch.get("cu_seqlens"))
        batch = _to_device(cpu_batch, device)
        # DDP: all-reduce gradients only on the last micro-step of an accumulation.
        sync = contextlib.nullcontext() if (not info.distributed or micro == cfg.grad_accum - 1) \
            else run.train_model.no_sync()
        with sync:
            with run.precision.autocast():
                output = run.train_model(**batch)
            loss = output.loss / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        mlm_sum += output.mlm_loss.detach() / cfg.grad_accum
        nsp_sum += output.nsp_loss.detach() / cfg.grad_accum
    run.phase = "update"
    if scaler is not None:
        scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip if cfg.clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(run.optimizer)
        scaler.update()
        # The scaler skips the update exactly when an unscaled gradient is inf/NaN, i.e. the norm is.
        run.skipped_steps += ~torch.isfinite(grad_norm)
    else:
        run.optimizer.step()
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        run.first_bad_step.masked_fill_(bad & (run.first_bad_step == 0), run.step + 1)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.phase = "between"
    run.metrics.advance()
    return _StepOutput(loss_sum, mlm_sum, nsp_sum, grad_norm, _batch_accuracy(output, batch))


def _batch_accuracy(output, batch: dict[str, Any]) -> torch.Tensor:
    """(MLM, NSP) accuracy of one training batch, on the device (no sync): the training curves."""
    # The decoder's rows follow masked_positions (row-major labels != -100); indexing by it avoids the
    # device sync of a boolean mask.
    targets = batch["labels"].reshape(-1)[batch["masked_positions"]]
    mlm = (output.prediction_logits.detach().argmax(-1) == targets).float().mean()
    nsp = (output.seq_relationship_logits.detach().argmax(-1) == batch["next_sentence_label"]).float().mean()
    return torch.stack([mlm, nsp])


def _check_diverged(run: _Run) -> None:
    """Stop on a NaN/inf loss or gradient norm (reads a device flag: log and save steps only)."""
    bad = int(run.first_bad_step)
    if bad:
        raise FloatingPointError(
            f"training diverged: the loss or gradient norm is NaN or infinite from step {bad} on; no checkpoint "
            "after it is written: lower --lr, raise --warmup, or check --weight-decay and the data")


# --- the log window --------------------------------------------------------------------------------
def _log_window(run: _Run, output: _StepOutput) -> None:
    """One metrics row: this step's losses, the window's throughput (all ranks), the fp16 loss scale."""
    info, window, scaler = run.info, run.window, run.scaler
    # The stop request rides along with the throughput sum: under DDP every rank stops at the same step.
    totals = distributed.all_reduce_sum(torch.tensor([float(window.tokens), window.flops, float(run.stop.signal is not None)],
                                                     dtype=torch.float64, device=run.device), info).tolist()
    run.stop_agreed = totals[2] > 0
    elapsed = time.perf_counter() - window.start
    record = {"step": run.step, "loss": float(output.loss), "mlm_loss": float(output.mlm_loss),
              "nsp_loss": float(output.nsp_loss), "lr": run.scheduler.get_last_lr()[0],
              "grad_norm": float(output.grad_norm), "tokens_per_s": totals[0] / elapsed, "elapsed_s": elapsed}
    record["mlm_accuracy_train"], record["nsp_accuracy_train"] = output.accuracy.tolist()
    if scaler is not None:
        record["loss_scale"] = scaler.get_scale()
        record["skipped_steps"] = int(run.skipped_steps)
    if run.peak is not None:
        record["mfu"] = totals[1] / elapsed / (run.peak * info.world_size * 1e12)
    run.metrics.log(record)
    run.result.losses.append(record["loss"])
    window.restart()
    _check_diverged(run)
    if scaler is not None and record["loss_scale"] < MIN_LOSS_SCALE:
        # Every step overflows: the run is diverging, and fp16 can no longer represent it.
        raise FloatingPointError(
            f"the fp16 loss scale fell to {record['loss_scale']:.3g} at step {run.step} (gradients "
            "overflow on every step): lower --lr, raise --warmup, or use --precision bf16")


def _stop_requested(run: _Run) -> bool:
    """A SIGINT/SIGTERM arrived: alone, stop after this step; under DDP, once all ranks agreed (log steps)."""
    return run.stop_agreed if run.info.distributed else run.stop.signal is not None


# --- eval ------------------------------------------------------------------------------------------
def _eval(run: _Run) -> None:
    """Held-out MLM/NSP accuracy (see :func:`evaluate`), logged as its own metrics row."""
    run.result.last_eval = evaluate(run.model, run.eval_batches, run.device, run.precision.dtype,
                                    mask_token_id=run.data.mask_id)
    run.metrics.log({"step": run.step, **run.result.last_eval})
    run.window.start = time.perf_counter()  # eval time is not training throughput


def _show(run: _Run) -> None:
    """The end-of-run report: final held-out accuracy, masked-word examples and curves (OUT/showcase.txt,
    OUT/curves.png)."""
    from fastbert.data.pairs import eval_documents
    from fastbert.pretrain import showcase

    last = run.result.last_eval
    if last is not None:
        _log(run.info, f"held-out eval at step {run.step} ({last['eval_pairs']:,} pairs): MLM accuracy "
                       f"{last['mlm_accuracy']:.1%} ± {last['mlm_accuracy_se']:.1%}, NSP accuracy "
                       f"{last['nsp_accuracy']:.1%} ± {last['nsp_accuracy_se']:.1%}, loss {last['eval_loss']:.3f}; "
                       f"MLM accuracy at [MASK] inputs (context only) {last['mlm_accuracy_at_mask']:.1%}")
    held_out = eval_documents(run.data.num_documents, run.cfg.eval_fraction)
    _log(run.info, showcase.write_showcase(run.out, run.model, run.data, held_out, max_seq_len=run.cfg.seq_len,
                                           seed=run.cfg.seed, device=run.device).rstrip())


# --- checkpoint ------------------------------------------------------------------------------------
def _checkpoint(run: _Run, rng: dict[str, Any] | None = None) -> None:
    """Save after step N (``rng``: the RNG state to store, by default the current one); never NaN weights."""
    _check_diverged(run)
    if not _weights_finite(run.model):
        raise FloatingPointError(f"the weights hold NaN or inf after step {run.step}: not saved; "
                                 "lower --lr or raise --warmup")
    _save(run, rng if rng is not None else ckpt.rng_state())
    run.saved_step = run.step
    run.window.start = time.perf_counter()


def _pause(run: _Run, interrupted: bool) -> PretrainResult:
    """--stop-at, a signal or Ctrl-C: checkpoint a consistent state, so --resume continues exactly."""
    result = run.result
    result.interrupted = interrupted
    result.signal = run.stop.name or ("SIGINT" if interrupted else None)  # a bare KeyboardInterrupt is Ctrl-C
    what = f"{run.stop.name} received: stopped" if run.stop.signal is not None else \
        "interrupted" if interrupted else "stopped (--stop-at)"
    if run.phase == "update":
        # Some weights may already hold the update of a step that is not counted: nothing consistent to save.
        _log(run.info, f"\n{what} while updating the weights of step {run.step + 1}: no checkpoint written; "
                       "--resume continues from the last one")
    elif run.step > run.saved_step:
        _log(run.info, f"\n{what} at step {run.step}: writing a checkpoint so that --resume continues from here")
        # Mid-step (weights untouched yet) the state is that of the step's start, its RNG state included.
        _checkpoint(run, {**ckpt.rng_state(), **run.torch_rng_before_step} if run.phase == "forward" else None)
    elif run.step > 0:
        _log(run.info, f"\n{what} at step {run.step}: --resume continues from the checkpoint of this step")
    else:
        _log(run.info, f"\n{what} before the first step: nothing to save")
    result.steps_done = run.step
    return result


def _finish(run: _Run) -> PretrainResult:
    """The last checkpoint, then model + tokenizer exported to OUT/final (finite weights only)."""
    _checkpoint(run)
    result = run.result
    if run.info.is_main:
        result.final_dir = _export_final(run.out, run.model, run.data)
        _log(run.info, f"done: {run.step} steps; model + tokenizer in {result.final_dir}")
        _show(run)
    result.steps_done = run.step
    result.param_checksum = float(sum(p.detach().double().sum() for p in run.model.parameters()))
    return result
