"""Settings of `catalog-index train-head`, apart from pipelines.head so that building the CLI's
parser (which shows their defaults) does not import torch (seconds on every command)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSettings:
    epochs: int = 30
    dim: int = 256
    holdout: float = 0.2
    seed: int = 0
    batch_size: int = 256
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    temperature: float = 0.1
    k: int = 10
    min_gain: float = 0.01

    def __post_init__(self):
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout must be between 0 and 1 (a fraction of the images), got {self.holdout}")
        if self.epochs < 1 or self.dim < 1 or self.batch_size < 2 or self.k < 1:
            raise ValueError("--epochs and --dim must be >= 1, the batch size >= 2, k >= 1")
