"""The run plumbing shared by every trainer: the epoch loop, checkpoints and sources, the run log,
metrics, optimizers and learning-rate schedules, evaluation and the memory check. Knows nothing of
any pruning algorithm."""
