"""LLaVA-1.5 (``llava``): a CLIP tower (see :class:`~vtprune.integrations.towers.ClipTower`) and a 1-D RoPE
text model. FasterVLM (LLaVA code base) prunes the features before building the prompt, so kept tokens
take contiguous positions by default."""

from __future__ import annotations

from ..registry import register_family
from .base import Integration

__all__ = ["LlavaIntegration"]


@register_family
class LlavaIntegration(Integration):
    model_types = ("llava",)
    default_positions = "contiguous"

    def token_grids(self, units, encode_args):
        """The CLIP patch grid, ``image_size / patch_size`` a side, when a unit holds exactly its patches
        (``"default"`` feature strategy); None when [CLS] is a visual token too (``"full"``) or the tower
        runs at another resolution (``image_sizes``)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        if encode_args.get("image_sizes") is not None:
            return [None] * len(units)
        return [(side, side) if int(u.shape[0]) == side * side else None for u in units]
