"""BERT's pre-training objective as the trainer sees it: masked-LM + next-sentence prediction.

All the trainer knows of the objective is here: the model class, the loss parts it logs beside the
total loss, the training batch's accuracies (device tensors, no sync) and the held-out eval.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from fastbert.masking import IGNORE_INDEX
from fastbert.modeling import BertForPreTraining
from fastbert.pretrain.batches import to_device

MODEL_CLASS = BertForPreTraining
LOSS_PARTS = ("mlm_loss", "nsp_loss")  # attributes of the model's output, logged per step


def batch_accuracy(output, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """MLM and NSP accuracy of one training batch, on the device: the training curves."""
    # The fused MLM loss counts the hits without logits (none are computed in training).
    mlm = output.mlm_num_correct.float() / output.mlm_num_targets.clamp(min=1)
    nsp = (output.seq_relationship_logits.detach().argmax(-1) == batch["next_sentence_label"]).float().mean()
    return {"mlm_accuracy_train": mlm, "nsp_accuracy_train": nsp}


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
        batch = to_device(batch, device)
        with autocast:
            out = model(**batch, return_logits=True)  # the hits at [MASK] inputs need them
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


def eval_summary(last: dict[str, float], step: int) -> str:
    """The final eval in one line, with its standard errors."""
    return (f"held-out eval at step {step} ({last['eval_pairs']:,} pairs): MLM accuracy {last['mlm_accuracy']:.1%} "
            f"± {last['mlm_accuracy_se']:.1%}, NSP accuracy {last['nsp_accuracy']:.1%} ± {last['nsp_accuracy_se']:.1%}, "
            f"loss {last['eval_loss']:.3f}; MLM accuracy at [MASK] inputs (context only) "
            f"{last['mlm_accuracy_at_mask']:.1%}")
