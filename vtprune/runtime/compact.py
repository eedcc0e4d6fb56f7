"""Shorten the LLM's input to the kept tokens, and keep later calls consistent with the shorter cache.

Callers (``generate`` included) keep working in *original* coordinates: the prompt length, attention mask
and position ids they pass describe the unpruned prompt. The language model only ever sees *compact*
coordinates: the kept tokens of each sample, left-padded to a common length so that the last column is
always the last real token. :class:`Prefix` remembers how the two map for the cache the prefill filled.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..kernels.gather import gather_tokens, keep_mask_to_index

__all__ = ["Compacted", "Prefix", "compact", "cache_length"]


def cache_length(cache) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


@dataclass
class Compacted:
    """The compact prefill inputs.

    Attributes:
        inputs_embeds: ``(batch, K, hidden)``.
        attention_mask: ``(batch, K)`` long, 0 at left padding.
        position_ids: same leading dims as the input positions, last dim ``K``.
        index: ``(batch, K)`` original column of each compact column, -1 at padding.
        shift: ``(batch,)`` how far positions after the prompt move down (0 in ``original`` mode).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    shift: torch.Tensor


def compact(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    keep: torch.Tensor,
    contiguous: bool,
    size: int | None = None,
) -> Compacted:
    """Gather the kept, non-padding tokens of each sample.

    Args:
        inputs_embeds: ``(batch, seq, hidden)``.
        attention_mask: ``(batch, seq)`` 2-D padding mask or None (no padding).
        position_ids: ``(batch, seq)``, ``(1, seq)``, ``(P, batch, seq)`` (M-RoPE) or None (``arange``).
        keep: ``(batch, seq)`` bool, False at pruned tokens.
        contiguous: renumber positions so that each kept token moves down by the number of pruned tokens
            before it, as if the prompt had held only the kept tokens.
        size: the compact length (largest kept count) when known on the host: avoids a device sync.
    """
    batch, seq = keep.shape
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            f"vtprune needs a 2-D padding mask at prefill, got shape {tuple(attention_mask.shape)}; "
            "pass the processor's attention_mask"
        )
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(keep)
    if position_ids is None:
        position_ids = torch.arange(seq, device=keep.device).expand(batch, seq)
    elif position_ids.shape[-2] != batch:
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, seq)
    dropped = real & ~keep
    if contiguous:
        position_ids = position_ids - torch.cumsum(dropped.long(), dim=-1)
        shift = dropped.sum(-1)
    else:
        shift = torch.zeros(batch, dtype=torch.long, device=keep.device)
    index = keep_mask_to_index(keep & real, size)
    embeds, positions, mask = gather_tokens(inputs_embeds, index, position_ids, real.long(), check=False)
    return Compacted(embeds, mask, positions, index, shift)


@dataclass
class Prefix:
    """How the compact cache filled at prefill maps back to the caller's original coordinates."""

    cache_ref: weakref.ref
    orig_len: int
    kept_len: int
    mask: torch.Tensor  # (batch, kept_len)
    shift: torch.Tensor  # (batch,)

    def owns(self, cache) -> bool:
        return cache is not None and self.cache_ref() is cache

    def translate(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, q_len: int, past: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map a later call's 2-D mask and positions (original coordinates) to compact ones.

        Args:
            attention_mask: ``(batch, orig_len + new + q_len)`` or None (no padding).
            position_ids: ``(..., batch, q_len)`` or None (continue after the last position).
            q_len: tokens in this call.
            past: compact cache length before this call (``kept_len + new``).
        """
        new = past - self.kept_len
        batch = self.mask.shape[0]
        if attention_mask is None:
            tail = self.mask.new_ones(batch, new + q_len)
        else:
            if attention_mask.ndim != 2:
                raise ValueError(
                    "vtprune translates 2-D padding masks only; got a mask of shape "
                    f"{tuple(attention_mask.shape)} while decoding a pruned prompt"
                )
            if attention_mask.shape[-1] != self.orig_len + new + q_len:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[-1]} columns but the pruned prompt had "
                    f"{self.orig_len} tokens and {new + q_len} more were fed since; pass the mask of the full "
                    "(unpruned) sequence, as generate() does"
                )
            tail = attention_mask[:, self.orig_len :].to(self.mask.dtype)
        mask = torch.cat([self.mask.to(tail.device), tail], dim=-1)
        if position_ids is None:
            start = self.orig_len + new
            position_ids = torch.arange(start, start + q_len, device=mask.device).expand(batch, q_len)
        position_ids = position_ids - self.shift.to(position_ids.device)[:, None]
        return mask, position_ids
