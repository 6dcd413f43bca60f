"""notMNIST letters A-J: a reproducible DVC + MLflow pipeline, one module per stage."""
