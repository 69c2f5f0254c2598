"""The training core that pre-training and fine-tuning share: optimizers (LAMB, AdamW) with BERT's
parameter groups, warmup + decay schedules, the update step with its divergence rule
(:class:`~fastbert.training.update.Updater`) and the atomic folder export of a trained model.

It knows no job: no data, no model class, no checkpoint layout (those are in ``fastbert.pretrain``
and ``fastbert.finetune``)."""
