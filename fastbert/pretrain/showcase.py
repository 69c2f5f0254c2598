"""What a pre-training run learned, shown at its end: held-out sentences with one word masked beside the
model's top-3 guesses, and a PNG of the training and eval curves.

Both read only what the run already has: the model, the held-out documents of the eval split (never
seen in training) and ``metrics.jsonl``. The sentences and the masked word are drawn from a generator
seeded by the run seed, so the same run shows the same examples.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SHOWCASE_FILE = "showcase.txt"
CURVES_FILE = "curves.png"
_MIN_SENTENCE_TOKENS = 6
# Sentences shown, and sentences scored for the whole-word accuracy printed above them: at the default
# run's ~17 % first-guess accuracy ten shown sentences hold none right one time in six, so the figure
# that says how often the model is right comes from SCORED of them (binomial s.e. ~2 points).
SHOWN = 10
SCORED = 400


@dataclass
class MaskedWordExample:
    text: str                      # the sentence with the word replaced by [MASK]
    true_word: str
    guesses: list[tuple[str, float]]  # top-3 (word piece, probability), best first

    @property
    def correct(self) -> bool:
        return bool(self.guesses) and self.guesses[0][0] == self.true_word

    @property
    def among_guesses(self) -> bool:
        return self.true_word in [word for word, _ in self.guesses]


def _detokenize(pieces: Sequence[str]) -> str:
    text = ""
    for piece in pieces:
        if piece.startswith("##"):
            text += piece[2:]
        else:
            text += (" " if text else "") + piece
    return text


def _maskable_positions(pieces: Sequence[str]) -> list[int]:
    """Positions of whole words made of one word piece with at least two letters (not punctuation,
    not part of a split word): a guess for them reads as a word."""
    positions = []
    for i, piece in enumerate(pieces):
        follows_piece = i + 1 < len(pieces) and pieces[i + 1].startswith("##")
        if piece.isalpha() and len(piece) >= 2 and not follows_piece:
            positions.append(i)
    return positions


@torch.no_grad()
def masked_word_examples(model, data, documents: Sequence[int], vocab: Sequence[str], *, count: int = SHOWN,
                         max_seq_len: int = 128, seed: int = 0,
                         device: torch.device | str = "cpu") -> list[MaskedWordExample]:
    """``count`` held-out sentences, each with one random whole word masked, and the model's top-3.

    data: a :class:`~fastbert.data.prepare.PreparedData`; documents: the held-out document numbers;
    vocab: the id → word-piece list (``vocab.txt``). Each input is ``[CLS] sentence [SEP] next
    sentence [SEP]`` (B = the true next sentence when there is one), as in pre-training.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if len(documents) == 0:
        raise ValueError("no held-out documents to draw sentences from")
    store = data.token_store()
    rng = np.random.default_rng([seed, 13])
    special = torch.tensor(data.special_token_ids, device=device)
    was_training = model.training
    model.eval()
    examples: list[MaskedWordExample] = []
    shown_sentences: set[tuple[int, int]] = set()
    # A bounded search: documents made only of short or symbol-only sentences give no example.
    for _ in range(count * 50):
        if len(examples) == count:
            break
        document = int(documents[int(rng.integers(0, len(documents)))])
        sentences = store.document(document)
        s = int(rng.integers(0, len(sentences)))
        if (document, s) in shown_sentences:
            continue
        sentence = [int(t) for t in sentences[s]][:max_seq_len // 2 - 2]
        pieces = [vocab[t] for t in sentence]
        positions = _maskable_positions(pieces)
        if len(sentence) < _MIN_SENTENCE_TOKENS or not positions:
            continue
        position = positions[int(rng.integers(0, len(positions)))]
        shown_sentences.add((document, s))
        following = [int(t) for t in sentences[s + 1]] if s + 1 < len(sentences) else []
        following = following[:max_seq_len - len(sentence) - 3]
        ids = [data.cls_id, *sentence, data.sep_id] + ([*following, data.sep_id] if following else [])
        ids[1 + position] = data.mask_id
        input_ids = torch.tensor([ids], device=device)
        token_type_ids = torch.zeros_like(input_ids)
        token_type_ids[0, len(sentence) + 2:] = 1
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), token_type_ids=token_type_ids)
        logits = out.prediction_logits[0, 1 + position].float()
        logits = logits[:len(vocab)]  # the model's vocabulary is rounded up to a multiple of 8
        logits[special[special < len(vocab)]] = float("-inf")  # a special token is never the answer
        probabilities = torch.softmax(logits, dim=-1)
        top = torch.topk(probabilities, 3)
        guesses = [(vocab[int(i)], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        shown = list(pieces)
        shown[position] = "[MASK]"
        examples.append(MaskedWordExample(text=_detokenize(shown), true_word=pieces[position], guesses=guesses))
    model.train(was_training)
    return examples


@dataclass
class WholeWordAccuracy:
    words: int        # held-out sentences scored, one masked word each
    first_right: int  # the first guess is the true word
    top3_right: int   # the true word is among the three guesses

    @classmethod
    def of(cls, examples: Sequence[MaskedWordExample]) -> "WholeWordAccuracy":
        return cls(words=len(examples), first_right=sum(e.correct for e in examples),
                   top3_right=sum(e.among_guesses for e in examples))

    def summary(self) -> str:
        if self.words == 0:
            return "whole words masked in held-out sentences: none found (no held-out sentence has a word to mask)"
        return (f"whole words masked in {self.words} held-out sentences: first guess right "
                f"{self.first_right / self.words:.1%} ({self.first_right}), among the top 3 "
                f"{self.top3_right / self.words:.1%} ({self.top3_right})")


def format_examples(examples: Sequence[MaskedWordExample]) -> str:
    lines = ["held-out sentences, one word masked: the true word and the model's top-3 guesses "
             "(✓ first guess right, ~ among the three)"]
    for number, example in enumerate(examples, 1):
        guesses = ", ".join(f"{word} ({p:.0%})" for word, p in example.guesses)
        mark = "✓" if example.correct else "~" if example.among_guesses else " "
        lines.append(f"{number}. {example.text}")
        lines.append(f"   {mark} true: {example.true_word:<14} top-3: {guesses}")
    return "\n".join(lines) + "\n"


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a ``metrics.jsonl``, keeping the last run's rows where a resume
    re-logged steps: a row at or below an earlier step replaces what was logged from that step on."""
    train: list[dict] = []
    evals: list[dict] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "resumed_from" in row:
            resumed = row["resumed_from"]
            train = [r for r in train if r["step"] <= resumed]
            evals = [r for r in evals if r["step"] <= resumed]
            continue
        rows = evals if "mlm_accuracy" in row else train if "loss" in row else None
        if rows is None:
            continue
        while rows and rows[-1]["step"] >= row["step"]:
            rows.pop()
        rows.append(row)
    return train, evals


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Loss, MLM accuracy, MLM accuracy at [MASK] inputs beside the count baselines, and NSP accuracy
    when NSP was trained, against the step (training and eval) in one PNG; None, with nothing written,
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must come before pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, evals = read_metrics(metrics_path)
    panels = [("loss", "loss", "eval_loss", ()), ("MLM accuracy", "mlm_accuracy_train", "mlm_accuracy", ()),
              ("MLM accuracy at [MASK] inputs", None, "mlm_accuracy_at_mask", ("unigram_at_mask", "bigram_at_mask"))]
    if any("nsp_accuracy_train" in r or "nsp_accuracy" in r for r in train + evals):
        panels.append(("NSP accuracy", "nsp_accuracy_train", "nsp_accuracy", ()))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    for axis, (title, train_key, eval_key, baselines) in zip(axes, panels):
        points = [(r["step"], r[train_key]) for r in train if train_key in r]
        if points:
            axis.plot(*zip(*points), label="training (log-step batch)", alpha=0.6, linewidth=1)
        points = [(r["step"], r[eval_key]) for r in evals if eval_key in r]
        if points:
            axis.plot(*zip(*points), "o-", color="C1", label="held-out eval")
        for key, style in zip(baselines, (":", "--")):
            values = [r[key] for r in evals if key in r]
            if values:
                axis.axhline(values[-1], linestyle=style, color="gray", label=key.replace("_at_mask", " baseline"))
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    png_path = Path(png_path)
    # No "Software" stamp: the same metrics give the same bytes.
    figure.savefig(png_path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return png_path


def write_showcase(out: str | os.PathLike, model, data, documents: Sequence[int], *, max_seq_len: int, seed: int,
                   device: torch.device | str = "cpu", count: int = SHOWN, scored: int = SCORED) -> str:
    """The end-of-run report: the whole-word accuracy over ``scored`` held-out sentences and the first
    ``count`` of them as examples (returned, and saved in ``out/showcase.txt``), and ``out/curves.png``
    from ``out/metrics.jsonl``; the text notes it when the PNG could not be made."""
    out = Path(out)
    vocab = (Path(data.data_dir) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    # One draw: the examples shown are the first of those scored (the same as a draw of `count`).
    examples = masked_word_examples(model, data, documents, vocab, count=max(count, scored), max_seq_len=max_seq_len,
                                    seed=seed, device=device)
    text = WholeWordAccuracy.of(examples).summary() + "\n" + format_examples(examples[:count])
    if plot_curves(out / "metrics.jsonl", out / CURVES_FILE) is None:
        text += "(no curves.png: matplotlib is not installed; pip install matplotlib)\n"
    else:
        text += f"training and eval curves: {out / CURVES_FILE}\n"
    from fastbert._atomic import atomic_write_text

    atomic_write_text(out / SHOWCASE_FILE, text)
    return text
