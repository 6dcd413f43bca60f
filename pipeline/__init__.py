"""notMNIST letters A-J: a reproducible DVC + MLflow pipeline, one module per stage."""

import os

# Idle OpenMP threads sleep instead of spinning, so torch's threads do not fight other
# processes for the cores: on a busy 2-core machine spinning made an epoch 5-10x slower.
# libgomp reads this once, when torch loads it, so it is set here, before any stage imports
# torch. It changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
