"""Model-agnostic pruning algorithms: the OBS solver and its Fisher inverse, the pruning criteria,
gradient collection, sparsity schedules and FLOPs counting. Knows nothing of trainers or the CLI."""
