"""Pre-training: the training loop, LAMB/AdamW, schedules, checkpoints, DDP."""
