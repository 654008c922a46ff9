"""What varies between objectives. Each task knows its batches, its loss and its evaluation:

- `train_batch(step, share, shares) -> dict`: part `share` of `shares` equal parts of the global batch
  of optimizer step `step`. The global batch is a pure function of (seed, step), so resuming at any
  step, or splitting the batch over processes and accumulation micro-steps, sees the same data.
- `eval_batches(rank, world)`: this process's share of the fixed validation batches.
- `loss(model, batch) -> (sum of losses, number of targets)`: `fit()` divides by the global count.
"""
