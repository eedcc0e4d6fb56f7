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

    def token_grids(self, units, encode_args):
        """``(h / merge, w / merge)`` per image from ``image_grid_thw``: the merged tokens the LLM sees are
        row-major over that grid (Qwen2.5-VL's window order is undone by its merger). None for a video-like
        grid (``t > 1``) or when ``image_grid_thw`` is missing."""
        grid = encode_args.get("image_grid_thw")
        if grid is None:
            return [None] * len(units)
        merge = self.model.config.vision_config.spatial_merge_size
        out = []
        for (t, h, w), unit in zip(grid.tolist(), units):
            rows, cols = h // merge, w // merge
            out.append((rows, cols) if t == 1 and rows * cols == int(unit.shape[0]) else None)
        if len(out) != len(units):
            return [None] * len(units)
        return out
