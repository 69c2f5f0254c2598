"""`fastbert finetune`: sequence classification on a CSV/TSV/JSONL file, from a BERT checkpoint directory.

Reads labelled examples, tokenizes them with the checkpoint's own tokenizer files (``tokenizer.json``
or ``vocab.txt``, through the ``tokenizers`` package: transformers is not needed), fine-tunes
:class:`fastbert.BertForSequenceClassification` with the training core pre-training uses
(:mod:`fastbert.training`: AdamW, linear warm-up and decay, gradient clipping, bf16/fp16 autocast, the
divergence rule), reports eval accuracy after every epoch and saves a directory that transformers
loads (config with ``id2label``, ``model.safetensors``, the tokenizer files, and ``finetune_run.json``:
what the run was), atomically: a failed save leaves the previous output as it was. An existing output
is replaced only when an earlier finetune wrote it.

The training loop reads nothing from the device per step: losses are summed on the device and read,
with the divergence flags, once per epoch.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastbert import weights
from fastbert.config import BertConfig
from fastbert.device import DEVICES_HELP, PRECISION_HELP, PRECISIONS, resolve_device, resolve_precision
from fastbert.modeling import BertForSequenceClassification
from fastbert.options import MAX_LR, MAX_SEED, check_options, option
from fastbert.training.export import check_replaceable, export_folder
from fastbert.training.optim import build_optimizer
from fastbert.training.schedule import build_scheduler, warmup_steps
from fastbert.training.update import Updater

logger = logging.getLogger("fastbert")

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("config.json", "model.safetensors")  # what save_pretrained writes
# Written into every output: what the run was (model, data, settings, labels), and the mark that lets a
# later finetune replace the folder. A folder without it holds someone else's model: refused.
RUN_RECORD = "finetune_run.json"
_JSON_LINES = (".jsonl", ".ndjson", ".json")


@dataclass
class FinetuneConfig:
    model: str = option(help="checkpoint directory (config.json, weights, tokenizer.json or vocab.txt)")
    train: str = option(help="training examples: .csv, .tsv (header line) or .jsonl")
    eval: str = option(help="evaluation examples, same format and columns")
    output: str | None = option(None, help="where to save the model (default: ./<model>-finetuned)")
    text_col: str = option("text", help="column with the text")
    text_pair_col: str | None = option(None, help="column with the second text of a pair, if any")
    label_col: str = option("label", help="column with the label (a whole number is one label however "
                                          "spelled: 1, 1.0 and 01 are all 1)")
    epochs: int = option(3, help="passes over the training examples", at_least=1)
    lr: float = option(5e-5, help="peak learning rate (AdamW, linear schedule)", above=0, at_most=MAX_LR)
    batch_size: int = option(32, help="examples per optimizer step", at_least=1)
    seq_len: int = option(128, help="longest input in tokens ([CLS] text [SEP]); longer ones are cut", at_least=3)
    precision: str = option("auto", help=PRECISION_HELP, choices=PRECISIONS)
    device: str = option("auto", help=DEVICES_HELP)
    seed: int = option(0, help="seed of the classifier's weights, the shuffling and dropout", at_least=0,
                       at_most=MAX_SEED)
    weight_decay: float = option(0.01, help="AdamW weight decay (not on biases/LayerNorm)", at_least=0)
    warmup_ratio: float = option(0.1, help="fraction of the steps spent warming up", at_least=0, below=1)
    max_steps: int | None = option(None, help="stop after this many optimizer steps (smoke runs)", at_least=1)

    def validate(self) -> None:
        check_options(self)


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
    """A label as text; a whole number however spelled (1, 1.0, "01", JSON 1.0) is one label, "1"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)) or (isinstance(value, float) and math.isfinite(value)):
        text = str(value).strip()
        if text:
            return _whole_number(text) or text
    raise ValueError(f"{where}: the label is missing or not a string/number (got {value!r})")


def _whole_number(text: str) -> str | None:
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number) or number != int(number) or abs(number) >= 2**53:
        return None  # "inf", "nan", 0.5, and integers a float cannot hold keep their spelling
    return str(int(number))


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must hold text, got {value!r}")
    if not value.strip():
        # Nothing to classify: most likely a wrong column or a broken row; refuse instead of training on it.
        raise ValueError(f"{where}: column {column!r} is empty; remove the row or fill in its text")
    return value


def _decoded_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped); anything else is refused by line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
                         "UTF-8") from None


def _lines(text: str) -> list[str]:
    # Only \n (and \r\n) end a line: str.splitlines would also split at form feeds, U+2028 and the like,
    # which can occur inside a text.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _csv_rows(path: Path, text: str):
    """CSV: RFC 4180 quoting (a quoted field may hold commas and line breaks)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, header = [], None
    try:
        for fields in reader:
            if header is None:
                header = fields
                if not header:
                    break
            elif not fields:  # a blank line
                continue
            elif len(fields) > len(header):
                raise ValueError(f"{path}:{reader.line_num}: {len(fields)} fields but the header has "
                                 f"{len(header)}; quote a field that holds a comma")
            else:
                rows.append((reader.line_num, dict(zip(header, fields))))  # a short row lacks the last columns
    except csv.Error as err:  # an unclosed quote, a stray character after a closing one
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not header:
        raise ValueError(f"{path} is empty: expected a header line with the column names")
    _check_unique_columns(path, header)
    return rows, header


def _check_unique_columns(path: Path, header: list[str]) -> None:
    """A column named twice would silently take its last value: refused."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: the header names column {', '.join(map(repr, repeated))} more than once")


def _tsv_rows(path: Path, text: str):
    """TSV as GLUE and most tools write it: one record per line, fields split at every tab, no quoting
    (a field may start with a quote character and is kept as written)."""
    lines = _lines(text)
    if not lines or not lines[0].strip():
        raise ValueError(f"{path} is empty: expected a header line with the column names")
    header = lines[0].split("\t")
    _check_unique_columns(path, header)
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            # A tab inside a text (or a missing field) would shift the columns: refuse rather than guess.
            raise ValueError(f"{path}:{number}: {len(fields)} tab-separated fields but the header has "
                             f"{len(header)}; a text must not contain a tab")
        rows.append((number, dict(zip(header, fields))))
    return rows, header


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise KeyError(key)  # json.loads would keep the last value silently
    return dict(pairs)


def _json_lines_rows(path: Path, text: str):
    rows, columns = [], {}
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_object_without_repeats)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line") from None
        except KeyError as err:
            raise ValueError(f"{path}:{number}: the object names key {err.args[0]!r} more than once") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        columns.update(dict.fromkeys(record))
        rows.append((number, record))
    return rows, list(columns)


def _rows(path: Path):
    """(line number, row dict) for every record of a CSV/TSV/JSONL file, and the columns seen."""
    suffix = path.suffix.lower()
    readers = {".csv": _csv_rows, ".tsv": _tsv_rows, **dict.fromkeys(_JSON_LINES, _json_lines_rows)}
    if suffix not in readers:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    return readers[suffix](path, _decoded_text(path))


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
    """The checkpoint's tokenizer (``tokenizer.json`` preferred, else ``vocab.txt``), adding [CLS]/[SEP]
    as BERT does, truncating to ``seq_len`` and not padding (batches are padded to their own longest
    example). A ``tokenizer.json`` without a post-processor (older `fastbert prepare` output) gets BERT's."""
    if (model_dir / "tokenizer.json").is_file():
        from fastbert.data.tokenizer import read_bert_tokenizer

        tokenizer, _ = read_bert_tokenizer(model_dir / "tokenizer.json")
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


def encode(tokenizer, examples: list[Example], labels: list[str], model_config: BertConfig) -> Encoded:
    inputs = [(e.text, e.pair) if e.pair is not None else e.text for e in examples]
    encodings = tokenizer.encode_batch(inputs)
    ids = [enc.ids for enc in encodings]
    type_ids = [enc.type_ids for enc in encodings]
    top_id = max(max(x, default=0) for x in ids)
    if top_id >= model_config.vocab_size:
        raise ValueError(f"the tokenizer produced token id {top_id}, but the model's vocab_size is {model_config.vocab_size}: "
                         "the tokenizer files do not belong to this checkpoint")
    if max(max(t, default=0) for t in type_ids) >= model_config.type_vocab_size:
        raise ValueError("text pairs need token type 1, but the model has type_vocab_size="
                         f"{model_config.type_vocab_size}")
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
    model_config = BertConfig.from_pretrained(model_dir)
    extra = dict(model_config.extra)
    extra["id2label"] = {str(i): label for i, label in enumerate(labels)}
    extra["label2id"] = {label: i for i, label in enumerate(labels)}
    model_config = model_config.replace(num_labels=len(labels), problem_type="single_label_classification",
                                        extra=extra)
    model = BertForSequenceClassification(model_config)
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
def _written_by_finetune(folder: Path) -> bool:
    try:
        record = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("fastbert") == "finetune"


def check_output(output: Path, saved_files: tuple[str, ...]) -> None:
    """Refuse an ``--output`` that the save would lose something of: a file, a folder holding other files,
    or a model that no finetune wrote (someone's ``config.json`` and weights)."""
    check_replaceable(output, saved_files)
    if output.is_dir() and any(output.iterdir()) and not _written_by_finetune(output):
        raise ValueError(f"{output} holds a model that `fastbert finetune` did not write (no {RUN_RECORD}): the "
                         "save would replace it; choose another output folder, or empty this one")


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    config.validate()
    model_dir = Path(config.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {config.model!r} is not a checkpoint directory")
    output = Path(config.output) if config.output else Path.cwd() / f"{model_dir.resolve().name}-finetuned"
    if output.resolve() == model_dir.resolve():  # the export would replace the weights it starts from
        raise ValueError(f"--output {config.output} is the --model folder; choose another output folder")
    tokenizer_files = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    saved_files = (*MODEL_FILES, RUN_RECORD, *(path.name for path in tokenizer_files))
    check_output(output, saved_files)  # before training: the save at the end must not be refused
    train_examples = read_examples(config.train, config.text_col, config.text_pair_col, config.label_col)
    eval_examples = read_examples(config.eval, config.text_col, config.text_pair_col, config.label_col)
    labels = label_set(train_examples)
    check_labels(eval_examples, labels)

    model_config = BertConfig.from_pretrained(model_dir)
    if config.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"--seq-len {config.seq_len} is longer than the model's max_position_embeddings "
                         f"({model_config.max_position_embeddings})")
    tokenizer = load_tokenizer(model_dir, config.seq_len)
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = model_config.pad_token_id if pad_id is None else pad_id
    train_data = encode(tokenizer, train_examples, labels, model_config)
    eval_data = encode(tokenizer, eval_examples, labels, model_config)

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model = load_model(model_dir, labels).to(device).train()
    precision = resolve_precision(config.precision, device)
    optimizer = build_optimizer(model, "adamw", config.lr, config.weight_decay, eps=1e-8)  # no decay on biases/LN
    total_steps = math.ceil(len(train_examples) / config.batch_size) * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = build_scheduler(optimizer, warmup=warmup_steps(config.warmup_ratio, total_steps),
                                max_steps=total_steps, schedule="linear")
    updater = Updater(model.parameters(), optimizer, scheduler, precision, clip=1.0, warmup_flag="--warmup-ratio")
    print(f"finetune: {model_dir} → {len(labels)} labels {labels}; {len(train_examples)} train / "
          f"{len(eval_examples)} eval examples; {total_steps} steps on {device}")

    result = FinetuneResult(labels=labels)
    shuffle = torch.Generator().manual_seed(config.seed)
    for epoch in range(1, config.epochs + 1):
        start, steps, seen = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device, read once
        for rows in torch.randperm(len(train_examples), generator=shuffle).split(config.batch_size):
            if updater.step >= total_steps:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in collate(train_data, rows, pad_id).items()}
            with precision.autocast():
                loss = model(**batch).loss
            updater.backward(loss)
            updater.update(loss.detach())
            loss_sum += loss.detach()
            steps += 1
            seen += len(rows)
        updater.check_divergence(updater.loss_scale())  # the epoch's one read of the device flags
        mean_loss = float(loss_sum) / max(steps, 1)
        seconds = time.perf_counter() - start
        accuracy = evaluate(model, eval_data, config.batch_size, pad_id, device, precision.autocast)
        result.train_loss.append(mean_loss)
        result.eval_accuracy.append(accuracy)
        print(f"epoch {epoch}/{config.epochs}: train loss {mean_loss:.4f}, eval accuracy {accuracy:.4f} "
              f"({round(accuracy * len(eval_examples))}/{len(eval_examples)}), {seen / seconds:,.0f} examples/s")
        if updater.step >= total_steps:
            break
    result.steps = updater.step

    updater.check_saveable()
    check_output(output, saved_files)
    record = json.dumps({"fastbert": "finetune", "model": str(model_dir.resolve()), "labels": labels,
                         "steps": result.steps, "config": asdict(config)}, indent=1, default=str)  # Path fields

    def write(folder: Path) -> None:
        from fastbert.data.tokenizer import copy_tokenizer_files

        model.save_pretrained(folder)
        copy_tokenizer_files(tokenizer_files, folder)
        (folder / RUN_RECORD).write_text(record + "\n", encoding="utf-8")

    result.output = export_folder(output, write)
    print(f"saved to {output} (transformers: BertForSequenceClassification.from_pretrained({str(output)!r}))")
    return result
