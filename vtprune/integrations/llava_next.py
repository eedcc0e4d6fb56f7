"""LLaVA-NeXT (``llava_next``, "anyres"): a CLIP tower (see :class:`~vtprune.integrations.towers.ClipTower`)
run on several views of each image, and a 1-D RoPE text model (Vicuna / Mistral / Llama-3).

Layout, as transformers' ``LlavaNextModel`` builds it (and as the checkpoints were trained): each image is
a base view (the whole image resized to the tower's resolution) plus a grid of crops of a higher-resolution
copy (``image_grid_pinpoints``); every view is one row of the tower's batch, with its own [CLS].
``pack_image_features`` then keeps the base view's patches as they are, stitches the crops' patches into one
high-resolution grid, removes the rows or columns that only cover the padding ("unpad"), and appends one
``image_newline`` token after each row of that grid. One image is one budget unit: ``base patches``,
then row by row ``grid patches + newline``.

What vtprune does on it:

* **Scores follow the features.** A visual token's score is its patch's statistic in the tower row it
  came from (FasterVLM: that view's [CLS] attention at the feature layer, mean over heads), and the
  per-patch values of all rows are packed by the model's own ``pack_image_features`` - the scores ride
  as one extra channel of a fake feature tensor - so they are unpadded, stitched (and, on OneVision,
  interpolated) exactly as the features are. The same packing carries one-hot view channels and a
  newline flag, which give each LLM token its view and mark the separators.
* **Budget** (``budget=`` on pre-LLM configs): ``"crop"`` (default) keeps ``keep(n)`` tokens of each view
  separately - the base view and every crop, ``n`` counting that view's tokens left after unpadding - as
  FasterVLM's code applies its ``k`` to every crop; ``"image"`` is one top-``keep(n)`` over all patch
  tokens of the image. Scores of different views come from different softmaxes ([CLS] of each view), so
  ranking them against each other is a choice the user makes with ``"image"``.
* **Newline tokens are never pruned** (budget group -1: always kept, not counted in ``n``): they are
  layout tokens, not patches. This holds for every pre-LLM selection (FasterVLM, random...), also for
  features encoded before ``wrap`` (the layout is rebuilt from the call's ``image_sizes``, which such a
  call must then pass). In-LLM methods (FastV, static exit, DyVTE, schedules) treat every image
  placeholder, newlines included, as a visual token.
* **Positions**: contiguous by default (kept tokens renumbered, as FasterVLM's LLaVA code does);
  ``positions="original"`` keeps the original ones.

Deviation from FasterVLM's own code (Theia-4869/FasterVLM, LLaVA-NeXT branch of ``encode_images``): it
hard-codes ``mm_patch_merge_type="spatial"`` - no unpadding and no newline tokens - and the paper's
LLaVA-NeXT numbers use a fixed 672x672 input (5 views x 576 = 2880 tokens; k per view). vtprune keeps the
checkpoint's own ``spatial_unpad`` layout with newlines (the model was trained on it), prunes only patch
tokens, and applies the budget per view after unpadding, so its token counts at a given ratio differ from
the paper's for non-square images and exclude the (always kept) newline tokens.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from ..errors import UsageError
from ..registry import register_family
from .base import Integration, grid_boxes

__all__ = ["LlavaNextIntegration"]

_FLAG, _VIEW0 = 1, 2  # channels of the packed layout tensor: 0 value, 1 newline flag, 2.. one-hot view


@register_family
class LlavaNextIntegration(Integration):
    model_types = ("llava_next",)
    default_positions = "contiguous"
    budget_modes = ("crop", "image")

    # ----------------------------------------------------------------------------------- layout facts
    def token_groups(self, units, encode_args, budget):
        """Per image: the view of each token (0 the base view, 1.. the crops in the tower's order) under
        ``budget="crop"``, 0 for every patch token under ``"image"``; -1 for newline tokens."""
        layout = self._layout(encode_args, None, units)
        if budget == "crop":
            return [view for _, view in layout]
        return [torch.where(view >= 0, 0, -1) for _, view in layout]

    def token_scores(self, records, units, encode_args):
        """The tower's per-row values (:meth:`~vtprune.integrations.towers.VisionTower.feature_values`)
        packed by the model's own ``pack_image_features``; newline tokens score 0 (they are kept anyway)."""
        values = self.vision_tower().feature_values(records, encode_args).float()
        return [score for score, _ in self._layout(encode_args, values, units)]

    def token_grids(self, units, encode_args):
        """None: a unit is a base grid followed by an unpadded grid with a newline token per row, not one
        row-major grid."""
        return [None] * len(units)

    def token_boxes(self, image_tokens, encode_args, original_sizes=None):
        """The base view's grid over the whole image (view 0), then the stitched, unpadded grid of the
        crops (view 1; unpadding removed what covered padding, so that grid spans the image); newline
        tokens have NaN boxes. Read from the packed layout (:meth:`_layout`), not from a copy of the
        geometry."""
        layout = self._layout(encode_args, None, [torch.empty(n, 0) for n in image_tokens])
        return [_anyres_boxes(view) for _, view in layout]

    # ---------------------------------------------------------------------- HF's geometry, reused
    def _hf(self, name: str):
        """A function of the model's own modeling module (``image_size_to_num_patches``...)."""
        return getattr(sys.modules[type(self.base_model).__module__], name)

    def _image_sizes(self, encode_args: dict[str, Any]) -> list[list[int]]:
        sizes = encode_args.get("image_sizes")
        if sizes is None:
            raise UsageError(
                f"{self.model.config.model_type}: these image features were encoded before vtprune.wrap and "
                "the call has no image_sizes, so vtprune cannot tell the newline tokens from patches; pass "
                "pixel_values with image_sizes (or image_sizes along with the features)"
            )
        return sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]

    def _views(self, sizes: list[list[int]], encode_args: dict[str, Any]) -> list[int]:
        """Tower rows of each image (base view + crops), as ``get_image_features`` splits them."""
        cfg = self.model.config
        count = self._hf("image_size_to_num_patches")
        return [
            count(
                image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            for s in sizes
        ]

    def _pack(
        self, maps: list[torch.Tensor], sizes, newline: torch.Tensor, encode_args
    ) -> list[torch.Tensor]:
        strategy = (
            encode_args.get("vision_feature_select_strategy")
            or self.model.config.vision_feature_select_strategy
        )
        packed, _ = self.base_model.pack_image_features(
            maps, torch.tensor(sizes), vision_feature_select_strategy=strategy, image_newline=newline
        )
        return packed

    def _layout(
        self, encode_args: dict[str, Any], values: torch.Tensor | None, units: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, ``(value, view)`` of each LLM token: ``values`` (``(rows, positions)``, one tower row
        per view; None: zeros) packed as the features are, and the view each token comes from (-1: newline).

        The packing is the model's own ``pack_image_features`` on a fake feature tensor whose channels are
        the value, a newline flag (set only in the newline vector) and one one-hot channel per view. A token
        that interpolation blends from several views (OneVision's ``anyres_max``) belongs to the view with
        the largest weight (the first on a tie)."""
        sizes = self._image_sizes(encode_args)
        views = self._views(sizes, encode_args)
        if not views:
            return []
        vision = self.model.config.vision_config
        if values is None:
            side = vision.image_size // vision.patch_size
            values = torch.zeros(sum(views), side * side)
        if values.shape[0] != sum(views):
            raise RuntimeError(
                f"the vision tower encoded {values.shape[0]} views but image_sizes imply {sum(views)} ({views})"
            )
        channels = _VIEW0 + max(views)
        maps, start = [], 0
        for count in views:
            fake = values.new_zeros(count, values.shape[1], channels)
            fake[..., 0] = values[start : start + count]
            fake[..., _VIEW0 : _VIEW0 + count] = torch.eye(count, device=values.device)[:, None, :]
            maps.append(fake)
            start += count
        newline = values.new_zeros(channels)
        newline[_FLAG] = 1.0
        packed = self._pack(maps, sizes, newline, encode_args)
        layout = []
        for fake in packed:
            view = fake[:, _VIEW0:].argmax(-1)
            layout.append((fake[:, 0], view.masked_fill(fake[:, _FLAG] > 0.5, -1)))
        if [int(v.numel()) for _, v in layout] != [int(u.shape[0]) for u in units]:
            raise RuntimeError(
                f"packed layout has {[int(v.numel()) for _, v in layout]} tokens per image but the features "
                f"have {[int(u.shape[0]) for u in units]}"
            )
        return layout


def _anyres_boxes(view: torch.Tensor) -> torch.Tensor | None:
    """Boxes of one packed image from its tokens' views (0 base, 1.. crops, -1 newline): the base tokens
    first (a square grid), then rows of crop tokens each closed by a newline. None for another layout."""
    view = view.cpu()
    boxes = torch.full((view.numel(), 5), float("nan"), dtype=torch.float64)
    n_base = int((view == 0).sum())
    side = math.isqrt(n_base)
    if side * side != n_base or not bool((view[:n_base] == 0).all()):
        return None
    boxes[:n_base] = grid_boxes(side, side, 0)
    rest = view[n_base:]
    ends = (rest < 0).nonzero().squeeze(-1).tolist()
    starts = [0] + [e + 1 for e in ends[:-1]]
    rows = [(s, e) for s, e in zip(starts, ends) if e > s]
    if not rows:
        return boxes
    cols = rows[0][1] - rows[0][0]
    if any(e - s != cols for s, e in rows) or (ends and ends[-1] != rest.numel() - 1):
        return None
    grid = grid_boxes(len(rows), cols, 1)
    for r, (s, e) in enumerate(rows):
        boxes[n_base + s : n_base + e] = grid[r * cols : (r + 1) * cols]
    return boxes
