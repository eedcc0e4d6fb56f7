"""Static visual-token exit: every visual token leaves the LLM after a fixed layer.

The baseline of dynamic visual-token exit (DyVTE, Wu et al., 2024): layers ``0..layer-1`` see the visual
tokens, layers ``layer..`` see only the text. The KV caches of the later layers hold no visual entries.
"""

from __future__ import annotations

import dataclasses

from ..config import PruneConfig, register_config
from ..layers import LayerPlan
from . import register_method

__all__ = ["StaticExitConfig"]


@register_config("static_exit")
@dataclasses.dataclass
class StaticExitConfig(PruneConfig):
    """Args:
    layer: first decoder layer that no longer sees visual tokens (exit *after* layer ``layer - 1``).
    """

    layer: int = 4

    def validate(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(
                f"layer must be an int >= 1 (first layer without visual tokens), got {self.layer!r}"
            )


class StaticExitPlan(LayerPlan):
    def __init__(self, config: StaticExitConfig, num_layers: int):
        if config.layer >= num_layers:
            raise ValueError(f"exit layer {config.layer} must be below the {num_layers} decoder layers")
        self.layer = config.layer

    def decide(self, layer, hidden, visual, real, attention, counts):
        if layer != self.layer - 1 or not any(counts):
            return None
        return ~visual, [0] * len(counts)


@register_method(StaticExitConfig, stage="layers")
def make_plan(config: StaticExitConfig, num_layers: int, model=None) -> StaticExitPlan:
    return StaticExitPlan(config, num_layers)
