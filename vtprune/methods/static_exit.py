"""Static visual-token exit: every visual token leaves the LLM after a fixed layer.

The baseline of dynamic visual-token exit (DyVTE, Wu et al., 2024): layers ``0..layer-1`` see the visual
tokens, layers ``layer..`` see only the text. The KV caches of the later layers hold no visual entries.
"""

from __future__ import annotations

import dataclasses

from ..config import PruneConfig, check_int
from ..errors import UsageError
from ..registry import register_method
from ..runtime.layer_drop import LayerPlan
from ..runtime.parts import MethodParts

__all__ = ["StaticExitConfig"]


@dataclasses.dataclass
class StaticExitConfig(PruneConfig):
    """Args:
    layer: first decoder layer that no longer sees visual tokens (exit *after* layer ``layer - 1``).
    """

    method = "static_exit"

    layer: int = 4

    def validate(self) -> None:
        check_int("layer (first layer without visual tokens)", self.layer, minimum=1)


class StaticExitPlan(LayerPlan):
    def __init__(self, config: StaticExitConfig, num_layers: int):
        if config.layer >= num_layers:
            raise UsageError(f"exit layer {config.layer} must be below the {num_layers} decoder layers")
        self.layer = config.layer

    def decide(self, layer, hidden, visual, real, attention, counts):
        if layer != self.layer - 1 or not any(counts):
            return None
        return ~visual, [0] * len(counts)


@register_method(StaticExitConfig)
def _parts(config: StaticExitConfig, family) -> MethodParts:
    return MethodParts(plan=StaticExitPlan(config, len(family.decoder_layers)))
