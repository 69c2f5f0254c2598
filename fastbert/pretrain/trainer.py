"""The pre-training loop: batches → steps under autocast → log rows, evals, checkpoints, the final export.

One process per device; under torchrun every rank runs this same function (DDP). Rank 0 logs and
saves; every rank reads a disjoint slice of the data. A run is a pure function of its config and
seed: ``N`` steps straight and ``N/2`` + ``--resume`` + ``N/2`` give identical losses on CPU fp32.

Read top to bottom: :func:`pretrain` and its loop, the run state, the set-up, one step, the log
window, eval, and the ways out (a pause that checkpoints, or the finish). What the objective is (MLM, or
MLM + NSP) is :mod:`~fastbert.pretrain.objective`'s; files on disk :mod:`~fastbert.pretrain.checkpoint`'s; the update
and its divergence rule :mod:`fastbert.training.update`'s.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fastbert import backend
from fastbert.config import BertConfig
from fastbert.device import Precision, resolve_precision
from fastbert.pretrain import distributed
from fastbert.pretrain.baselines import CountBaselines
from fastbert.pretrain.batches import eval_batches, load_data, to_device, train_batches
from fastbert.pretrain.checkpoint import PRETRAINING_RECORD, Checkpointer
from fastbert.pretrain.config import Phase, PretrainConfig, PretrainResult
from fastbert.pretrain.distributed import log
from fastbert.pretrain.flops import peak_tflops, training_flops
from fastbert.pretrain.interrupts import StopRequests
from fastbert._folder_lock import FolderLock
from fastbert.pretrain.metrics import MetricsLog
from fastbert.pretrain.objective import OBJECTIVES, Objective
from fastbert.pretrain.rng import rng_state, seed_everything, torch_rng_state
from fastbert.training.optim import build_optimizer
from fastbert.training.schedule import build_scheduler, warmup_steps
from fastbert.training.update import Updater


def pretrain(config: PretrainConfig) -> PretrainResult:
    config.validate()
    info = distributed.setup(config.device)
    try:
        return _train(config, info)
    finally:
        distributed.cleanup(info)


def _train(config: PretrainConfig, info: distributed.DistInfo) -> PretrainResult:
    out = _output_folder(config)
    with contextlib.ExitStack() as stack:
        if info.is_main:
            stack.enter_context(FolderLock(out))
        stack.enter_context(backend.use(config.backend))
        stop = stack.enter_context(StopRequests())  # a signal during set-up stops at once: StopNow
        run = _set_up(config, info, out, stop)
        stop.defer()
        try:
            pause = None  # None: ran to the end; True: a signal or Ctrl-C; False: --stop-at
            try:
                while run.step < config.max_steps:
                    if _stop_requested(run):
                        pause = True
                        break
                    output = _train_step(run)
                    if run.step % config.log_every == 0 or run.step == config.max_steps:
                        _log_window(run, output)
                    if config.eval_batches and (run.step % config.eval_every == 0 or run.step == config.max_steps):
                        _eval(run)
                    if run.step == config.stop_at and run.step < config.max_steps:
                        pause = False  # a planned pause
                        break
                    if run.step % config.save_every == 0 and run.step < config.max_steps:
                        _checkpoint(run)
            except KeyboardInterrupt:  # a second signal mid-step, or Ctrl-C where the handlers are not ours
                if run.phase == "saving":
                    raise  # stopped during a save: at once, not by saving again
                pause = True
            # Outside the except: a signal during the exit save stops at once (the save is not restarted).
            if pause is not None:
                return _pause(run, interrupted=pause)
        finally:
            run.metrics.close()
        return _finish(run)


# --- the run state ---------------------------------------------------------------------------------
@dataclass
class _Window:
    """Throughput since the last log row, counted from the CPU batches (the step never waits on the device)."""

    model_config: BertConfig
    peak_tflops: float | None          # the device's GEMM ceiling; MFU is logged when it is known
    tokens: int = 0
    flops: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def count(self, cpu_batch: dict[str, Any]) -> None:
        self.tokens += int(cpu_batch["attention_mask"].sum())
        if self.peak_tflops is not None:
            self.flops += training_flops(self.model_config, cpu_batch["attention_mask"],
                                         cpu_batch["masked_positions"].numel(), cpu_batch.get("cu_seqlens"))

    def restart(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()


@dataclass
class _Run:
    """Everything one training run carries from step to step (built by :func:`_set_up`)."""

    config: PretrainConfig
    info: distributed.DistInfo
    objective: Objective
    data: Any
    model: torch.nn.Module             # the bare model: saved, evaluated, exported
    train_model: torch.nn.Module       # what the step calls: the model, under DDP and/or torch.compile
    precision: Precision
    updater: Updater                   # optimizer, schedule, loss scaler, the step count, divergence flags
    checkpointer: Checkpointer
    length_phase: Phase                # the --phases entry (sequence length) the batches are of
    batches: Iterator[dict]            # collated CPU batches of that phase
    held_out: dict[int, "_HeldOut"]    # per sequence length of the run: the eval batches and their baselines
    metrics: MetricsLog
    window: _Window
    stop: StopRequests
    result: PretrainResult
    phase: str = "between"             # "forward" (weights untouched yet) | "update" | "between" steps | "saving"
    rng_before_step: dict[str, Any] | None = None
    stop_agreed: bool = False          # DDP: every rank has seen the stop request (agreed on log steps)

    @property
    def step(self) -> int:
        return self.updater.step

    @property
    def device(self) -> torch.device:
        return self.info.device


@dataclass
class _HeldOut:
    batches: list[dict]                # collated once
    baselines: dict[str, float]        # the count baselines on their [MASK] targets (printed beside the eval)


@dataclass
class _StepOutput:
    """One optimisation step's figures, still on the device (read only on log steps)."""

    losses: dict[str, torch.Tensor]    # "loss" and the objective's parts
    grad_norm: torch.Tensor
    accuracy: dict[str, torch.Tensor]  # of the last micro-batch


# --- set-up ----------------------------------------------------------------------------------------
def _output_folder(config: PretrainConfig) -> Path:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it will hold data/, checkpoints/, final/)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _model_config(config: PretrainConfig, data) -> tuple[BertConfig, Path | None]:
    """The model's config, and the checkpoint folder to start from (None: a fresh model)."""
    path = Path(config.model)
    overrides: dict[str, Any] = {}
    if config.dropout is not None:
        overrides.update(hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
    if path.is_dir():
        if config.init_range is not None:  # what the heads the checkpoint lacks start from
            overrides["initializer_range"] = config.init_range
        model_config = BertConfig.from_pretrained(path, **overrides)
        if model_config.vocab_size < data.vocab_size:
            raise ValueError(f"the model at {path} has vocab_size {model_config.vocab_size}, smaller than the "
                             f"data's vocabulary ({data.vocab_size})")
        start = path
    else:
        # A fresh model sized for the data's vocabulary (rounded up to a multiple of 8 for tensor cores).
        preset = BertConfig.from_pretrained(config.model)
        # 1/sqrt(hidden) by default: attention logits then start with a spread of ~1, so heads can form
        # early; at BERT's 0.02 every softmax starts flat (docs/pretrain_sweep.md).
        overrides.setdefault("hidden_dropout_prob", 0.0)
        overrides.setdefault("attention_probs_dropout_prob", 0.0)
        model_config = BertConfig.from_pretrained(
            config.model, vocab_size=int(math.ceil(data.vocab_size / 8) * 8), pad_token_id=data.pad_id,
            initializer_range=config.init_range or preset.hidden_size ** -0.5, **overrides)
        start = None
    if config.longest_seq_len > model_config.max_position_embeddings:
        raise ValueError(f"--seq-len {config.longest_seq_len} is above the model's max_position_embeddings "
                         f"({model_config.max_position_embeddings})")
    return model_config, start


def _set_up(config: PretrainConfig, info: distributed.DistInfo, out: Path, stop: StopRequests) -> _Run:
    """Data, model, updater, the checkpoint to resume from, the batch streams; RNG restored last."""
    device = info.device
    objective = OBJECTIVES[config.objective]
    precision = resolve_precision(config.precision, device)
    data = load_data(config, out, info)
    model_config, start_from = _model_config(config, data)
    checkpointer = Checkpointer(config, info, data)
    checkpointer.claim(model_config)

    seed_everything(config.seed + info.rank)
    if start_from is None:
        model = objective.model_class(model_config)
    else:
        model, loading = objective.model_class.from_pretrained(start_from, config=model_config,
                                                               output_loading_info=True)
        if loading.missing_keys:  # e.g. a bare encoder: its pre-training heads start fresh
            heads = sorted({".".join(key.split(".")[:2]) for key in loading.missing_keys})
            log(info, f"{start_from} holds no {', '.join(heads)}: initialised fresh (std "
                      f"{model_config.initializer_range:g}); the MLM decoder is tied to the word embeddings")
    model.to(device).train()
    optimizer = build_optimizer(model, config.optimizer, config.peak_lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=warmup_steps(config.warmup, config.max_steps),
                                max_steps=config.max_steps, schedule=config.schedule)
    updater = Updater(model.parameters(), optimizer, scheduler, precision, clip=config.clip)
    resumed = checkpointer.find_resume_point(model, updater)
    checkpointer.record_run(model_config)
    if resumed is not None:
        checkpointer.restore(resumed, model, updater)
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    train_set, batches = train_batches(config, data, info, updater.step, objective.random_next_prob)
    held_out = _held_out_sets(config, data, device, objective)
    if resumed is not None:
        checkpointer.restore_rng(resumed)  # last: nothing above may shift the dropout stream
    metrics = MetricsLog(out, info.is_main, config.progress, config.max_steps, updater.step)
    if resumed is not None:
        # Rows after this one continue from step N; readers drop the older rows past N (a fallback re-runs them).
        metrics.log({"resumed_from": updater.step})
    log(info, f"pre-training {config.model}: {sum(p.numel() for p in updater.params) / 1e6:.1f} M parameters, "
              f"{info.world_size} process(es) on {device}, precision {precision.name}, backend {config.backend}, "
              f"{len(train_set):,} training pairs per epoch, output {out}")
    return _Run(config=config, info=info, objective=objective, data=data, model=model, train_model=train_model, precision=precision,
                updater=updater, checkpointer=checkpointer, length_phase=config.phase_at(updater.step), batches=batches,
                held_out=held_out, metrics=metrics,
                window=_Window(model_config, peak_tflops(device)), stop=stop,
                result=PretrainResult(out=out, final_dir=None, steps_done=updater.step))


def _held_out_sets(config: PretrainConfig, data, device: torch.device, objective: Objective) -> dict[int, _HeldOut]:
    """The eval batches of each phase's sequence length, with what counting training tokens scores on
    their [MASK] targets (:mod:`~fastbert.pretrain.baselines`). All made at set-up: a resumed run and a
    straight one then draw the same random numbers before the first step."""
    if not config.eval_batches:
        return {}
    from fastbert.data.pairs import eval_documents

    train_documents = np.setdiff1d(np.arange(data.num_documents), eval_documents(data.num_documents,
                                                                                 config.eval_fraction))
    counts = CountBaselines.fit(data, train_documents)
    held_out = {}
    for seq_len in dict.fromkeys(phase.seq_len for phase in config.phase_plan):
        batches = eval_batches(config, data, device, objective.random_next_prob, seq_len)
        held_out[seq_len] = _HeldOut(batches, counts.score(batches, data.mask_id))
    return held_out


# --- one optimisation step -------------------------------------------------------------------------
def _train_step(run: _Run) -> _StepOutput:
    """grad_accum micro-batches forward + backward, then the update (clip, optimizer, schedule).

    Nothing here waits on the device: the losses and the divergence flags stay device tensors."""
    config, info, updater = run.config, run.info, run.updater
    if run.step >= run.length_phase.end:
        _next_length_phase(run)
    # Taken before this step's dropout draws: an interrupt before the update checkpoints this state.
    # (Only torch's generators: the step draws from no other, and NumPy's get_state costs ~0.1 ms.)
    run.rng_before_step = torch_rng_state()
    run.phase = "forward"
    losses = {name: torch.zeros((), device=run.device) for name in ("loss", *run.objective.loss_parts)}
    for micro in range(config.grad_accum):
        cpu_batch = next(run.batches)
        run.window.count(cpu_batch)
        batch = to_device(run.objective.model_inputs(cpu_batch), run.device)
        # DDP: all-reduce gradients only on the last micro-step of an accumulation.
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last or not info.distributed else run.train_model.no_sync():
            with run.precision.autocast():
                output = run.train_model(**batch)
            updater.backward(output.loss / config.grad_accum)
        for name in losses:
            losses[name] += getattr(output, name).detach() / config.grad_accum
    run.phase = "update"
    grad_norm = updater.update(losses["loss"])
    run.phase = "between"
    run.metrics.advance()
    return _StepOutput(losses, grad_norm, run.objective.batch_accuracy(output, batch))


def _next_length_phase(run: _Run) -> None:
    """--phases: the batches of the next sequence length, from that phase's first sample."""
    shutdown = getattr(run.batches, "_shutdown_workers", None)  # a DataLoader iterator's worker processes
    if shutdown is not None:
        shutdown()
    run.length_phase = run.config.phase_at(run.step)
    _, run.batches = train_batches(run.config, run.data, run.info, run.step, run.objective.random_next_prob)
    log(run.info, f"\nstep {run.step}: sequence length {run.length_phase.seq_len} until step {run.length_phase.end}")


# --- the log window --------------------------------------------------------------------------------
def _log_window(run: _Run, output: _StepOutput) -> None:
    """One metrics row: this step's figures, the window's throughput (all ranks), the fp16 loss scale;
    then the divergence check (the row is written first, so it shows what went wrong)."""
    info, window, updater = run.info, run.window, run.updater
    # The stop request rides along with the throughput sum: under DDP every rank stops at the same step.
    totals = distributed.all_reduce_sum(
        torch.tensor([float(window.tokens), window.flops, float(run.stop.signal is not None)], dtype=torch.float64,
                     device=run.device), info).tolist()
    run.stop_agreed = totals[2] > 0
    elapsed = time.perf_counter() - window.start
    figures = {**output.losses, "grad_norm": output.grad_norm, **output.accuracy}
    values = torch.stack([value.float() for value in figures.values()]).tolist()  # one device read
    record = {"step": run.step, **dict(zip(figures, values)), "lr": updater.scheduler.get_last_lr()[0],
              "tokens_per_s": totals[0] / elapsed, "elapsed_s": elapsed}
    loss_scale = updater.loss_scale()
    if loss_scale is not None:
        record["loss_scale"] = loss_scale
        record["skipped_steps"] = int(updater.skipped_steps)
    if window.peak_tflops is not None:
        record["mfu"] = totals[1] / elapsed / (window.peak_tflops * info.world_size * 1e12)
    run.metrics.log(record)
    run.result.losses.append(record["loss"])
    window.restart()
    updater.check_divergence(loss_scale)


def _stop_requested(run: _Run) -> bool:
    """A SIGINT/SIGTERM arrived: alone, stop after this step; under DDP, once all ranks agreed (log steps)."""
    return run.stop_agreed if run.info.distributed else run.stop.signal is not None


# --- eval ------------------------------------------------------------------------------------------
def _eval(run: _Run) -> None:
    """The held-out eval (see :meth:`Objective.evaluate`) at the current phase's sequence length, beside
    the count baselines, logged as its own metrics row."""
    seq_len = run.length_phase.seq_len
    held_out = run.held_out[seq_len]
    run.result.last_eval = {**run.objective.evaluate(run.model, held_out.batches, run.device, run.precision.dtype,
                                                     mask_token_id=run.data.mask_id), **held_out.baselines,
                            "seq_len": seq_len}
    run.metrics.log({"step": run.step, **run.result.last_eval})
    run.window.start = time.perf_counter()  # eval time is not training throughput


# --- the ways out ----------------------------------------------------------------------------------
def _checkpoint(run: _Run, rng: dict[str, Any] | None = None) -> None:
    """Save after this step (``rng``: the RNG state to store, by default the current one)."""
    phase, run.phase = run.phase, "saving"  # left so when a second signal stops the save: see _train
    run.checkpointer.save(run.model, run.updater, rng if rng is not None else rng_state())
    run.phase = phase
    run.window.start = time.perf_counter()  # save time is not training throughput


def _pause(run: _Run, interrupted: bool) -> PretrainResult:
    """--stop-at, a signal or Ctrl-C: checkpoint a consistent state, so --resume continues exactly."""
    result = run.result
    result.interrupted = interrupted
    result.signal = run.stop.name or ("SIGINT" if interrupted else None)  # a bare KeyboardInterrupt is Ctrl-C
    what = f"{run.stop.name} received: stopped" if run.stop.signal is not None else \
        "interrupted" if interrupted else "stopped (--stop-at)"
    if run.phase == "update":
        # Some weights may already hold the update of a step that is not counted: nothing consistent to save.
        log(run.info, f"\n{what} while updating the weights of step {run.step + 1}: no checkpoint written; "
                      "--resume continues from the last one")
    elif run.step > run.checkpointer.saved_step:
        log(run.info, f"\n{what} at step {run.step}: writing a checkpoint so that --resume continues from here")
        # Mid-step (weights untouched yet) the state is that of the step's start, its RNG state included.
        _checkpoint(run, {**rng_state(), **run.rng_before_step} if run.phase == "forward" else None)
    elif run.step > 0:
        log(run.info, f"\n{what} at step {run.step}: --resume continues from the checkpoint of this step")
    else:
        log(run.info, f"\n{what} before the first step: nothing to save")
    result.steps_done = run.step
    return result


def _finish(run: _Run) -> PretrainResult:
    """The last checkpoint, then model + tokenizer exported to OUT/final and the end-of-run report."""
    from fastbert.data.pairs import eval_documents
    from fastbert.pretrain import showcase

    _checkpoint(run)
    result = run.result
    if run.info.is_main:
        record = {"objective": run.objective.name, "steps": run.step,
                  "untrained_heads": [] if run.objective.next_sentence else ["cls.seq_relationship"]}
        result.final_dir = run.checkpointer.export_final(run.model, record)
        log(run.info, f"done: {run.step} steps; model + tokenizer in {result.final_dir}")
        if not run.objective.next_sentence:
            log(run.info, "trained on masked-LM only: the next-sentence head (cls.seq_relationship) is untrained "
                          f"(said so in {result.final_dir / PRETRAINING_RECORD})")
        if result.last_eval is not None:
            log(run.info, run.objective.eval_summary(result.last_eval, run.step))
        held_out = eval_documents(run.data.num_documents, run.config.eval_fraction)
        log(run.info, showcase.write_showcase(result.out, run.model, run.data, held_out,
                                              max_seq_len=run.config.phase_plan[-1].seq_len, seed=run.config.seed,
                                              device=run.device).rstrip())
    result.steps_done = run.step
    result.param_checksum = float(sum(p.detach().double().sum() for p in run.model.parameters()))
    return result
