"""Language-model inputs indexed by visual position, kept aligned with the visual tokens that remain.

Some families hand the language model more than embeddings: Qwen3-VL's *deepstack* adds features from
intermediate ViT layers to the hidden states of the first decoder layers, at the visual positions. Such
inputs are a ``(batch, seq)`` bool mask of the positions they belong to plus row tensors with one row per
True of the mask (row-major over ``(batch, seq)``, the order ``hidden[mask]`` reads). A family declares them
(:meth:`~vtprune.integrations.Integration.visual_side_inputs`); the engine slices mask and rows with the
same index as the tokens: once at compaction (pre-LLM pruning), and, for in-LLM dropping, again each time
the *consumer* (the language-model method that reads them between decoder layers) is called after tokens
left. Nothing here names a family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.gather import take_columns

__all__ = ["Modality", "VisualSideInputs", "take_visual_rows"]


@dataclass(frozen=True)
class Modality:
    """One kind of visual input a family prunes (images; videos on Qwen-VL).

    Attributes:
        name: its key in the base model's ``mm_encoder_outputs`` (``"image"``, ``"video"``).
        token_id: the placeholder token id of its visual tokens in ``input_ids``.
        encoder: the base model's method that encodes it (``get_image_features``...).
        pixels: the forward's keyword holding its raw input (``pixel_values``, ``pixel_values_videos``).
        rename: the encoder's / forward's keywords under the image names the family's layout questions read
            (``{"pixel_values_videos": "pixel_values", "video_grid_thw": "image_grid_thw"}``): a video is
            laid out like an image with ``t`` frames.
    """

    name: str
    token_id: int
    encoder: str
    pixels: str
    rename: tuple[tuple[str, str], ...] = ()

    def layout_args(self, args: dict) -> dict:
        """``args`` (an encoder call's or the forward's keywords) with this modality's inputs under the image
        names, and only those (another modality's inputs are dropped)."""
        if not self.rename:
            return args
        names = dict(self.rename)
        dropped = set(names.values())
        out = {k: v for k, v in args.items() if k not in dropped}
        for src, dst in names.items():
            if src in args:
                out[dst] = args[src]
        return out


@dataclass(frozen=True)
class VisualSideInputs:
    """Where a family's per-visual-position language-model inputs are.

    Attributes:
        mask: the language model forward's keyword holding the ``(batch, seq)`` bool position mask.
        rows: its keywords holding the rows: each an ``(n, ...)`` tensor or a list/tuple of them, ``n`` the
            number of True entries of the mask.
        consumer: name of the language model's method that reads them between decoder layers, or None
            (read only before the first layer).
        consumer_args: the consumer's parameter names for the mask and the rows (one ``(n, ...)`` tensor).
    """

    mask: str
    rows: tuple[str, ...]
    consumer: str | None = None
    consumer_args: tuple[str, str] = ("mask", "rows")


def take_visual_rows(mask: torch.Tensor, rows, index: torch.Tensor):
    """Slice per-visual-position inputs to the tokens ``index`` keeps.

    Args:
        mask: ``(batch, seq)`` bool, True at the positions the rows belong to.
        rows: ``(n, ...)`` tensor (``n = mask.sum()``), None, or a list/tuple of such (nested).
        index: ``(batch, K)`` long, the column of ``seq`` each kept column came from, -1 at padding (the
            engine's gather index).

    Returns:
        ``(batch, K)`` bool mask and the rows of the kept positions, in row-major order of the new mask.
    """
    index = index.to(mask.device)
    kept = take_columns(mask, index, False)
    rank = mask.reshape(-1).long().cumsum(0).view_as(mask) - 1  # row of each position in ``rows``
    pick = take_columns(rank, index, -1)[kept]
    return kept, _pick(rows, pick)


def _pick(rows, pick: torch.Tensor):
    if rows is None:
        return None
    if isinstance(rows, torch.Tensor):
        return rows[pick.to(rows.device)]
    return type(rows)(_pick(r, pick) for r in rows)
