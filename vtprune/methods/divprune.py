"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", arXiv 2503.02175; authors' code github.com/vbdi/divprune, read only: it is under a
non-commercial licence, nothing here is taken from it).

Keeps a diverse subset of each image's visual tokens before the LLM by greedy *max-min* diversity: with
the cosine distance ``D = 1 - cos(x_i, x_j)`` of the visual features the LLM receives (after the projector,
as the authors' code), the first token is the one farthest from its nearest other token
(``argmax_j min_{i != j} D_ij``), and each next token the one farthest from the tokens already chosen
(``argmax_j min_{s in S} D_sj``), until ``k = keep_count(n)`` are chosen. Ties go to the lower index.

As a vtprune scorer the greedy order becomes a score: the ``t``-th pick (from 0) of a group scores
``k - t``, every other token 0, so the keep rule's top-``k`` is exactly the greedy selection.

Choices where the paper or the authors' code leaves a detail open, and deviations:

* Budget: the authors' LLaVA-1.6 code runs one selection over all of an image's tokens (crops and row
  separators together); the default here is ``budget="image"`` (one selection over every token of the
  image; InternVL's tiles are joined first), with layout tokens (row separators) always kept and not
  counted, as for every vtprune method. A family's finer budget (``"crop"``, ``"tile"``) runs one
  selection per crop or tile.
* ``k`` is ``keep_count`` (round-half-up, at least 1); the authors use Python's ``round``.
* The default ratio is the paper's 0.098 of the tokens (the authors' ``SUBSET_RATIO``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from ..config import VisualTokenConfig
from ..registry import register_method
from ..runtime.parts import MethodParts
from ..runtime.selection import keep_count

__all__ = ["DivPruneConfig", "max_min_order", "divprune_scores"]


@dataclasses.dataclass
class DivPruneConfig(VisualTokenConfig):
    """Args:
    keep_ratio: fraction of each image's tokens kept (paper default 0.098).
    positions: see :class:`~vtprune.config.VisualTokenConfig`.
    budget: what one selection covers; default ``"image"`` (the paper's choice; see the module notes).
    """

    method = "divprune"

    keep_ratio: float = 0.098
    budget: str = "image"


def max_min_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` greedy max-min picks over ``(n, hidden)`` features (cosine distance): ``(k,)`` long,
    in pick order."""
    n = features.shape[0]
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.t()
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    # first pick: the token whose nearest other token is farthest
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=features.device), float("inf"))
    picks = [nearest.min(0).values.argmax()]
    closest = distance[picks[0]].clone()  # each token's distance to its nearest chosen token
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    chosen[picks[0]] = True
    for _ in range(1, k):
        j = closest.masked_fill(chosen, float("-inf")).argmax()
        picks.append(j)
        chosen[j] = True
        closest = torch.minimum(closest, distance[j])
    return torch.stack(picks)


def divprune_scores(unit, keep) -> torch.Tensor:
    """``(n,)`` scores of one unit: per budget group (layout tokens excluded) the greedy pick order as
    ``k - t`` for the ``t``-th pick, 0 elsewhere."""
    score = torch.zeros(unit.size, device=unit.features.device)
    if unit.groups is None:
        members = [torch.arange(unit.size, device=unit.features.device)]
    else:
        groups = unit.groups.to(unit.features.device)
        members = [(groups == g).nonzero().squeeze(-1) for g in torch.unique(groups[groups >= 0]).tolist()]
    for idx in members:
        k = keep(idx.numel())
        order = max_min_order(unit.features[idx], k)
        score[idx[order]] = torch.arange(k, 0, -1, device=score.device, dtype=score.dtype)
    return score


@register_method(DivPruneConfig)
def _parts(config: DivPruneConfig, family) -> MethodParts:
    keep = functools.partial(keep_count, keep_ratio=config.keep_ratio)
    return MethodParts(
        scorer=lambda units: [divprune_scores(u, keep) for u in units],
        keep=keep,
        positions=config.positions,
        budget=config.budget,
        prompt_scorer=True,  # a selection over whole images (InternVL's tiles joined first)
    )
