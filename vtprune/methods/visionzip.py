"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", arXiv 2412.04467; authors' code: github.com/dvlab-research/VisionZip).

Each image keeps ``k`` tokens before the LLM, of two kinds:

* **dominant** tokens: the ``k - c`` visual tokens the vision encoder's [CLS] attends to most at the
  feature layer (LLaVA-1.5: layer -2), kept as they are;
* **contextual** tokens: the ``c`` remaining tokens' content merged into ``c`` new ones. Of the tokens
  that are not dominant (in prompt order), ``c`` *targets* are taken at a uniform stride
  (``step = max(1, R // c)``, indices ``0, step, 2 step, ...``, the first ``c``); every other remaining token
  joins the target it is most similar to (cosine similarity, ties to the earlier target), and the
  contextual token is ``target + mean(tokens joined to it)`` (the target alone when none joined).

The split follows the paper's settings for LLaVA-1.5 (54 dominant + 10 contextual of 64, 108 + 20 of 128,
162 + 30 of 192): ``c = round(contextual_ratio * k)`` with ``contextual_ratio = 10 / 64``, so 64 kept tokens
are split 54 + 10 exactly as in the paper.

Choices where the paper or the authors' code leaves a detail open, and deviations:

* The authors' code keeps the tower's [CLS] token as one of the "dominant" tokens (``dominant=54`` is 53
  patches + [CLS]). The language model of an HF VLM receives no [CLS] row (no placeholder for it), so
  here all ``k - c`` dominant tokens are patches.
* Merge similarity: the authors compare the *keys* of the attention layer they read (averaged over
  heads). vtprune's probe records one value per token, mapped to tokens by each family (Qwen-VL's 2x2
  merge, InternVL's pixel shuffle, LLaVA-NeXT's packing): a per-token key vector does not go through that
  map. The stand-in is the visual features the LLM receives (the same space the merged rows live in).
* The merge runs on those features, i.e. after the projector; the authors merge the tower's hidden
  states before it (equal for a linear projector, not for LLaVA's 2-layer MLP).
* ``target + mean`` (not a mean that includes the target) is the authors' code; we follow it.
* Where a contextual token goes: the authors append the contextual tokens after the dominant ones. Here a
  contextual token takes its target's placeholder, so kept tokens stay in prompt order (with contiguous
  positions only the order differs; with original positions, Qwen-VL's M-RoPE, it takes the target's
  grid cell).
* Towers without [CLS] (Qwen-VL, SigLIP): the dominant score is the mean attention a token *receives*
  (the ``received`` statistic), as for FasterVLM; the paper uses SigLIP's attention for such towers
  without stating the statistic.
* Budget groups (LLaVA-NeXT's crops, InternVL's tiles with ``budget="tile"``): the split applies per group,
  as the authors' code applies it per encoded view; layout tokens (row separators) are kept as they are.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import VisualTokenConfig, check_int, check_number
from ..registry import register_method
from ..runtime.parts import MethodParts, Transform
from ..runtime.selection import keep_count, top_k_indices
from .fastervlm import cls_attention_probe

__all__ = ["VisionZipConfig", "contextual_count", "visionzip_group", "visionzip_unit"]

PAPER_CONTEXTUAL_RATIO = 10 / 64


@dataclasses.dataclass
class VisionZipConfig(VisualTokenConfig):
    """Args:
    keep_ratio: fraction of each image's (group's) tokens kept, dominant and contextual together
        (default 64 / 576, the paper's headline setting on LLaVA-1.5).
    contextual_ratio: share of the kept tokens that are contextual (merged), in [0, 1]; the paper's
        10 / 64 (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192).
    positions, budget: see :class:`~vtprune.config.VisualTokenConfig`.
    vision_layer: vision-encoder layer whose attention ranks the dominant tokens; None: the layer that
        produces the model's image features (LLaVA-1.5: -2, the paper's choice).
    """

    method = "visionzip"

    keep_ratio: float = 64 / 576
    contextual_ratio: float = PAPER_CONTEXTUAL_RATIO
    vision_layer: int | None = None

    def validate(self) -> None:
        super().validate()
        check_number("contextual_ratio", self.contextual_ratio, 0.0, 1.0, closed_low=True, closed_high=True)
        check_int("vision_layer", self.vision_layer, optional=True)


def contextual_count(kept: int, contextual_ratio: float) -> int:
    """Contextual tokens among ``kept``: round-half-up of ``ratio * kept`` (64 -> 10 at 10 / 64)."""
    return min(kept, int(kept * contextual_ratio + 0.5))


def visionzip_group(
    features: torch.Tensor, score: torch.Tensor, kept: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one group's ``(n, hidden)`` features with ``(n,)`` dominance scores: ``kept`` tokens of
    which ``contextual`` are merged. Returns ascending placeholder indices ``(kept,)`` and their rows
    ``(kept, hidden)`` (dominant tokens' own features; contextual tokens' merged rows at their targets)."""
    n = features.shape[0]
    dominant = top_k_indices(score, kept - contextual).to(features.device)
    rest_mask = torch.ones(n, dtype=torch.bool, device=features.device)
    rest_mask[dominant] = False
    rest = rest_mask.nonzero().squeeze(-1)  # ascending
    if contextual == 0:
        return dominant, features[dominant]
    step = max(1, rest.numel() // contextual)
    pick = torch.arange(0, rest.numel(), step, device=features.device)[:contextual]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=features.device)
    is_target[pick] = True
    targets, others = rest[is_target], rest[~is_target]
    merged = features[targets].float()
    if others.numel():
        unit = F.normalize(features.float(), dim=-1)
        assign = (unit[others] @ unit[targets].t()).argmax(-1)  # first maximum: the earlier target
        sums = torch.zeros_like(merged).index_add_(0, assign, features[others].float())
        counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1).to(merged.dtype)
        merged = merged + sums / counts[:, None]
    positions = torch.cat([dominant, targets])
    rows = torch.cat([features[dominant], merged.to(features.dtype)])
    order = torch.argsort(positions)
    return positions[order], rows[order]


def visionzip_unit(unit, keep_ratio: float, contextual_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one :class:`~vtprune.runtime.parts.VisualUnit` (needs ``score``): per budget group
    ``g >= 0`` (the whole unit when ``groups`` is None), ``keep_count(n_g)`` tokens; layout tokens (group
    -1) kept unchanged. Returns ascending positions ``(k,)`` and rows ``(k, hidden)``."""
    if unit.score is None:
        raise RuntimeError("visionzip needs the vision probe's scores on every unit")
    features, score = unit.features, unit.score.to(unit.features.device)
    if unit.groups is None:
        members = [torch.arange(unit.size, device=features.device)]
        pinned = members[0][:0]
    else:
        groups = unit.groups.to(features.device)
        pinned = (groups < 0).nonzero().squeeze(-1)
        members = [(groups == g).nonzero().squeeze(-1) for g in torch.unique(groups[groups >= 0]).tolist()]
    positions, rows = [pinned], [features[pinned]]
    for idx in members:
        kept = keep_count(idx.numel(), keep_ratio)
        pos, new = visionzip_group(features[idx], score[idx], kept, contextual_count(kept, contextual_ratio))
        positions.append(idx[pos])
        rows.append(new)
    positions, rows = torch.cat(positions), torch.cat(rows)
    order = torch.argsort(positions)
    return positions[order], rows[order]


def visionzip_transform(config: VisionZipConfig) -> Transform:
    def transform(units):
        return [visionzip_unit(u, config.keep_ratio, config.contextual_ratio) for u in units]

    return transform


@register_method(VisionZipConfig)
def _parts(config: VisionZipConfig, family) -> MethodParts:
    return MethodParts(
        probe=cls_attention_probe(family, config.vision_layer),
        transform=visionzip_transform(config),
        positions=config.positions,
        budget=config.budget,
    )
