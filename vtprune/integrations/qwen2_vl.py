"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): the Qwen ViT (no [CLS], merged patches, window
order on 2.5; see :class:`~vtprune.integrations.towers.QwenViTTower`) and M-RoPE positions, which are 3-D
for image tokens, so kept tokens always keep their original positions.

Videos are pruned as well (``pixel_values_videos``, ``video_grid_thw``): a video of ``t`` frames (temporal
patch groups of ``temporal_patch_size`` input frames) is ``t`` stacked ``(h / merge) x (w / merge)`` token
grids, and the ViT attends within each frame, so a received-attention score is per frame. Budget
(``budget=``): ``"frame"`` (default) keeps ``keep(n)`` tokens of every frame (an image is one frame);
``"image"`` keeps ``keep(n)`` of each whole video, ranked across its frames, every frame keeping at least its
best token (the per-frame floor). Kept video tokens keep their temporal M-RoPE position (and Qwen3-VL's
timestamp text tokens are text: never pruned).
"""

from __future__ import annotations

import torch

from ..registry import register_family
from ..runtime.visual_inputs import Modality
from .base import Integration

__all__ = ["QwenVLIntegration"]


@register_family
class QwenVLIntegration(Integration):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_modes = ("original",)
    default_positions = "original"
    budget_modes = ("frame", "image")

    def modalities(self) -> list[Modality]:
        video = Modality(
            "video",
            self.model.config.video_token_id,
            "get_video_features",
            "pixel_values_videos",
            (("pixel_values_videos", "pixel_values"), ("video_grid_thw", "image_grid_thw")),
        )
        return [*super().modalities(), video]

    def _grids(self, units, encode_args) -> list[tuple[int, int, int] | None]:
        """``(t, h / merge, w / merge)`` per unit from ``image_grid_thw`` (a video's ``video_grid_thw`` under
        that name), None where it is missing or disagrees with the unit's token count."""
        grid = encode_args.get("image_grid_thw")
        if grid is None or len(grid) != len(units):
            return [None] * len(units)
        merge = self.model.config.vision_config.spatial_merge_size
        out = []
        for (t, h, w), unit in zip(grid.tolist(), units):
            thw = (t, h // merge, w // merge)
            out.append(thw if t * thw[1] * thw[2] == int(unit.shape[0]) else None)
        return out

    def token_grids(self, units, encode_args):
        """``(h / merge, w / merge)`` per image from ``image_grid_thw``: the merged tokens the LLM sees are
        row-major over that grid (Qwen2.5-VL's window order is undone by its merger). A video's frames are
        stacked: ``(t * h / merge, w / merge)`` (a transform's windows may span consecutive frames). None
        when ``image_grid_thw`` is missing."""
        return [None if g is None else (g[0] * g[1], g[2]) for g in self._grids(units, encode_args)]

    def token_groups(self, units, encode_args, budget):
        """``"frame"``: each frame of a video is its own budget group; otherwise one group per unit."""
        if budget != "frame":
            return [None] * len(units)
        return [
            None if g is None or g[0] == 1 else _frame_index(g, units[0].device)
            for g in self._grids(units, encode_args)
        ]

    def token_frames(self, units, encode_args):
        return [
            None if g is None or g[0] == 1 else _frame_index(g, units[0].device)
            for g in self._grids(units, encode_args)
        ]


def _frame_index(grid: tuple[int, int, int], device) -> torch.Tensor:
    t, h, w = grid
    return torch.arange(t, device=device).repeat_interleave(h * w)
