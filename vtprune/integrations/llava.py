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
