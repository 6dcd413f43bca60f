"""notMNIST pipeline: one module per DVC stage."""
