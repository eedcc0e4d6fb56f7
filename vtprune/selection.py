"""From per-token scores to the set of kept visual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["keep_count", "top_k_indices", "SampleSelection", "select_visual_tokens"]


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
        kept_columns: indices (ascending) into the original prompt of every token the LLM saw.
        visual_in / visual_out: visual tokens before / after pruning.
        tokens_in / tokens_out: prompt tokens (padding excluded) before / after pruning before the LLM.
        layer_visual: visual tokens each decoder layer processed at prefill (for in-LLM methods this
            falls layer by layer; FLOPs are counted from it).
    """

    kept_visual: torch.Tensor
    kept_columns: torch.Tensor
    visual_in: int
    visual_out: int
    tokens_in: int
    tokens_out: int
    layer_visual: list[int]

    @property
    def exit_layer(self) -> int | None:
        """Last decoder layer that saw visual tokens, when they all left before the end (visual-token exit)."""
        gone = [i for i, n in enumerate(self.layer_visual) if n == 0]
        return gone[0] - 1 if gone and self.visual_in > 0 else None


def select_visual_tokens(
    image_mask: torch.Tensor, scores: list[torch.Tensor], keep_ratio: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keep the top ``keep_count(n_i)`` tokens of each image.

    Args:
        image_mask: ``(batch, seq)`` bool, True at image placeholder tokens. Images are laid out in
            placeholder order over the flattened ``(batch, seq)``, as ``masked_scatter`` fills them.
        scores: one ``(n_i,)`` tensor per image, in that order.
        keep_ratio: fraction kept per image.

    Returns:
        keep: ``(batch, seq)`` bool, False only at pruned image tokens.
        kept_visual: per sample, ascending indices into its visual tokens of those kept.
    """
    sizes = [int(s.numel()) for s in scores]
    flat_positions = image_mask.reshape(-1).nonzero().squeeze(-1)
    if flat_positions.numel() != sum(sizes):
        raise ValueError(
            f"the prompt has {flat_positions.numel()} image tokens but the image features have {sum(sizes)}; "
            "the processor and the model disagree on the number of visual tokens per image"
        )
    keep = torch.ones(image_mask.numel(), dtype=torch.bool, device=image_mask.device)
    kept_flat = []
    for positions, score in zip(flat_positions.split(sizes), scores):
        keep[positions] = False
        chosen = positions[top_k_indices(score, keep_count(score.numel(), keep_ratio)).to(positions.device)]
        keep[chosen] = True
        kept_flat.append(chosen)
    keep = keep.view_as(image_mask)

    seq = image_mask.shape[1]
    kept_all = torch.cat(kept_flat) if kept_flat else flat_positions.new_zeros(0)
    rank_in_sample = (image_mask.long().cumsum(-1) - 1).reshape(-1)  # index among the sample's visual tokens
    sample_of = kept_all // seq
    kept_visual = [
        torch.sort(rank_in_sample[kept_all[sample_of == b]]).values.cpu() for b in range(image_mask.shape[0])
    ]
    return keep, kept_visual
