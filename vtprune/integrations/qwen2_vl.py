"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): the Qwen ViT (no [CLS], merged patches, window
order on 2.5; see :class:`~vtprune.integrations.towers.QwenViTTower`) and M-RoPE positions, which are 3-D
for image tokens, so kept tokens always keep their original positions."""

from __future__ import annotations

from ..registry import register_family
from .base import Integration

__all__ = ["QwenVLIntegration"]


@register_family
class QwenVLIntegration(Integration):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_modes = ("original",)
    default_positions = "original"
