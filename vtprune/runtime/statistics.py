"""Attention statistics an :class:`~vtprune.runtime.probe.AttentionProbe` can record, registered by name.

A statistic reads the already-projected queries and keys of one attention call and returns one value per
key, ``(batch, keys)``; it never materialises more than a bounded chunk of the attention matrix. Methods
pick a statistic by name (FasterVLM: ``"cls"``, or ``"received"`` on towers without [CLS]; FastV:
``"last"``) and may register their own with :func:`register_statistic`. The probe itself knows none of
them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UsageError
from ..kernels.received_attention import received_attention as received_attention_kernel

__all__ = ["Statistic", "register_statistic", "get_statistic", "available_statistics", "apply_mask"]

# (query (B, H, Q, D), key (B, H, K, D) with as many heads as query, additive/bool mask or None, scale)
Statistic = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]
_STATISTICS: dict[str, Statistic] = {}


def register_statistic(name: str) -> Callable[[Statistic], Statistic]:
    def deco(fn: Statistic) -> Statistic:
        if name in _STATISTICS and _STATISTICS[name] is not fn:
            raise ValueError(f"attention statistic {name!r} is already registered")
        _STATISTICS[name] = fn
        return fn

    return deco


def get_statistic(name: str) -> Statistic:
    try:
        return _STATISTICS[name]
    except KeyError:
        raise UsageError(
            f"unknown attention statistic {name!r}; registered: {', '.join(available_statistics())}"
        ) from None


def available_statistics() -> list[str]:
    return sorted(_STATISTICS)


def apply_mask(logits: torch.Tensor, mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """Add (or apply, if boolean) the attention mask rows ``rows`` to ``logits``."""
    if mask is None:
        return logits
    mask = mask[..., rows, :] if mask.shape[-2] > 1 else mask
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def _row(query, key, mask, scale, row: int) -> torch.Tensor:
    logits = torch.matmul(query[:, :, row : row + 1].float(), key.float().transpose(-1, -2)) * scale
    logits = apply_mask(logits, mask, rows=slice(row, row + 1))
    return logits.softmax(-1).mean(dim=1)[:, 0]


@register_statistic("cls")
def cls_attention(query, key, mask, scale) -> torch.Tensor:
    """The first query's ([CLS]) attention to every key, averaged over heads: ``(batch, keys)``."""
    return _row(query, key, mask, scale, 0)


@register_statistic("last")
def last_query_attention(query, key, mask, scale) -> torch.Tensor:
    """The last query's attention to every key, averaged over heads: ``(batch, keys)`` (FastV's signal)."""
    return _row(query, key, mask, scale, query.shape[2] - 1)


@register_statistic("received")
def received_attention(query, key, mask, scale) -> torch.Tensor:
    """Attention each key *receives*, averaged over heads and queries: ``(batch, keys)``.

    The fused Triton kernel on CUDA, the byte-chunked torch twin elsewhere
    (:mod:`vtprune.kernels.received_attention`): neither materialises the ``queries x keys`` matrix.
    """
    return received_attention_kernel(query, key, mask, scale)
