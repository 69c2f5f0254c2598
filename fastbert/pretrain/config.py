"""What a pre-training run is asked to do (:class:`PretrainConfig`, also the ``fastbert pretrain``
flags) and what it reports back (:class:`PretrainResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastbert.backend import BACKENDS
from fastbert.device import DEVICES_HELP, PRECISION_HELP, PRECISIONS
from fastbert.options import MAX_LR, MAX_SEED, check_options, option
from fastbert.training.optim import OPTIMIZERS
from fastbert.training.schedule import SCHEDULES

# The tuned default peak lr per optimizer, for bert-tiny (docs/pretrain_sweep.md): AdamW 3e-3 at 4,096
# tokens a step (the default recipe), LAMB 2e-2 at batch 32 x 128; large models and batches want their own.
DEFAULT_LR = {"lamb": 2e-2, "adamw": 3e-3}
OBJECTIVE_NAMES = ("mlm", "mlm+nsp")
MAX_STEPS_DEFAULT = 1500


# Each eval batch is collated once and kept: 10 k batches of 32 pairs is already far past a useful eval.
MAX_EVAL_BATCHES = 10_000


@dataclass
class PretrainConfig:
    model: str = option("bert-tiny", help="preset name (bert-tiny, bert-base-uncased, ...) or a checkpoint dir")
    corpus: list[str] | None = option(
        None, help="text/.jsonl files or dirs, a datasets dir, or 'builtin' (default); prepared into OUT/data")
    data: str | None = option(None, help="a data dir made by `fastbert prepare` (instead of --corpus)")
    out: str = option("runs/pretrain", help="output dir: data/, checkpoints/, metrics.jsonl, final/")
    objective: str = option("mlm", choices=OBJECTIVE_NAMES,
                            help="mlm: masked-LM on contiguous text (RoBERTa, MosaicBERT, ModernBERT); mlm+nsp: "
                                 "BERT's, with next-sentence prediction. Both export a BertForPreTraining")
    max_steps: int = option(MAX_STEPS_DEFAULT, help="optimizer steps of the whole run", at_least=1)
    batch_size: int = option(128, help="sequences per device per micro-step", at_least=1)
    grad_accum: int = option(1, help="micro-steps per optimizer step (gradient accumulation)", at_least=1)
    seq_len: int = option(32, help="tokens per training pair", at_least=8)
    phases: str | None = option(None, help="sequence-length phases SEQ:STEPS,... (e.g. 32:900,128:100, as BERT "
                                           "trained 90%% of its steps at 128, then 512): one run, one schedule over "
                                           "their sum; replaces --seq-len and --max-steps")
    lr: float | None = option(None, above=0, at_most=MAX_LR, help="peak learning rate (default: 3e-3 AdamW, 2e-2 "
                                                                  "LAMB, tuned for bert-tiny)")
    warmup: float = option(0.05, help="< 1: fraction of max steps; >= 1: steps", at_least=0)
    schedule: str = option("linear", help="decay to zero after the warmup", choices=SCHEDULES)
    optimizer: str = option("adamw", help="AdamW or LAMB (FusedLAMB semantics)", choices=OPTIMIZERS)
    weight_decay: float = option(0.01, help="weight decay (not on biases and LayerNorm)", at_least=0)
    clip: float = option(1.0, help="global gradient-norm clip (0: off)", at_least=0)
    precision: str = option("auto", help=PRECISION_HELP, choices=PRECISIONS)
    seed: int = option(0, help="seed of the weights, data order, masks and dropout", at_least=0, at_most=MAX_SEED)
    log_every: int = option(10, help="steps between metrics rows", at_least=1)
    save_every: int = option(200, help="steps between checkpoints", at_least=1)
    keep: int = option(3, help="checkpoints to keep", at_least=1)
    eval_every: int = option(250, help="steps between held-out evals", at_least=1)
    # 20 x 128 held-out pairs: the binomial standard error of NSP accuracy is <= 1 point (MLM: ~0.3).
    eval_batches: int = option(20, help="held-out batches per eval (collated once, so memory follows)", at_least=0,
                               at_most=MAX_EVAL_BATCHES)
    eval_fraction: float = option(0.05, above=0, below=1,
                                  help="fraction of the documents held out for eval (spread over the corpus, "
                                       "never trained on)")
    resume: bool = option(False, help="continue from the newest valid checkpoint in --out")
    stop_at: int | None = option(None, at_least=1, help="stop after this step with a checkpoint (for time-limited "
                                                        "jobs); --resume continues to --max-steps")
    whole_word_mask: bool = option(False, help="mask all pieces of a word together")
    packing: bool = option(False, help="pack several pairs per row (needs the unpadded encoder)")
    compile: bool = option(False, help="torch.compile the model")
    backend: str = option("auto", help="the ops' implementation (as FASTBERT_BACKEND)", choices=BACKENDS)
    device: str = option("auto", help=f"{DEVICES_HELP}; under torchrun a bare cuda is each rank's LOCAL_RANK GPU")
    num_workers: int = option(2, help="DataLoader worker processes", at_least=0)
    vocab_size: int = option(8192, help="WordPiece size when a vocabulary is trained", at_least=1)
    tokenizer: str | None = option(None, help="vocab.txt or tokenizer.json to use instead of training one")
    mlm_probability: float = option(0.15, above=0, below=1,
                                    help="fraction of the tokens masked (BERT 0.15; 0.3-0.4 suit larger models)")
    init_range: float | None = option(None, above=0, at_most=1,
                                      help="std of a fresh model's weights (default: 1/sqrt(hidden_size), which "
                                           "lets attention form early; BERT's is 0.02); a --model checkpoint "
                                           "keeps its weights and initialises only missing heads with it")
    dropout: float | None = option(None, at_least=0, below=1,
                                   help="hidden and attention dropout (default: 0 for a fresh model, short runs "
                                        "do not overfit; a --model checkpoint's own)")
    short_seq_prob: float = option(0.1, help="fraction of pairs cut short", at_least=0, at_most=1, cli=False)
    progress: bool = option(True, help="no progress bar")

    def validate(self) -> None:
        check_options(self)
        if self.phases is not None:
            total = sum(steps for _, steps in parse_phases(self.phases))
            if self.max_steps not in (total, MAX_STEPS_DEFAULT):
                raise ValueError(f"--phases {self.phases} makes {total} steps, but --max-steps is {self.max_steps}: "
                                 "give one of them")
            self.max_steps = total  # the phases replace --max-steps (and --seq-len: see phase_plan)
        if self.stop_at is not None and self.stop_at > self.max_steps:
            raise ValueError(f"--stop-at must be in [1, --max-steps={self.max_steps}], got {self.stop_at}")
        if self.corpus and self.data:
            raise ValueError("give either --corpus (prepared on the fly) or --data (already prepared), not both")

    @property
    def phase_plan(self) -> tuple["Phase", ...]:
        """The run's phases in order (one of --seq-len x --max-steps without --phases)."""
        pairs = parse_phases(self.phases) if self.phases is not None else [(self.seq_len, self.max_steps)]
        plan, start = [], 0
        for seq_len, steps in pairs:
            plan.append(Phase(seq_len, start, start + steps))
            start += steps
        return tuple(plan)

    @property
    def phases_record(self) -> list[list[int]] | None:
        """--phases as [[seq_len, steps], ...] (None without it): what a checkpoint records and a resume
        must match."""
        return [list(pair) for pair in parse_phases(self.phases)] if self.phases is not None else None

    def phase_at(self, step: int) -> "Phase":
        """The phase that trains step ``step + 1`` (the last one once the run is done)."""
        return next((phase for phase in self.phase_plan if step < phase.end), self.phase_plan[-1])

    @property
    def longest_seq_len(self) -> int:
        return max(phase.seq_len for phase in self.phase_plan)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def samples_per_step(self) -> int:
        """Training pairs per optimizer step on each rank."""
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class Phase:
    """Steps ``start + 1 .. end`` of the run train on pairs of ``seq_len`` tokens."""

    seq_len: int
    start: int
    end: int


def parse_phases(text: str) -> list[tuple[int, int]]:
    """``"32:900,128:100"`` -> [(32, 900), (128, 100)]; a ValueError naming the part that is not SEQ:STEPS
    with SEQ >= 8 and STEPS >= 1."""
    pairs = []
    for part in str(text).split(","):
        fields = part.strip().split(":")
        try:
            seq_len, steps = (int(f) for f in fields) if len(fields) == 2 else (None, None)
        except ValueError:
            seq_len = steps = None
        if seq_len is None or seq_len < 8 or steps < 1:
            raise ValueError(f"--phases takes SEQ:STEPS,... with SEQ >= 8 and STEPS >= 1 (e.g. 32:900,128:100); "
                             f"{part.strip()!r} is not one")
        pairs.append((seq_len, steps))
    return pairs


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
