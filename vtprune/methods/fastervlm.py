"""FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning").

Keep the visual tokens that the vision encoder's [CLS] token attends to most, before the LLM. The score of
patch ``j`` is the [CLS]->patch attention at the encoder layer whose output the model uses as its image
features (LLaVA-1.5: layer -2), averaged over heads; the top ``k`` patches of each image are kept in their
original spatial order. On towers without a [CLS] token (Qwen-VL's ViT) the documented stand-in is the
mean attention each merged token *receives* from all patches at the tower's default layer (the last
full-attention block): this choice is the method's, the family only says whether [CLS] exists.
"""

from __future__ import annotations

import dataclasses
import functools

from ..config import VisualTokenConfig, check_int
from ..registry import register_method
from ..runtime.parts import MethodParts, VisionProbe
from ..runtime.selection import keep_count

__all__ = ["FasterVLMConfig", "cls_attention_probe"]


@dataclasses.dataclass
class FasterVLMConfig(VisualTokenConfig):
    """Args:
    keep_ratio: fraction of visual tokens kept per image (paper: 0.25, 0.10, 0.05).
    positions: see :class:`~vtprune.config.VisualTokenConfig`.
    vision_layer: index of the vision-encoder layer whose attention is read; ``None`` uses the layer
        that produces the model's image features (``vision_feature_layer``; the last full-attention
        layer for Qwen-VL).
    """

    method = "fastervlm"

    keep_ratio: float = 0.25
    vision_layer: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int("vision_layer", self.vision_layer, optional=True)


def _probe_scores(units):
    return [unit.score for unit in units]


def cls_attention_probe(family, vision_layer: int | None) -> VisionProbe:
    """FasterVLM's score: [CLS] attention at ``vision_layer`` (None: the feature layer), or the CLS-free
    received attention on towers without [CLS] (also VisionZip's dominant-token score)."""
    tower = family.vision_tower()
    statistic = "cls" if tower.has_cls else "received"
    return VisionProbe(statistic, tower.resolve_layer(vision_layer))


@register_method(FasterVLMConfig)
def _parts(config: FasterVLMConfig, family) -> MethodParts:
    return MethodParts(
        probe=cls_attention_probe(family, config.vision_layer),
        scorer=_probe_scores,
        keep=functools.partial(keep_count, keep_ratio=config.keep_ratio),
        positions=config.positions,
        budget=config.budget,
    )
