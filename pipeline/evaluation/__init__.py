"""Evaluation: test metrics, robustness, the summary, the gate, the original's claims."""
