"""The pre-training objectives as the trainer sees them: masked-LM alone, or masked-LM + next-sentence
prediction (BERT's).

All the trainer knows of an objective is its :class:`Objective`: the model class, the loss parts it logs
beside the total loss, which batch fields the model takes, the training batch's accuracies (device
tensors, no sync) and the held-out eval. Both train a ``BertForPreTraining`` (MLM-only leaves its NSP
head untrained), so every run exports a model transformers' ``BertForPreTraining`` loads.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from fastbert.masking import IGNORE_INDEX
from fastbert.modeling import BertForPreTraining
from fastbert.pretrain.batches import to_device

NSP_LABEL = "next_sentence_label"


@dataclass(frozen=True)
class Objective:
    name: str
    next_sentence: bool                 # trains and evaluates the NSP head on labelled pairs
    model_class: type = BertForPreTraining

    @property
    def loss_parts(self) -> tuple[str, ...]:
        """Attributes of the model's output logged per step beside ``loss``."""
        return ("mlm_loss", "nsp_loss") if self.next_sentence else ("mlm_loss",)

    @property
    def random_next_prob(self) -> float:
        """How often segment B is another document's (BERT's 50 %); MLM-only reads contiguous text."""
        return 0.5 if self.next_sentence else 0.0

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as the model takes it: without the NSP labels when NSP is not trained."""
        return batch if self.next_sentence else {k: v for k, v in batch.items() if k != NSP_LABEL}

    def batch_accuracy(self, output, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The training batch's accuracies, on the device: the training curves."""
        # The fused MLM loss counts the hits without logits (none are computed in training).
        accuracy = {"mlm_accuracy_train": output.mlm_num_correct.float() / output.mlm_num_targets.clamp(min=1)}
        if self.next_sentence:
            hits = output.seq_relationship_logits.detach().argmax(-1) == batch[NSP_LABEL]
            accuracy["nsp_accuracy_train"] = hits.float().mean()
        return accuracy

    @torch.no_grad()
    def evaluate(self, model: BertForPreTraining, batches: list[dict], device: torch.device, amp_dtype,
                 mask_token_id: int | None = None) -> dict[str, float]:
        """MLM accuracy (and NSP accuracy when trained) and loss on held-out batches, with binomial
        standard errors.

        With ``mask_token_id``, also ``mlm_accuracy_at_mask``: the accuracy at the targets whose input
        is [MASK] (80 % of them). Those can only be guessed from context; at the other 20 % (kept or
        random tokens) copying the input already scores about half, so the overall figure alone hides
        whether the model has learned any context."""
        was_training = model.training
        model.eval()
        correct_mlm = total_mlm = correct_nsp = total_nsp = 0
        correct_at_mask = total_at_mask = pairs = 0
        loss_sum = 0.0
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        for batch in batches:
            batch = to_device(self.model_inputs(batch), device)
            with autocast:
                out = model(**batch, return_logits=True)  # the hits at [MASK] inputs need them
            labels = batch["labels"]
            is_target = labels != IGNORE_INDEX
            targets = labels[is_target]
            hits = out.prediction_logits.argmax(-1) == targets
            correct_mlm += int(hits.sum())
            total_mlm += targets.numel()
            pairs += out.seq_relationship_logits.shape[0]
            if mask_token_id is not None:
                at_mask = batch["input_ids"][is_target] == mask_token_id
                correct_at_mask += int(hits[at_mask].sum())
                total_at_mask += int(at_mask.sum())
            if self.next_sentence:
                correct_nsp += int((out.seq_relationship_logits.argmax(-1) == batch[NSP_LABEL]).sum())
                total_nsp += batch[NSP_LABEL].numel()
            loss_sum += float(out.loss)
        model.train(was_training)
        mlm = correct_mlm / max(total_mlm, 1)
        # Binomial standard errors: how far another draw of held-out pairs could move each accuracy.
        result = {"eval_loss": loss_sum / max(len(batches), 1), "mlm_accuracy": mlm,
                  "mlm_accuracy_se": math.sqrt(mlm * (1 - mlm) / max(total_mlm, 1)),
                  "eval_pairs": pairs, "eval_masked_tokens": total_mlm}
        if self.next_sentence:
            nsp = correct_nsp / max(total_nsp, 1)
            result.update(nsp_accuracy=nsp, nsp_accuracy_se=math.sqrt(nsp * (1 - nsp) / max(total_nsp, 1)))
        if mask_token_id is not None:
            result["mlm_accuracy_at_mask"] = correct_at_mask / max(total_at_mask, 1)
        return result

    def eval_summary(self, last: dict[str, float], step: int) -> str:
        """The final eval in one line, with its standard errors (and the count baselines when given)."""
        text = (f"held-out eval at step {step} ({last['eval_pairs']:,} pairs): MLM accuracy {last['mlm_accuracy']:.1%} "
                f"± {last['mlm_accuracy_se']:.1%}")
        if self.next_sentence:
            text += f", NSP accuracy {last['nsp_accuracy']:.1%} ± {last['nsp_accuracy_se']:.1%}"
        text += f", loss {last['eval_loss']:.3f}"
        if "mlm_accuracy_at_mask" in last:
            text += f"; MLM accuracy at [MASK] inputs (context only) {last['mlm_accuracy_at_mask']:.1%}"
            if "unigram_at_mask" in last:
                text += (f" (count baselines on the same targets: unigram {last['unigram_at_mask']:.1%}, "
                         f"left-neighbour bigram {last['bigram_at_mask']:.1%})")
        return text


OBJECTIVES = {"mlm": Objective("mlm", next_sentence=False), "mlm+nsp": Objective("mlm+nsp", next_sentence=True)}

