"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``).

Their ViT has no [CLS] token. The CLS-free score used in its place ("received attention") is the mean
attention a token receives from all patches of its image, averaged over heads, at the last
full-attention block; a merged visual token (``spatial_merge_size**2`` patches) scores the mean of its
patches. Qwen2.5-VL runs its blocks in window order: scores are mapped back to the raw (row-major)
order of the merged tokens that the LLM sees. Positions are M-RoPE ids, so kept tokens keep their
original positions.
"""

from __future__ import annotations

import torch

from .base import Integration, register_integration

__all__ = ["QwenVLIntegration"]


@register_integration
class QwenVLIntegration(Integration):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    default_positions = "original"

    def check(self, config) -> None:
        if getattr(config, "positions", "auto") == "contiguous":
            raise ValueError(
                "positions='contiguous' is undefined for M-RoPE (3-D image positions); use 'original' or 'auto'"
            )

    def _full_attention_blocks(self) -> list[int]:
        visual = self.inner.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        return list(full) if full is not None else list(range(len(visual.blocks)))

    def probe_target(self, config, kind: str):
        blocks = self.inner.visual.blocks
        full = self._full_attention_blocks()
        layer = getattr(config, "vision_layer", None)
        if layer is None:
            if not full:
                raise NotImplementedError(
                    "this vision tower has no full-attention block to score tokens with"
                )
            layer = full[-1]
        elif layer < 0:
            layer = len(blocks) + layer
        if not 0 <= layer < len(blocks):
            raise ValueError(f"vision_layer {layer} is out of range for a {len(blocks)}-block vision tower")
        if layer not in full:
            raise ValueError(
                f"vision block {layer} uses window attention, which cannot score tokens image-wide; "
                f"choose one of the full-attention blocks {full}"
            )
        return blocks[layer].attn, "received"

    def image_scores(self, records, features, encode_args):
        grid = encode_args.get("image_grid_thw")
        if grid is None:
            raise ValueError("image_grid_thw is required to map Qwen-VL vision scores to visual tokens")
        visual = self.inner.visual
        unit = visual.spatial_merge_size**2
        patch_scores = torch.cat([r.reshape(-1) for r in records])
        sizes = grid.prod(-1).tolist()
        if patch_scores.numel() != sum(sizes):
            raise RuntimeError(f"probe recorded {patch_scores.numel()} patches, the grid has {sum(sizes)}")
        windowed = hasattr(visual, "window_size")
        scores = []
        for image_grid, per_image in zip(grid, patch_scores.split(sizes)):
            merged = per_image.view(-1, unit).mean(-1)
            if windowed:
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(
                    image_grid[None].cpu(), visual.spatial_merge_size, visual.window_size, visual.patch_size
                )
                raw = torch.empty_like(merged)
                raw[window_index.to(merged.device)] = merged
                merged = raw
            scores.append(merged)
        if [s.numel() for s in scores] != [f.shape[0] for f in features]:
            raise RuntimeError("scores and image features disagree on the number of visual tokens per image")
        return scores
