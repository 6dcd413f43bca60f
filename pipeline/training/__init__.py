"""Training: models, the epoch loop, a task's candidates, sweeps, distributed training."""
