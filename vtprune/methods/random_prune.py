"""Random visual-token pruning: the baseline every scoring method must beat.

Keeps a uniformly random ``k`` of each image's visual tokens (same ``k`` rule as the other methods), from
a generator seeded at wrap time, so a run is reproducible for a fixed input order.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import VisualTokenConfig, register_config
from . import register_method

__all__ = ["RandomConfig"]


@register_config("random")
@dataclasses.dataclass
class RandomConfig(VisualTokenConfig):
    keep_ratio: float = 0.25
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


@register_method(RandomConfig, probe=None)
def make_scorer(config: RandomConfig):
    generator = torch.Generator().manual_seed(config.seed)

    def scorer(probe_scores, sizes):
        return [torch.rand(n, generator=generator) for n in sizes]

    return scorer
