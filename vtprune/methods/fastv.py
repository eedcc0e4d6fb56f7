"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2").

After decoder layer ``K`` the last token's attention (averaged over heads) ranks the visual tokens; the
layers from ``K`` on keep only the top ``keep_ratio`` of them (the paper's ``R`` is ``1 - keep_ratio``;
its default ``K=2, R=50%``). The attention row comes from layer ``K - 1`` - the last layer that saw all
tokens - through the registered probe function, never from eager attention maps.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import PruneConfig, register_config
from ..layers import LayerPlan
from ..selection import keep_count
from . import register_method

__all__ = ["FastVConfig"]


@register_config("fastv")
@dataclasses.dataclass
class FastVConfig(PruneConfig):
    """Args:
    layer: ``K``: layers ``0..K-1`` see every visual token, layers ``K..`` only the kept ones (K >= 1).
    keep_ratio: fraction of each sample's visual tokens kept after layer ``K`` (FastV's ``1 - R``).
    """

    layer: int = 2
    keep_ratio: float = 0.5

    def validate(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer (FastV's K) must be an int >= 1, got {self.layer!r}")
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")


class FastVPlan(LayerPlan):
    def __init__(self, config: FastVConfig, num_layers: int):
        if config.layer >= num_layers:
            raise ValueError(f"FastV layer K={config.layer} must be below the {num_layers} decoder layers")
        self.config = config
        self.probe_layers = (config.layer - 1,)

    def decide(self, layer, hidden, visual, real, attention, counts):
        if layer != self.config.layer - 1:
            return None
        kept = [keep_count(n, self.config.keep_ratio) if n else 0 for n in counts]
        if kept == counts:
            return None
        candidates = visual & real
        scores = attention[layer].float().masked_fill(~candidates, float("-inf"))  # last query's attention
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        limit = torch.tensor(kept, device=rank.device)[:, None]
        return ~candidates | (rank < limit), kept


@register_method(FastVConfig, stage="layers")
def make_plan(config: FastVConfig, num_layers: int, model=None) -> FastVPlan:
    return FastVPlan(config, num_layers)
