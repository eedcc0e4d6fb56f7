"""From per-token scores to the set of kept visual tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["keep_count", "top_k_indices", "SampleSelection", "select_visual_tokens", "frame_floor"]


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Number of tokens kept out of ``num_tokens``: round-half-up of ``ratio * n``, at least 1.

    LLaVA-1.5's 576 tokens give 144 / 58 / 29 at ratios 0.25 / 0.10 / 0.05, the counts FasterVLM reports.
    """
    return min(num_tokens, max(1, math.floor(num_tokens * keep_ratio + 0.5)))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, returned in ascending (original spatial) order.

    Ties go to the lower index: a stable descending sort makes the choice deterministic.
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


@dataclass
class SampleSelection:
    """What pruning kept for one sample of a batch.

    Attributes:
        kept_visual: indices (ascending) into this sample's visual tokens of the tokens kept.
        kept_columns: indices (ascending) into the original prompt of every token the LLM saw (its
            first decoder layer): the prompt's columns that the prefill's cache holds.
        visual_in / visual_out: visual tokens before / after pruning.
        tokens_in / tokens_out: prompt tokens (padding excluded) before / after pruning before the LLM.
        layer_visual: visual tokens each decoder layer processed at prefill (for in-LLM methods this
            falls layer by layer; FLOPs are counted from it).
        output_columns: indices (ascending) into the original prompt of the tokens whose logits (and last
            hidden states) the prefill's forward returned: ``kept_columns``, less the visual tokens an
            in-LLM method dropped before the last decoder layer. A wrapped model's ``logits`` have one
            column per such token, right-aligned per sample (``logits[b, -n:]`` with
            ``n = len(output_columns)``; the columns before are padding), so that ``logits[:, -1]`` is
            always the last prompt token and the last ``k`` columns are the last ``k`` prompt tokens when
            those are text (an answer being scored).
    """

    kept_visual: torch.Tensor
    kept_columns: torch.Tensor
    visual_in: int
    visual_out: int
    tokens_in: int
    tokens_out: int
    layer_visual: list[int]
    output_columns: torch.Tensor | None = None

    @property
    def exit_layer(self) -> int | None:
        """Last decoder layer that saw visual tokens, when they all left before the end (visual-token exit)."""
        gone = [i for i, n in enumerate(self.layer_visual) if n == 0]
        return gone[0] - 1 if gone and self.visual_in > 0 else None


def select_visual_tokens(
    image_mask: torch.Tensor,
    scores: list[torch.Tensor],
    keep: Callable[[int], int],
    groups: list[torch.Tensor | None] | None = None,
    num_image_tokens: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Keep the top ``keep(n)`` tokens of each image (or of each budget group of it), without a host sync
    when no image has groups.

    Args:
        image_mask: ``(batch, seq)`` bool, True at image placeholder tokens. Images are laid out in
            placeholder order over the flattened ``(batch, seq)``, as ``masked_scatter`` fills them.
        scores: one ``(n_i,)`` tensor per image (budget unit), in that order; higher is kept first.
        keep: tokens kept out of ``n`` (``1 <= keep(n) <= n``).
        groups: per image, None (one group) or a ``(n_i,)`` long tensor of budget groups; the rule applies to
            each group ``>= 0`` separately and tokens of group -1 are always kept (and not counted).
        num_image_tokens: the number of placeholder tokens, when the caller knows it on the host; it is
            checked against the scores (otherwise read from the device, one sync).

    Returns:
        keep mask: ``(batch, seq)`` bool, False only at pruned image tokens.
        kept: visual tokens kept per image (host ints, pinned tokens included).
    """
    sizes = [int(s.numel()) for s in scores]
    if num_image_tokens is None:
        num_image_tokens = int(image_mask.sum())
    if num_image_tokens != sum(sizes):
        raise ValueError(
            f"the prompt has {num_image_tokens} image tokens but the image features have {sum(sizes)}; "
            "the processor and the model disagree on the number of visual tokens per image"
        )
    if not sizes:
        return torch.ones_like(image_mask), []
    groups = groups or [None] * len(sizes)
    device = image_mask.device
    kept = [keep(n) for n in sizes]
    if all(g is None for g in groups) and len(set(sizes)) == 1:  # one batched sort (LLaVA: always)
        stacked = torch.stack([s.to(device) for s in scores]).float()
        order = torch.sort(stacked, dim=-1, descending=True, stable=True).indices[:, : kept[0]]
        keep_img = torch.zeros_like(stacked, dtype=torch.bool).scatter_(1, order, True).reshape(-1)
    else:
        masks = []
        for i, (s, n, g) in enumerate(zip(scores, sizes, groups)):
            if g is None:
                index = top_k_indices(s.to(device), kept[i])
                masks.append(torch.zeros(n, dtype=torch.bool, device=device).scatter_(0, index, True))
                continue
            masks.append(_select_groups(s, g, keep).to(device))
            kept[i] = int(masks[-1].sum())
        keep_img = torch.cat(masks).to(device)
    return image_mask.logical_not().masked_scatter(image_mask, keep_img), kept


def _select_groups(scores: torch.Tensor, groups: torch.Tensor, keep: Callable[[int], int]) -> torch.Tensor:
    """``(n,)`` bool: the top ``keep(n_g)`` of each group ``g >= 0``, and every token of group -1."""
    groups = groups.to(scores.device)
    mask = groups < 0
    for g in torch.unique(groups[groups >= 0]).tolist():
        members = (groups == g).nonzero().squeeze(-1)
        mask[members[top_k_indices(scores[members], keep(members.numel()))]] = True
    return mask


def kept_visual_indices(keep: torch.Tensor, image_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, ascending indices into its visual tokens of those ``keep`` kept."""
    rank = image_mask.long().cumsum(-1) - 1
    chosen = keep & image_mask
    return [rank[b][chosen[b]].cpu() for b in range(keep.shape[0])]


def frame_floor(scores: torch.Tensor | None, frames: torch.Tensor | None) -> torch.Tensor | None:
    """The per-frame floor of a budget that spans several frames (a video): ``scores`` ``(n,)`` with the
    best-scored token of each frame (the first on ties) raised above every other token, their order among
    themselves unchanged, so that a top-``k`` keeps one token of every frame first (the best frames' when
    ``k`` is below the frame count) and fills the rest by score. ``frames``: ``(n,)`` long frame index, or
    None (one frame: ``scores`` unchanged). A budget group within one frame is unaffected (its top-1 is its
    floor token already)."""
    if scores is None or frames is None:
        return scores
    s = scores.float()
    frames = frames.to(s.device)
    count = int(frames.max()) + 1
    best = torch.full((count,), float("-inf"), device=s.device).scatter_reduce(0, frames, s, "amax")
    is_best = s == best[frames]
    index = torch.arange(s.numel(), device=s.device)
    first = torch.full((count,), s.numel(), device=s.device).scatter_reduce(
        0, frames[is_best], index[is_best], "amin"
    )
    lift = s.max() - s.min() + 1  # every floor token above every other, order among them unchanged
    return s.index_add(0, first, torch.full_like(first, 1, dtype=s.dtype) * lift)
