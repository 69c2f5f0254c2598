"""`fastbert finetune`: sequence classification on a CSV/TSV/JSONL file, from a BERT checkpoint directory.

Reads labelled examples, tokenizes them with the checkpoint's own tokenizer files (``tokenizer.json``
or ``vocab.txt``, through the ``tokenizers`` package: transformers is not needed), fine-tunes
:class:`fastbert.BertForSequenceClassification` (AdamW, linear warm-up and decay, gradient clipping,
optional bf16/fp16 autocast), reports eval accuracy after every epoch and saves a directory that
transformers loads (config with ``id2label``, ``model.safetensors``, the tokenizer files).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastbert import weights
from fastbert.config import BertConfig
from fastbert.modeling import BertForSequenceClassification
from fastbert.pretrain.optim import build_optimizer

logger = logging.getLogger("fastbert")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSON_LINES = (".jsonl", ".ndjson", ".json")


@dataclass
class FinetuneConfig:
    model: str  # checkpoint directory: config.json + weights + tokenizer.json or vocab.txt
    train: str
    eval: str
    output: str | None = None  # default: ./<model dir name>-finetuned
    text_col: str = "text"
    text_pair_col: str | None = None
    label_col: str = "label"
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    seq_len: int = 128
    precision: str = "auto"  # auto = bf16 on a GPU that has it, else fp32
    device: str = "auto"
    seed: int = 0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.seq_len < 3:
            raise ValueError(f"--seq-len must be at least 3 ([CLS] text [SEP]), got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"--max-steps must be a positive integer, got {self.max_steps!r}")


@dataclass
class Example:
    text: str
    pair: str | None
    label: str
    where: str  # "file:line", for error messages


@dataclass
class FinetuneResult:
    labels: list[str]
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    eval_accuracy: list[float] = field(default_factory=list)  # per epoch
    steps: int = 0
    output: Path | None = None


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def _label_text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)) or (isinstance(value, float) and math.isfinite(value)):
        text = str(value).strip()
        if text:
            return text
    raise ValueError(f"{where}: the label is missing or not a string/number (got {value!r})")


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must hold text, got {value!r}")
    return value


def _rows(path: Path):
    """(line number, row dict) for every record of a CSV/TSV/JSONL file, and the columns seen."""
    suffix = path.suffix.lower()
    if suffix in _DELIMITERS:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=_DELIMITERS[suffix])
            if not reader.fieldnames:
                raise ValueError(f"{path} is empty: expected a header line with the column names")
            columns = list(reader.fieldnames)
            return [(reader.line_num, row) for row in reader], columns
    if suffix in _JSON_LINES:
        rows, columns = [], {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                columns.update(dict.fromkeys(record))
                rows.append((number, record))
        return rows, list(columns)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")


def read_examples(path: str | Path, text_col: str = "text", text_pair_col: str | None = None,
                  label_col: str = "label") -> list[Example]:
    """Labelled examples of a CSV/TSV (header line) or JSONL (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows, columns = _rows(path)
    if not rows:
        raise ValueError(f"{path} has no examples")
    wanted = [c for c in (text_col, text_pair_col, label_col) if c is not None]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; the file has columns "
                         f"{', '.join(map(repr, columns))} (choose with --text-col / --text-pair-col / --label-col)")
    examples = []
    for number, row in rows:
        where = f"{path}:{number}"
        for column in wanted:
            if column not in row or row[column] is None:  # a short CSV row, or a JSON object without the key
                raise ValueError(f"{where}: no value for column {column!r}")
        pair = _text(row[text_pair_col], text_pair_col, where) if text_pair_col else None
        examples.append(Example(_text(row[text_col], text_col, where), pair, _label_text(row[label_col], where),
                                where))
    return examples


def label_set(examples: list[Example]) -> list[str]:
    """The training labels, sorted (numerically when every label is an integer)."""
    labels = set(e.label for e in examples)
    try:
        ordered = sorted(labels, key=int)
    except ValueError:
        ordered = sorted(labels)
    if len(ordered) < 2:
        raise ValueError(f"the training data has a single label ({ordered[0]!r}); classification needs at least two")
    return ordered


def check_labels(examples: list[Example], labels: list[str]) -> None:
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise ValueError(f"{e.where}: label {e.label!r} is not in the training labels "
                             f"({', '.join(map(repr, labels))})")


# ---------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------
def load_tokenizer(model_dir: Path, seq_len: int):
    """The checkpoint's tokenizer (``tokenizer.json`` preferred, else ``vocab.txt``), truncating to
    ``seq_len`` and not padding (batches are padded to their own longest example)."""
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as err:  # a malformed file: say which, not a Rust trace
            raise ValueError(f"cannot read {model_dir / 'tokenizer.json'}: {err}") from None
    elif (model_dir / "vocab.txt").is_file():
        from tokenizers import BertWordPieceTokenizer

        lowercase = True
        config_path = model_dir / "tokenizer_config.json"
        if config_path.is_file():
            lowercase = bool(json.loads(config_path.read_text(encoding="utf-8")).get("do_lower_case", True))
        tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=lowercase)
    else:
        raise FileNotFoundError(f"{model_dir} has no tokenizer files: expected tokenizer.json or vocab.txt")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=seq_len)
    return tokenizer


@dataclass
class Encoded:
    ids: list[list[int]]
    type_ids: list[list[int]]
    labels: torch.Tensor  # int64 (n,)


def encode(tokenizer, examples: list[Example], labels: list[str], config: BertConfig) -> Encoded:
    inputs = [(e.text, e.pair) if e.pair is not None else e.text for e in examples]
    encodings = tokenizer.encode_batch(inputs)
    ids = [enc.ids for enc in encodings]
    type_ids = [enc.type_ids for enc in encodings]
    top_id = max(max(x, default=0) for x in ids)
    if top_id >= config.vocab_size:
        raise ValueError(f"the tokenizer produced token id {top_id}, but the model's vocab_size is {config.vocab_size}: "
                         "the tokenizer files do not belong to this checkpoint")
    if max(max(t, default=0) for t in type_ids) >= config.type_vocab_size:
        raise ValueError(f"text pairs need token type 1, but the model has type_vocab_size={config.type_vocab_size}")
    index = {label: i for i, label in enumerate(labels)}
    return Encoded(ids, type_ids, torch.tensor([index[e.label] for e in examples], dtype=torch.long))


def collate(data: Encoded, rows: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of ``data`` padded to their longest: input_ids, attention_mask, token_type_ids, labels."""
    picked = rows.tolist()
    width = max(len(data.ids[i]) for i in picked)
    ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(picked), width), dtype=torch.long)
    mask = torch.zeros((len(picked), width), dtype=torch.long)
    for row, i in enumerate(picked):
        n = len(data.ids[i])
        ids[row, :n] = torch.tensor(data.ids[i])
        types[row, :n] = torch.tensor(data.type_ids[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": data.labels[rows]}


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
def load_model(model_dir: Path, labels: list[str]) -> BertForSequenceClassification:
    """A classifier for ``labels`` on the checkpoint's encoder. Pre-training heads in the checkpoint are
    ignored; a classifier trained for other labels is replaced by a fresh one."""
    config = BertConfig.from_pretrained(model_dir)
    extra = dict(config.extra)
    extra["id2label"] = {str(i): label for i, label in enumerate(labels)}
    extra["label2id"] = {label: i for i, label in enumerate(labels)}
    config = config.replace(num_labels=len(labels), problem_type="single_label_classification", extra=extra)
    model = BertForSequenceClassification(config)
    state = weights.read_state_dict(model_dir)
    own = model.state_dict()
    for key in [k for k in state if k.startswith("classifier.")]:
        if key in own and state[key].shape != own[key].shape:
            logger.info("finetune: %s has shape %s in the checkpoint; a new classifier is trained for %d labels",
                        key, tuple(state[key].shape), len(labels))
            del state[key]
    info = weights.load_state_dict_into(model, state, prefix="bert.")
    encoder_missing = [k for k in info.missing_keys if k.startswith(("bert.embeddings.", "bert.encoder."))]
    if encoder_missing:
        raise ValueError(f"{model_dir} does not hold a BERT encoder: missing {', '.join(encoder_missing[:4])}"
                         + (" ..." if len(encoder_missing) > 4 else ""))
    return model


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def _autocast(precision: str, device: torch.device):
    """(autocast context factory, GradScaler or None) for the requested precision."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def evaluate(model: BertForSequenceClassification, data: Encoded, batch_size: int, pad_id: int,
             device: torch.device, autocast) -> float:
    """Accuracy of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.ids), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(data.ids)))
            batch = {k: v.to(device) for k, v in collate(data, rows, pad_id).items()}
            labels = batch.pop("labels")
            with autocast():
                logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(data.ids)


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------
def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    cfg.validate()
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {cfg.model!r} is not a checkpoint directory")
    train_examples = read_examples(cfg.train, cfg.text_col, cfg.text_pair_col, cfg.label_col)
    eval_examples = read_examples(cfg.eval, cfg.text_col, cfg.text_pair_col, cfg.label_col)
    labels = label_set(train_examples)
    check_labels(eval_examples, labels)

    config = BertConfig.from_pretrained(model_dir)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    tokenizer = load_tokenizer(model_dir, cfg.seq_len)
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = config.pad_token_id if pad_id is None else pad_id
    train_data = encode(tokenizer, train_examples, labels, config)
    eval_data = encode(tokenizer, eval_examples, labels, config)

    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    model = load_model(model_dir, labels).to(device).train()
    autocast, scaler = _autocast(cfg.precision, device)
    optimizer = build_optimizer(model, "adamw", cfg.lr, cfg.weight_decay, eps=1e-8)  # no decay on biases/LayerNorm
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(cfg.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup
        else max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    print(f"finetune: {model_dir} → {len(labels)} labels {labels}; {len(train_examples)} train / "
          f"{len(eval_examples)} eval examples; {total_steps} steps on {device}")

    result = FinetuneResult(labels=labels)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        start, losses, seen = time.perf_counter(), [], 0
        order = torch.randperm(len(train_examples), generator=shuffle)
        for rows in order.split(cfg.batch_size):
            if result.steps >= total_steps:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in collate(train_data, rows, pad_id).items()}
            with autocast():
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise ValueError(f"the loss became {loss.item()} at step {result.steps + 1}; lower --lr")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(loss.item())
            seen += len(rows)
            result.steps += 1
        seconds = time.perf_counter() - start
        accuracy = evaluate(model, eval_data, cfg.batch_size, pad_id, device, autocast)
        mean_loss = sum(losses) / max(len(losses), 1)
        result.train_loss.append(mean_loss)
        result.eval_accuracy.append(accuracy)
        print(f"epoch {epoch}/{cfg.epochs}: train loss {mean_loss:.4f}, eval accuracy {accuracy:.4f} "
              f"({round(accuracy * len(eval_examples))}/{len(eval_examples)}), {seen / seconds:,.0f} examples/s")
        if result.steps >= total_steps:
            break

    output = Path(cfg.output) if cfg.output else Path.cwd() / f"{model_dir.resolve().name}-finetuned"
    model.save_pretrained(output)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, output / name)
    result.output = output
    print(f"saved to {output} (transformers: BertForSequenceClassification.from_pretrained({str(output)!r}))")
    return result
