"""Vision-tower facts, shared by every family that uses the tower (keyed by ``vision_config.model_type``).

A tower tells: its attention modules by layer, whether it has a [CLS] token, which layer to read by
default (the one that produces the features the LLM sees), and how a per-patch statistic recorded at one
layer maps to one value per visual token the LLM sees (dropping [CLS], averaging merged patches, undoing
window order). A family with a known tower gets all of this for free: LLaVA-NeXT reuses the CLIP tower,
a SigLIP family adds one class here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedError, UsageError

__all__ = ["VisionTower", "register_tower", "get_tower", "ClipTower", "QwenViTTower"]

_TOWERS: dict[str, type[VisionTower]] = {}


def register_tower(cls: type[VisionTower]) -> type[VisionTower]:
    for vision_type in cls.vision_types:
        _TOWERS[vision_type] = cls
    return cls


def get_tower(model: nn.Module) -> VisionTower:
    vision_type = getattr(getattr(model.config, "vision_config", None), "model_type", None)
    if vision_type not in _TOWERS:
        raise UnsupportedError(
            f"vision tower {vision_type!r} has no layout in vtprune (known: {', '.join(sorted(_TOWERS))}); "
            "methods that read the vision encoder's attention cannot run on it"
        )
    return _TOWERS[vision_type](model)


class VisionTower:
    """Layout of a vision tower inside a VLM.

    Attributes:
        vision_types: the ``vision_config.model_type`` values it describes.
        has_cls: whether the tower prepends a [CLS] token.
    """

    vision_types: ClassVar[tuple[str, ...]] = ()
    has_cls: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    def attention_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def default_layer(self) -> int:
        """The layer whose attention describes the features the LLM sees."""
        raise NotImplementedError

    def resolve_layer(self, layer: int | None) -> int:
        """``layer`` (negative counts from the end; None = :meth:`default_layer`) as a checked index."""
        count = len(self.attention_modules())
        if layer is None:
            return self.default_layer()
        resolved = count + layer if layer < 0 else layer
        if not 0 <= resolved < count:
            raise UsageError(f"vision_layer {layer} is out of range for a {count}-layer vision tower")
        return resolved

    def to_tokens(
        self, records: list[torch.Tensor], units: list[torch.Tensor], encode_args: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Map the probe's records (one ``(batch, keys)`` tensor per attention call) to one ``(n_i,)`` value
        per visual token of each unit (``units``: the ``(n_i, hidden)`` features the LLM will see)."""
        raise NotImplementedError


@register_tower
class ClipTower(VisionTower):
    """CLIP ViT (LLaVA-1.5, LLaVA-NeXT): [CLS] + a square patch grid; features from ``vision_feature_layer``.

    Records are ``(num_images, 1 + patches)``. With the ``"default"`` feature strategy the LLM sees the
    patches only and the [CLS] column is dropped; with ``"full"`` it sees [CLS] as a visual token too, and
    the column stays (its value is [CLS]'s own statistic).
    """

    vision_types = ("clip_vision_model",)
    has_cls = True

    def attention_modules(self) -> list[nn.Module]:
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # transformers < 5 nests the encoder one level down
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None:
            raise UnsupportedError(
                f"vision tower {type(self.model.model.vision_tower).__name__} is not CLIP-like "
                "(.vision_model.encoder.layers)"
            )
        return [layer.self_attn for layer in layers]

    def default_layer(self) -> int:
        count = len(self.attention_modules())
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise UnsupportedError(
                f"vision_feature_layer={feature_layer!r} concatenates several layers; choose the vision layer "
                "to read explicitly (e.g. vision_layer=<encoder layer index> in the method's config)"
            )
        if feature_layer == 0 or feature_layer < -count:
            raise UsageError(
                f"vision_feature_layer={feature_layer} selects the patch embeddings, which no attention layer "
                "produced; choose the vision layer to read explicitly (e.g. vision_layer=<encoder layer index>)"
            )
        # hidden_states[f] is the output of encoder layer f - 1 (index 0 is the embeddings).
        return count + feature_layer if feature_layer < 0 else feature_layer - 1

    def to_tokens(self, records, units, encode_args):
        if encode_args.get("image_sizes") is not None:
            raise UnsupportedError("LLaVA with image_sizes (variable-resolution towers) is not supported yet")
        if len(records) != 1:
            raise RuntimeError(f"expected one attention record per encoder call, got {len(records)}")
        (scores,) = records  # (num_images, 1 + num_patches)
        if self.model.config.vision_feature_select_strategy == "default":
            scores = scores[:, 1:]
        if scores.shape[0] != len(units) or any(f.shape[0] != scores.shape[1] for f in units):
            raise RuntimeError(
                f"tower attention has shape {tuple(scores.shape)} but the features are "
                f"{[tuple(f.shape) for f in units]}"
            )
        return list(scores.unbind(0))


@register_tower
class QwenViTTower(VisionTower):
    """Qwen2-VL / Qwen2.5-VL ViT: no [CLS]; ``spatial_merge_size**2`` patches merge into one LLM token.

    A merged token takes the mean of its patches. The default layer is the last full-attention block
    (window-attention blocks cannot relate a patch to the whole image and are refused). Qwen2.5-VL runs
    its blocks in window order: values are mapped back to the raw (row-major) order the LLM sees.
    """

    vision_types = ("qwen2_vl_vision", "qwen2_5_vl_vision")
    has_cls = False

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.visual.blocks]

    def _full_attention_blocks(self) -> list[int]:
        full = getattr(self.visual, "fullatt_block_indexes", None)
        return list(full) if full is not None else list(range(len(self.visual.blocks)))

    def default_layer(self) -> int:
        full = self._full_attention_blocks()
        if not full:
            raise UnsupportedError("this vision tower has no full-attention block to score tokens with")
        return full[-1]

    def resolve_layer(self, layer: int | None) -> int:
        resolved = super().resolve_layer(layer)
        full = self._full_attention_blocks()
        if resolved not in full:
            raise UsageError(
                f"vision block {resolved} uses window attention, which cannot score tokens image-wide; "
                f"choose one of the full-attention blocks {full}"
            )
        return resolved

    def to_tokens(self, records, units, encode_args):
        grid = encode_args.get("image_grid_thw")
        if grid is None:
            raise UsageError("image_grid_thw is required to map Qwen-VL vision scores to visual tokens")
        visual = self.visual
        merge = visual.spatial_merge_size**2
        patch_scores = torch.cat([r.reshape(-1) for r in records])
        sizes = grid.prod(-1).tolist()
        if patch_scores.numel() != sum(sizes):
            raise RuntimeError(f"probe recorded {patch_scores.numel()} patches, the grid has {sum(sizes)}")
        windowed = hasattr(visual, "window_size")
        scores = []
        for image_grid, per_image in zip(grid, patch_scores.split(sizes)):
            merged = per_image.view(-1, merge).mean(-1)
            if windowed:
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(
                    image_grid[None].cpu(), visual.spatial_merge_size, visual.window_size, visual.patch_size
                )
                raw = torch.empty_like(merged)
                raw[window_index.to(merged.device)] = merged
                merged = raw
            scores.append(merged)
        if [s.numel() for s in scores] != [f.shape[0] for f in units]:
            raise RuntimeError("scores and image features disagree on the number of visual tokens per image")
        return scores
