"""Evaluation: generation from a checkpoint (and, later, judges and benchmarks). Knows nothing of the trainer."""
