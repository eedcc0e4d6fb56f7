"""Shorten the LLM's input to the kept tokens, and keep later calls consistent with the shorter cache.

Callers (``generate`` included) keep working in *original* coordinates: the prompt length, attention mask
and position ids they pass describe the unpruned prompt. The language model only ever sees *compact*
coordinates: the kept tokens of each sample, left-padded to a common length so that the last column is
always the last real token. :class:`Prefix` remembers how the two map for the cache the prefill filled, and
travels with that cache (:meth:`Prefix.attach`): the cache's ``get_seq_length()`` then reports the length in
original coordinates (the unpruned prompt plus every token fed since) to everything outside the language
model, so that ``generate()`` and the model's own code slice, number and mask a continuation of the cache
(a later turn of a conversation) exactly as they would without pruning. Inside a language-model forward
(:func:`compact_view`) the cache reports what it holds.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..kernels.gather import gather_tokens, keep_mask_to_index

__all__ = ["Compacted", "Prefix", "compact", "cache_length", "compact_view", "padded_length", "prefix_of"]

_VIEW = threading.local()


def cache_length(cache) -> int:
    """The number of tokens ``cache`` holds (its compact length for a cache a pruned prefill filled)."""
    if cache is None:
        return 0
    return int(type(cache).get_seq_length(cache))


def padded_length(n: int, multiple: int | None, limit: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (None: ``n``), at most ``limit`` (the input length)."""
    if multiple is None:
        return n
    return min(-(-n // multiple) * multiple, limit)


@contextlib.contextmanager
def compact_view():
    """While inside, caches a pruned prefill filled report the length they hold (the language model's
    coordinates) instead of the caller's original one."""
    _VIEW.depth = getattr(_VIEW, "depth", 0) + 1
    try:
        yield
    finally:
        _VIEW.depth -= 1


def prefix_of(cache) -> Prefix | None:
    """The :class:`Prefix` a pruned prefill attached to ``cache``, or None."""
    report = getattr(cache, "__dict__", {}).get("get_seq_length")
    return report.prefix if isinstance(report, _OriginalLength) else None


class _OriginalLength:
    """``cache.get_seq_length`` of a cache holding a pruned prefill: the stored length plus the tokens the
    prefill dropped (per layer: an in-LLM method leaves later layers fewer prompt tokens), outside
    :func:`compact_view`. It holds the cache weakly (no reference cycle keeps a cache's tensors alive), and
    a deep copy of the cache (``copy.deepcopy(prompt_cache)`` to reuse a prompt) carries a copy of it."""

    def __init__(self, cache, prefix: Prefix):
        self._cache = weakref.ref(cache)
        self.prefix = prefix

    def __call__(self, layer_idx: int = 0) -> int:
        cache = self._cache()
        stored = type(cache).get_seq_length(cache, layer_idx)
        # The view first: inside it nothing reads the stored length (a device tensor for static caches).
        if getattr(_VIEW, "depth", 0) or stored == 0:
            return stored
        return stored + self.prefix.dropped(layer_idx)

    def __deepcopy__(self, memo):
        cache = self._cache()
        return _OriginalLength(memo.get(id(cache), cache), copy.deepcopy(self.prefix, memo))


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
    """How the compact cache filled at prefill maps back to the caller's original coordinates.

    Attributes:
        owner: a weak reference to the object that pruned the prefill (only it may continue the cache).
        orig_len / kept_len: prompt length in original / compact coordinates.
        mask: ``(batch, kept_len)`` compact 2-D padding mask of the prompt.
        shift: ``(batch,)`` how far positions after the prompt move down.
        layer_masks: per decoder layer, the compact 2-D mask of the prompt part that layer's cache holds when
            an in-LLM method left it fewer tokens than layer 0, else None (None: no layer plan).
        aside: whatever else later calls on this cache need (e.g. features kept aside for adapters).
    """

    owner: weakref.ref
    orig_len: int
    kept_len: int
    mask: torch.Tensor  # (batch, kept_len)
    shift: torch.Tensor  # (batch,)
    layer_masks: list | None = None
    aside: object = None

    def attach(self, cache) -> None:
        """Travel with ``cache``: from now on it reports its length in original coordinates."""
        cache.get_seq_length = _OriginalLength(cache, self)

    @staticmethod
    def detach(cache) -> None:
        """``cache`` no longer holds a pruned prefill (it was emptied and is being filled anew)."""
        if prefix_of(cache) is not None:
            del cache.__dict__["get_seq_length"]

    def owns(self, cache) -> bool:
        return cache is not None and prefix_of(cache) is self

    def prompt_len(self, layer_idx: int = 0) -> int:
        """Prompt tokens ``layer_idx``'s cache holds (compact)."""
        masks = self.layer_masks
        if masks is not None and 0 <= layer_idx < len(masks) and masks[layer_idx] is not None:
            return int(masks[layer_idx].shape[1])
        return self.kept_len

    def dropped(self, layer_idx: int = 0) -> int:
        """Original minus stored length of ``layer_idx``'s cache."""
        return self.orig_len - self.prompt_len(layer_idx)

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
                raise UsageError(
                    "vtprune translates 2-D padding masks only; got a mask of shape "
                    f"{tuple(attention_mask.shape)} while decoding a pruned prompt"
                )
            expected = self.orig_len + new + q_len
            if attention_mask.shape[-1] != expected or attention_mask.shape[0] != batch:
                raise UsageError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but this call continues a cache "
                    f"of {batch} sequences holding {self.orig_len + new} tokens (original coordinates: a "
                    f"{self.orig_len}-token pruned prompt and {new} tokens since) with {q_len} new tokens: "
                    f"expected {expected} columns, the mask of the whole (unpruned) sequence as generate() "
                    "passes it"
                )
            tail = attention_mask[:, self.orig_len :].to(self.mask.dtype)
        mask = torch.cat([self.mask.to(tail.device), tail], dim=-1)
        if position_ids is None:
            start = self.orig_len + new
            position_ids = torch.arange(start, start + q_len, device=mask.device).expand(batch, q_len)
        position_ids = position_ids - self.shift.to(position_ids.device)[:, None]
        return mask, position_ids
