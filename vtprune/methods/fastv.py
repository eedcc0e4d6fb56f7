"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2").

After decoder layer ``K`` the last token's attention (averaged over heads) ranks the visual tokens; the
layers from ``K`` on keep only the top ``keep_ratio`` of them (the paper's ``R`` is ``1 - keep_ratio``;
its default ``K=2, R=50%``). The attention row comes from layer ``K - 1`` - the last layer that saw all
tokens - through the registered probe function, never from eager attention maps.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import PruneConfig, check_int, check_ratio
from ..errors import UsageError
from ..registry import register_method
from ..runtime.layer_drop import LayerPlan
from ..runtime.parts import MethodParts
from ..runtime.selection import keep_count

__all__ = ["FastVConfig"]


@dataclasses.dataclass
class FastVConfig(PruneConfig):
    """Args:
    layer: ``K``: layers ``0..K-1`` see every visual token, layers ``K..`` only the kept ones (K >= 1).
    keep_ratio: fraction of each sample's visual tokens kept after layer ``K`` (FastV's ``1 - R``).
    """

    method = "fastv"

    layer: int = 2
    keep_ratio: float = 0.5

    def validate(self) -> None:
        check_int("layer (FastV's K)", self.layer, minimum=1)
        check_ratio("keep_ratio", self.keep_ratio)


class FastVPlan(LayerPlan):
    def __init__(self, config: FastVConfig, num_layers: int):
        if config.layer >= num_layers:
            raise UsageError(f"FastV layer K={config.layer} must be below the {num_layers} decoder layers")
        self.config = config
        self.probe_layers = (config.layer - 1,)
        self.probe_statistic = "last"

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


@register_method(FastVConfig)
def _parts(config: FastVConfig, family) -> MethodParts:
    return MethodParts(plan=FastVPlan(config, len(family.decoder_layers)))
