"""Random visual-token pruning: the baseline every scoring method must beat.

Keeps a uniformly random ``k`` of each image's visual tokens (same ``k`` rule as the other methods), from
a generator seeded at wrap time, so a run is reproducible for a fixed input order.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..config import VisualTokenConfig, check_int
from ..registry import register_method
from ..runtime.parts import MethodParts
from ..runtime.selection import keep_count

__all__ = ["RandomConfig"]


@dataclasses.dataclass
class RandomConfig(VisualTokenConfig):
    method = "random"

    keep_ratio: float = 0.25
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int("seed", self.seed)


@register_method(RandomConfig)
def _parts(config: RandomConfig, family) -> MethodParts:
    generator = torch.Generator().manual_seed(config.seed)

    def scorer(units):
        return [torch.rand(unit.size, generator=generator) for unit in units]

    return MethodParts(
        scorer=scorer,
        keep=functools.partial(keep_count, keep_ratio=config.keep_ratio),
        positions=config.positions,
        budget=config.budget,
    )
