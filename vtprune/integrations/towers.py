"""Vision-tower facts, shared by every family that uses the tower (keyed by ``vision_config.model_type``).

A tower tells: its attention modules by layer, whether it has a [CLS] token, which layer to read by
default (the one that produces the features the LLM sees), and how a per-patch statistic recorded at one
layer maps to one value per visual token the LLM sees (dropping [CLS], averaging merged patches, undoing
window order). A family with a known tower gets all of this for free: LLaVA-NeXT reuses the CLIP tower,
LLaVA-OneVision the SigLIP tower. Families that rearrange the tower's rows themselves (anyres crops packed
with row separators) read :meth:`VisionTower.feature_values` and do the packing (see
:meth:`~vtprune.integrations.Integration.token_scores`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedError, UsageError

__all__ = [
    "VisionTower",
    "register_tower",
    "get_tower",
    "ClipTower",
    "SiglipTower",
    "QwenViTTower",
    "InternViTTower",
]

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

    def feature_values(self, records: list[torch.Tensor], encode_args: dict[str, Any]) -> torch.Tensor:
        """The probe's records as ``(rows, positions)``: one row per image the tower encoded (an image, a
        crop, a tile: a row of the tower's batch), one value per feature position the projector receives,
        before a family rearranges rows into LLM tokens. Towers whose rows map one to one to units need
        only :meth:`to_tokens`."""
        raise NotImplementedError(f"{type(self).__name__} does not expose per-row feature values")


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

    def feature_values(self, records, encode_args):
        """``(rows, positions)``: the record of each tower row with the columns the projector does not see
        dropped (HF drops the first token under the ``"default"`` strategy: [CLS] on CLIP)."""
        if len(records) != 1:
            raise RuntimeError(f"expected one attention record per encoder call, got {len(records)}")
        (scores,) = records  # (rows, tokens)
        strategy = (
            encode_args.get("vision_feature_select_strategy")
            or self.model.config.vision_feature_select_strategy
        )
        return scores[:, 1:] if strategy == "default" else scores

    def to_tokens(self, records, units, encode_args):
        if encode_args.get("image_sizes") is not None:
            raise UnsupportedError(
                "this family encodes images at variable resolution (image_sizes) and has no token layout in "
                "vtprune; families that pack crops map scores themselves (Integration.token_scores)"
            )
        scores = self.feature_values(records, encode_args)  # (num_images, num_patches)
        if scores.shape[0] != len(units) or any(f.shape[0] != scores.shape[1] for f in units):
            raise RuntimeError(
                f"tower attention has shape {tuple(scores.shape)} but the features are "
                f"{[tuple(f.shape) for f in units]}"
            )
        return list(scores.unbind(0))


@register_tower
class SiglipTower(ClipTower):
    """SigLIP ViT (LLaVA-OneVision): a square patch grid and **no** [CLS] token; features from
    ``vision_feature_layer`` (OneVision: -1, the last encoder layer, with the ``"full"`` strategy: every
    patch is a visual token).

    With no [CLS], methods that need a per-patch importance read a CLS-free statistic (FasterVLM:
    ``"received"``, the mean attention a patch receives from all patches of its own tower row, over heads).
    Records are ``(rows, patches)``; the layer index follows ``hidden_states`` as for CLIP.
    """

    vision_types = ("siglip_vision_model",)
    has_cls = False

    def attention_modules(self) -> list[nn.Module]:
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None:
            raise UnsupportedError(
                f"vision tower {type(self.model.model.vision_tower).__name__} is not SigLIP-like "
                "(.encoder.layers)"
            )
        return [layer.self_attn for layer in layers]


@register_tower
class QwenViTTower(VisionTower):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL ViT: no [CLS]; ``spatial_merge_size**2`` patches merge into one LLM
    token.

    A merged token takes the mean of its patches. The default layer is the last full-attention block
    (window-attention blocks cannot relate a patch to the whole image and are refused). Qwen2.5-VL runs
    its blocks in window order: values are mapped back to the raw (row-major) order the LLM sees. Qwen3-VL's
    blocks all attend fully (no window order; its deepstack mergers read intermediate blocks, the main
    merger the last one, the default). Every block attends within one frame (one temporal patch group of a
    video; ``cu_seqlens``), so a received-attention record is per frame.
    """

    vision_types = ("qwen2_vl_vision", "qwen2_5_vl_vision", "qwen3_vl_vision", "qwen3_vl_moe_vision")
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


@register_tower
class InternViTTower(ClipTower):
    """InternViT (InternVL2.5 / InternVL3, transformers' ``internvl``): [CLS] + a square patch grid per tower
    row. Dynamic tiling makes every tile of an image, and its thumbnail, one row of the tower's batch with
    its own [CLS]. The LLM sees ``vision_feature_layer``'s patches ([CLS] dropped, the ``"default"``
    strategy) after ``pixel_shuffle`` (``downsample_ratio`` 0.5) folded each 2x2 block of patches into one
    token (256 tokens per 448px tile).

    A merged token's value is the **sum** of its patches' values. For FasterVLM's [CLS] attention this is
    the attention mass the tile's [CLS] puts on the part of the tile the token carries (the 4 patches' shares
    of one softmax add up; the mean ranks identically, every token folding exactly 4 patches, but reads as
    no share of anything). The 2x2 grouping is the model's own ``pixel_shuffle`` applied to the value map, so
    it follows the features exactly. Records are ``(tiles, 1 + patches)``; layer indices follow
    ``hidden_states`` as for CLIP.
    """

    vision_types = ("internvl_vision",)
    has_cls = True

    def attention_modules(self) -> list[nn.Module]:
        tower = self.model.model.vision_tower
        layers = getattr(getattr(tower, "encoder", None), "layer", None)
        if layers is None:
            raise UnsupportedError(
                f"vision tower {type(tower).__name__} is not InternViT-like (.encoder.layer)"
            )
        return [layer.attention for layer in layers]

    def feature_values(self, records, encode_args):
        strategy = (
            encode_args.get("vision_feature_select_strategy")
            or self.model.config.vision_feature_select_strategy
        )
        if strategy != "default":
            raise UnsupportedError(
                f"InternVL with vision_feature_select_strategy={strategy!r}: the model folds a square patch "
                "grid, so only 'default' ([CLS] dropped) has a token layout"
            )
        return super().feature_values(records, encode_args)

    def to_tokens(self, records, units, encode_args):
        values = self.feature_values(records, encode_args).float()  # (tiles, patches)
        tiles, patches = values.shape
        side = math.isqrt(patches)
        if side * side != patches:
            raise RuntimeError(f"InternViT recorded {patches} patches per tile, not a square grid")
        shuffled = self.model.model.pixel_shuffle(
            values.reshape(tiles, side, side, 1), scale_factor=self.model.config.downsample_ratio
        )
        merged = shuffled.sum(-1).reshape(tiles, -1)  # (tiles, tokens per tile), the LLM's token order
        if merged.shape[0] != len(units) or any(f.shape[0] != merged.shape[1] for f in units):
            raise RuntimeError(
                f"tower attention maps to {tuple(merged.shape)} tokens but the features are "
                f"{[tuple(f.shape) for f in units]}"
            )
        return list(merged.unbind(0))
