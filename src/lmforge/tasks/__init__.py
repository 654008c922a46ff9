"""What varies between objectives. Each task knows its batches, its loss and its evaluation:

- `train_batch(step, part, parts) -> dict`: part `part` of `parts` equal parts of the global batch
  of optimizer step `step`. The global batch is a pure function of (seed, step), so resuming at any
  step, or splitting the batch over processes and accumulation micro-steps, sees the same data.
- `eval_batches(rank, world)`: this process's share of the fixed validation batches.
- `loss(model, batch) -> (sum of losses, number of targets)`: `fit()` divides by the global count,
  which it counts as `(batch["labels"] != -100).sum()` unless the task has `targets(batch) -> int`.
- optional `metrics(model, rank, world) -> dict`: task metrics on the validation split (accuracy,
  F1, ...), logged beside `val_loss` and usable as `train.metric` for early stopping.
"""
