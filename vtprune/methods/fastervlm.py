"""FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning").

Keep the visual tokens that the vision encoder's [CLS] token attends to most, before the LLM. The score of
patch ``j`` is the [CLS]->patch attention at the encoder layer whose output the model uses as its image
features (LLaVA-1.5: layer -2), averaged over heads; the top ``k`` patches of each image are kept in their
original spatial order. Encoders without a [CLS] token (Qwen-VL's ViT) use a documented stand-in, the mean
attention each merged token *receives* from all patches at the last full-attention layer
(``probe="received"``), chosen by the integration.
"""

from __future__ import annotations

import dataclasses

from ..config import VisualTokenConfig, register_config
from . import register_method

__all__ = ["FasterVLMConfig"]


@register_config("fastervlm")
@dataclasses.dataclass
class FasterVLMConfig(VisualTokenConfig):
    """Args:
    keep_ratio: fraction of visual tokens kept per image (paper: 0.25, 0.10, 0.05).
    positions: see :class:`~vtprune.config.VisualTokenConfig`.
    vision_layer: index of the vision-encoder layer whose attention is read; ``None`` uses the layer
        that produces the model's image features (``vision_feature_layer``; the last full-attention
        layer for Qwen-VL).
    """

    keep_ratio: float = 0.25
    vision_layer: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.vision_layer is not None and (
            isinstance(self.vision_layer, bool) or not isinstance(self.vision_layer, int)
        ):
            raise ValueError(f"vision_layer must be an int or None, got {self.vision_layer!r}")


@register_method(FasterVLMConfig, probe="cls")
def make_scorer(config: FasterVLMConfig):
    def scorer(probe_scores, sizes):
        return probe_scores

    return scorer
