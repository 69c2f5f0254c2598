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
from fastbert.masking import IGNORE_INDEX
from fastbert.modeling import BertForPreTraining
from fastbert.pretrain import checkpoint as ckpt
from fastbert.pretrain import distributed
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
    lr: float | None = None                  # default: 2e-3 for LAMB, 5e-4 for AdamW (small models)
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
    eval_every: int = 200
    eval_batches: int = 8
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
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.num_workers < 0 or self.eval_batches < 0 or self.clip < 0 or self.weight_decay < 0:
            raise ValueError("--num-workers, --eval-batches, --clip and --weight-decay must be >= 0")
        if self.corpus and self.data:
            raise ValueError("give either --corpus (prepared on the fly) or --data (already prepared), not both")
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
    interrupted: bool = False


# ---------------------------------------------------------------------------------------------------
def _log(info: distributed.DistInfo, message: str) -> None:
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


def _precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32)."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[requested]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _data(cfg: PretrainConfig, out: Path, info: distributed.DistInfo):
    from fastbert.data.prepare import load_prepared, prepare_corpus

    if cfg.data:
        return load_prepared(cfg.data)
    corpus = cfg.corpus or ["builtin"]
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

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label", "position_ids",
               "indices", "cu_seqlens", "max_seqlen", "masked_positions")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items() if k in _MODEL_KEYS and v is not None}


@torch.no_grad()
def evaluate(model: BertForPreTraining, batches: list[dict], device: torch.device, amp_dtype) -> dict[str, float]:
    """MLM accuracy, NSP accuracy and loss on held-out batches."""
    was_training = model.training
    model.eval()
    correct_mlm = total_mlm = correct_nsp = total_nsp = 0
    loss_sum = 0.0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for batch in batches:
        batch = _to_device(batch, device)
        with autocast:
            out = model(**batch)
        labels = batch["labels"]
        targets = labels[labels != IGNORE_INDEX]
        correct_mlm += int((out.prediction_logits.argmax(-1) == targets).sum())
        total_mlm += targets.numel()
        correct_nsp += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum())
        total_nsp += batch["next_sentence_label"].numel()
        loss_sum += float(out.loss)
    model.train(was_training)
    n = max(len(batches), 1)
    return {"eval_loss": loss_sum / n, "mlm_accuracy": correct_mlm / max(total_mlm, 1),
            "nsp_accuracy": correct_nsp / max(total_nsp, 1)}


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
        if self.tb is not None:
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


def _save(out: Path, step: int, model, optimizer, scheduler, scaler, cfg: PretrainConfig,
          info: distributed.DistInfo, samples_per_rank: int) -> None:
    root = out / "checkpoints"
    # Rank 0 makes the staging folder and every rank writes its RNG state into it.
    staging = ckpt.staging_dir(root, step) if info.is_main else None
    if info.distributed:
        holder = [str(staging) if staging else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        staging = Path(holder[0])
    torch.save(ckpt.rng_state(), staging / ckpt.rng_file(info.rank))
    distributed.barrier(info)
    if info.is_main:
        _unwrap(model).save_pretrained(staging)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "samples_per_rank": samples_per_rank, "world_size": info.world_size,
                 "pretrain_config": dataclasses.asdict(cfg)}
        torch.save(state, staging / ckpt.TRAINER_STATE)
        ckpt.publish(staging, root, step, cfg.keep)
    distributed.barrier(info)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _export_final(out: Path, model, data) -> Path:
    final = out / "final"
    staging = out / ".final-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    _unwrap(model).save_pretrained(staging)
    for path in data.tokenizer_files:  # full paths (relative to the working directory if the output is)
        shutil.copy2(path, staging / Path(path).name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    cfg.validate()
    info = distributed.setup(cfg.device)
    try:
        return _pretrain(cfg, info)
    finally:
        distributed.cleanup(info)


def _pretrain(cfg: PretrainConfig, info: distributed.DistInfo) -> PretrainResult:
    os.environ["FASTBERT_BACKEND"] = cfg.backend
    device = info.device
    amp_dtype = _precision(cfg.precision, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _data(cfg, out, info)
    config, start_from = _model_config(cfg, data)

    resumed = None
    if cfg.resume:
        _check_resume_compatible(out, config)
        resumed = ckpt.latest_valid(out / "checkpoints", lambda m: _log(info, f"warning: {m}"))
        if resumed is None:
            if (out / "checkpoints").is_dir() and ckpt.step_dirs(out / "checkpoints"):
                raise ckpt.CheckpointError(f"no valid checkpoint under {out / 'checkpoints'}: all are corrupt")
            _log(info, f"--resume: no checkpoint under {out / 'checkpoints'} yet, starting fresh")
        elif resumed.trainer_state["world_size"] != info.world_size:
            raise ValueError(f"{resumed.path} was written by {resumed.trainer_state['world_size']} processes; "
                             f"resume it with the same number (got {info.world_size})")
    elif ckpt.step_dirs(out / "checkpoints"):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
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
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr or (2e-3 if cfg.optimizer == "lamb" else 5e-4),
                                cfg.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=warmup_steps(cfg.warmup, cfg.max_steps), max_steps=cfg.max_steps,
                                schedule=cfg.schedule)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    step = 0
    if resumed is not None:
        state = resumed.trainer_state
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = state["step"]
        _log(info, f"resumed from {resumed.path} at step {step}")
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    from fastbert.data.pairs import BertPairDataset, PretrainSampler

    train_set = BertPairDataset(data.data_dir, cfg.seq_len, short_seq_prob=cfg.short_seq_prob, seed=cfg.seed,
                                split="train")
    collate = _SeededCollate(_collator(cfg, data, device), cfg.seed)
    samples_per_step = cfg.batch_size * cfg.grad_accum
    sampler = PretrainSampler(len(train_set), seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                              start_index=step * samples_per_step)
    batches = iter(_loader(train_set, collate, cfg, sampler, device, info.rank))
    eval_batches = []
    if cfg.eval_batches:
        eval_set = BertPairDataset(data.data_dir, cfg.seq_len, short_seq_prob=cfg.short_seq_prob, seed=cfg.seed,
                                   split="eval")
        eval_collate = _SeededCollate(_collator(cfg, data, device), cfg.seed + 1)
        n = min(len(eval_set), cfg.eval_batches * cfg.batch_size)
        eval_batches = [eval_collate([(i, eval_set[i]) for i in range(s, min(s + cfg.batch_size, n))])
                        for s in range(0, n, cfg.batch_size)]

    if resumed is not None:
        # Last thing before the loop, so that nothing in the set-up above shifts the dropout stream.
        ckpt.set_rng_state(torch.load(resumed.path / ckpt.rng_file(info.rank), weights_only=False))
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    peak = peak_tflops(device)
    metrics = _Metrics(out, info.is_main, cfg.progress, cfg.max_steps, step)
    result = PretrainResult(out=out, final_dir=None, steps_done=step)
    _log(info, f"pre-training {cfg.model}: {sum(p.numel() for p in params) / 1e6:.1f} M parameters, "
               f"{info.world_size} process(es) on {device}, precision {str(amp_dtype or 'fp32').replace('torch.', '')}, "
               f"backend {cfg.backend}, {len(train_set):,} training pairs per epoch, output {out}")

    # Counted from the CPU batches: the step itself never waits on the device (only log steps read it).
    window_tokens = 0
    window_flops = 0.0
    window_start = time.perf_counter()
    skipped_steps = 0
    try:
        while step < cfg.max_steps:
            loss_sum = torch.zeros((), device=device)
            mlm_sum = torch.zeros((), device=device)
            nsp_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                cpu_batch = next(batches)
                window_tokens += int(cpu_batch["attention_mask"].sum())
                if peak is not None:
                    window_flops += training_flops(config, cpu_batch["attention_mask"],
                                                   cpu_batch["masked_positions"].numel(), cpu_batch.get("cu_seqlens"))
                batch = _to_device(cpu_batch, device)
                # DDP: all-reduce gradients only on the last micro-step of an accumulation.
                sync = contextlib.nullcontext() if (not info.distributed or micro == cfg.grad_accum - 1) \
                    else train_model.no_sync()
                with sync:
                    with autocast():
                        output = train_model(**batch)
                    loss = output.loss / cfg.grad_accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += loss.detach()
                mlm_sum += output.mlm_loss.detach() / cfg.grad_accum
                nsp_sum += output.nsp_loss.detach() / cfg.grad_accum
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
            if scaler is not None:
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics.advance()

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                totals = distributed.all_reduce_sum(torch.tensor([float(window_tokens), window_flops],
                                                                 dtype=torch.float64, device=device), info).tolist()
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": float(loss_sum), "mlm_loss": float(mlm_sum), "nsp_loss": float(nsp_sum),
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "tokens_per_s": totals[0] / elapsed, "elapsed_s": elapsed}
                if scaler is not None:
                    if scaler.get_scale() < scale_before:
                        skipped_steps += 1
                    record["loss_scale"] = scaler.get_scale()
                    record["skipped_steps"] = skipped_steps
                    if record["loss_scale"] < MIN_LOSS_SCALE:
                        # Every step overflows: the run is diverging, and fp16 can no longer represent it.
                        raise FloatingPointError(
                            f"the fp16 loss scale fell to {record['loss_scale']:.3g} at step {step} (gradients "
                            "overflow on every step): lower --lr, raise --warmup, or use --precision bf16")
                if peak is not None:
                    record["mfu"] = totals[1] / elapsed / (peak * info.world_size * 1e12)
                metrics.log(record)
                result.losses.append(record["loss"])
                window_tokens = 0
                window_flops = 0.0
                window_start = time.perf_counter()
            if eval_batches and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                result.last_eval = evaluate(model, eval_batches, device, amp_dtype)
                metrics.log({"step": step, **result.last_eval})
                window_start = time.perf_counter()
            if step == cfg.stop_at and step < cfg.max_steps:
                raise KeyboardInterrupt  # a planned pause: same path as an interrupt
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                _save(out, step, model, optimizer, scheduler, scaler, cfg, info, step * samples_per_step)
                window_start = time.perf_counter()
    except KeyboardInterrupt:
        # Between steps the state is consistent: keep it, so --resume continues from here.
        result.interrupted = step != cfg.stop_at
        _log(info, f"\n{'interrupted' if result.interrupted else 'stopped (--stop-at)'} at step {step}: "
                   "writing a checkpoint so that --resume continues from here")
        if step > 0:
            _save(out, step, model, optimizer, scheduler, scaler, cfg, info, step * samples_per_step)
        metrics.close()
        result.steps_done = step
        return result
    metrics.close()
    _save(out, step, model, optimizer, scheduler, scaler, cfg, info, step * samples_per_step)
    if info.is_main:
        result.final_dir = _export_final(out, model, data)
        _log(info, f"done: {step} steps; model + tokenizer in {result.final_dir}")
    result.steps_done = step
    result.param_checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    return result
