"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", arXiv 2502.11494; code: github.com/ZichenWen1/DART).

Duplication, not importance: after decoder layer ``K - 1`` a few *pivot* tokens are chosen, and each pivot
keeps the visual tokens least similar to it; the visual tokens most similar to the pivots (duplicates) leave
before layer ``K``. No attention map is read, so it works under SDPA / flash attention.

Per sample, with ``n`` visual tokens at layer ``K`` and ``k = keep_count(n, keep_ratio)`` to keep:

1. **pivots** (the paper's default, "K-norm"): the ``pivot_image`` visual tokens and the ``pivot_text``
   text tokens after the last visual token (the instruction) whose layer ``K - 1`` key states have the
   largest L1 norm (over all heads; read by the registered probe statistic ``"key_l1"`` from the keys the
   attention receives - after the rotary embedding - no extra projection).
2. **duplicates**: the tokens compared are layer ``K - 1``'s outputs through the language model's final
   norm (``family.final_norm``), by cosine similarity. The image pivots are kept; then, pivot after pivot,
   each keeps its quota of the still-unkept visual tokens that are *least* similar to it; what no pivot
   kept leaves (text pivots stay: text is never dropped).

How pivots and duplicates are counted (the authors' ``get_retained_image_token``): they keep the image
pivots plus ``TOKEN_TOPK = max_num_trunction // (pivot_image + pivot_text)`` tokens per pivot, i.e.
``4 + 8 * 16 = 132`` visual tokens for their "128" (``reduction_ratio 0.778``, 576 tokens). Here the image
pivots count toward the budget: ``k`` tokens are kept exactly, the ``k - pivots`` non-pivot slots shared
by the pivots as evenly as possible (the first ``(k - p) mod P`` pivots one more). Other choices:

* pivot order: image pivots by decreasing key norm, then text pivots by decreasing key norm (the authors
  iterate over a Python ``set`` of positions, an order the code does not fix); ties go to the lower position.
* a sample with fewer text tokens after its image than ``pivot_text`` uses those it has; its visual tokens
  (several images included) form one pool, as the authors' single image.
* defaults: ``layer=2`` (the paper's K), ``pivot_image=4``, ``pivot_text=4``, ``keep_ratio=0.222`` (the
  scripts' reduction ratio 0.778: 128 of 576 tokens).
* kept tokens keep their original rotary positions (the in-LLM engine's rule; the authors' LLaVA code uses
  the kept indices as position ids too).
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
from ..runtime.statistics import register_statistic

__all__ = ["DARTConfig", "DARTPlan", "dart_keep"]


@register_statistic("key_l1")
def key_l1_norm(query, key, mask, scale) -> torch.Tensor:
    """L1 norm of each key over all heads and channels: ``(batch, keys)`` (DART's K-norm). Grouped KV heads
    arrive repeated, which scales every key's norm alike and leaves the ranking unchanged."""
    return key.float().abs().sum(dim=(1, 3))


@dataclasses.dataclass
class DARTConfig(PruneConfig):
    """Args:
    layer: ``K``: layers ``0..K-1`` see every visual token, layers ``K..`` the kept ones (K >= 1; paper: 2).
    keep_ratio: fraction of each sample's visual tokens kept after layer ``K`` (paper: 0.222, i.e. 128 of
        576; its "reduction ratio" is ``1 - keep_ratio``).
    pivot_image: visual pivot tokens per sample (paper: 4).
    pivot_text: text pivot tokens per sample, from the text after the last visual token (paper: 4).
    """

    method = "dart"

    layer: int = 2
    keep_ratio: float = 0.222
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self) -> None:
        check_int("layer (DART's K)", self.layer, minimum=1)
        check_ratio("keep_ratio", self.keep_ratio)
        check_int("pivot_image", self.pivot_image, minimum=0)
        check_int("pivot_text", self.pivot_text, minimum=0)
        if self.pivot_image + self.pivot_text == 0:
            raise UsageError("DART needs at least one pivot: set pivot_image or pivot_text above 0")


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` rank of every column by descending score (0 = highest; ties to the lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(batch, k)`` columns of the ``k`` highest scores, highest first (ties to the lower index)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def dart_keep(
    features: torch.Tensor,
    key_norm: torch.Tensor,
    candidates: torch.Tensor,
    text: torch.Tensor,
    kept: list[int],
    pivot_image: int,
    pivot_text: int,
) -> torch.Tensor:
    """DART's selection for a batch: ``(batch, seq)`` bool, True at the visual tokens kept.

    Args:
        features: ``(batch, seq, hidden)`` the states compared by cosine similarity.
        key_norm: ``(batch, seq)`` the pivot score of every token (K-norm).
        candidates: ``(batch, seq)`` bool, the visual tokens that may be kept.
        text: ``(batch, seq)`` bool, the tokens text pivots are chosen from.
        kept: visual tokens to keep per sample (each at most its candidates).
        pivot_image / pivot_text: pivots per sample.
    """
    batch, seq = candidates.shape
    device = candidates.device
    k = torch.tensor(kept, device=device)
    neg = float("-inf")
    image_pivots = _top(key_norm.masked_fill(~candidates, neg), min(pivot_image, seq))
    text_pivots = _top(key_norm.masked_fill(~text, neg), min(pivot_text, seq))
    n_image = torch.minimum(k, torch.tensor(image_pivots.shape[1], device=device))  # <= candidates: k <= n
    n_text = torch.clamp(text.sum(-1), max=text_pivots.shape[1])
    image_ok = torch.arange(image_pivots.shape[1], device=device)[None] < n_image[:, None]
    text_ok = torch.arange(text_pivots.shape[1], device=device)[None] < n_text[:, None]
    pivots = torch.cat([image_pivots, text_pivots], 1)  # (batch, P)
    valid = torch.cat([image_ok, text_ok], 1)
    # Quotas: the k - n_image non-pivot slots shared by the valid pivots, the first ones one more.
    n_pivots = valid.sum(-1).clamp(min=1)
    rest = k - n_image
    order = valid.long().cumsum(-1) - 1
    quota = torch.where(valid, (rest // n_pivots)[:, None] + (order < (rest % n_pivots)[:, None]).long(), 0)
    keep = torch.zeros_like(candidates)
    keep.scatter_(1, image_pivots, image_ok)
    remaining = candidates & ~keep
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    pivot_rows = unit.gather(1, pivots[:, :, None].expand(-1, -1, unit.shape[-1]))  # (batch, P, hidden)
    similarity = torch.bmm(unit, pivot_rows.transpose(1, 2))  # (batch, seq, P) cosine, every pivot at once
    for j in range(pivots.shape[1]):
        rank = _rank((-similarity[:, :, j]).masked_fill(~remaining, neg))
        chosen = remaining & (rank < quota[:, j, None])
        keep |= chosen
        remaining &= ~chosen
    return keep


class DARTPlan(LayerPlan):
    """Drop the visual tokens duplicated by DART's pivots after layer ``K - 1`` (see the module doc)."""

    probe_statistic = "key_l1"

    def __init__(self, config: DARTConfig, num_layers: int, norm: torch.nn.Module):
        if config.layer >= num_layers:
            raise UsageError(f"DART layer K={config.layer} must be below the {num_layers} decoder layers")
        self.config = config
        self.norm = norm
        self.probe_layers = (config.layer - 1,)

    def decide(self, layer, hidden, visual, real, attention, counts):
        if layer != self.config.layer - 1:
            return None
        kept = [keep_count(n, self.config.keep_ratio) if n else 0 for n in counts]
        if kept == counts:
            return None
        candidates = visual & real
        positions = torch.arange(visual.shape[1], device=visual.device)
        last_visual = torch.where(candidates, positions, -1).amax(-1, keepdim=True)
        text = real & ~visual & (positions[None] > last_visual)
        with torch.no_grad():
            features = self.norm(hidden)
            keep = dart_keep(
                features,
                attention[layer].float(),
                candidates,
                text,
                kept,
                self.config.pivot_image,
                self.config.pivot_text,
            )
        return ~candidates | keep, kept


@register_method(DARTConfig)
def _parts(config: DARTConfig, family) -> MethodParts:
    return MethodParts(plan=DARTPlan(config, len(family.decoder_layers), family.final_norm))
