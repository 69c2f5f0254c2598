"""Pre-training: the loop (``trainer``), its flags (``config``), BERT's MLM + NSP objective, the batches,
checkpoints, DDP. The optimizers, schedules and the update step are ``fastbert.training``'s."""
