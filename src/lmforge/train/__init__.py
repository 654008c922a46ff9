"""Training: the one `fit()` loop, optimizer and schedule, checkpoints, distributed set-up, run logging."""
