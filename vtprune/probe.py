"""Read one attention statistic out of an attention module without materialising eager attention maps.

The tagged attention module gets a private copy of its config whose ``_attn_implementation`` names a
registered function (``"vtprune_probe"``). That function computes only what the method needs from the
already-projected queries and keys, then calls the implementation the module had before (SDPA, eager,
...), so the layer's output is unchanged. Only the tagged module sees the new name: the rest of the model,
and the mask creation that reads the shared config, is untouched. A mask function is registered under the
same name as well, because HF's mask utilities look the implementation up by name.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PROBE_IMPL", "AttentionProbe"]

PROBE_IMPL = "vtprune_probe"
_QUERY_CHUNK = 1024  # rows of the softmax materialised at once by the "received" statistic


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    probe: AttentionProbe | None = module.__dict__.get("_vtprune_probe")
    if probe is None:
        raise RuntimeError(
            f"attention implementation {PROBE_IMPL!r} was called by an untagged module {type(module).__name__}"
        )
    if probe.active:
        probe.record(query, key, attention_mask, scaling)
    return probe.inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_IMPL, _probe_attention)
    AttentionMaskInterface.register(PROBE_IMPL, sdpa_mask)


class AttentionProbe:
    """Records an attention statistic of one attention module.

    Args:
        module: the attention module to tag (e.g. ``CLIPAttention`` of layer -2, or a decoder layer's
            ``self_attn``).
        kind: ``"cls"`` records the [CLS] query's attention to every patch, averaged over heads, as a
            ``(batch, num_patches)`` tensor (the [CLS] column itself dropped). ``"received"`` records, for
            each call, the attention every token *receives* averaged over heads and queries, as a
            ``(batch, seq)`` tensor (Qwen-VL's ViT calls once per image). ``"last"`` records the last
            query's attention to every key, averaged over heads, ``(batch, kv_len)`` (FastV's signal).

    Recording happens only while ``active`` is True (the vision encoder: always; a decoder layer: at
    prefill only).
    """

    def __init__(self, module: nn.Module, kind: str, active: bool = True):
        self.active = active
        if kind not in ("cls", "received", "last"):
            raise ValueError(f"unknown probe kind {kind!r}")
        _register()
        self.module = module
        self.kind = kind
        self.records: list[torch.Tensor] = []
        self.inner_impl = getattr(module.config, "_attn_implementation", None) or "eager"
        self.inner = self._resolve_inner(module, self.inner_impl)

    @staticmethod
    def _resolve_inner(module: nn.Module, impl: str) -> Callable:
        from transformers import AttentionInterface

        if impl == PROBE_IMPL:
            raise RuntimeError("this attention module is already probed (is the model wrapped twice?)")
        if impl == "eager":
            # The module's own file defines the eager function it would have called.
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if eager is None:
                raise NotImplementedError(
                    f"{type(module).__name__} has no module-level eager_attention_forward; load the model with "
                    "attn_implementation='sdpa'"
                )
            return eager
        return AttentionInterface()[impl]

    def attach(self, patcher) -> None:
        config = copy.copy(self.module.config)
        config._attn_implementation = PROBE_IMPL
        patcher.set_attr(self.module, "config", config)
        patcher.set_attr(self.module, "_vtprune_probe", self)

    def clear(self) -> None:
        self.records = []

    @torch.no_grad()
    def record(self, query, key, attention_mask, scaling) -> None:
        """query, key: ``(batch, heads, seq, head_dim)``; attention_mask: additive/bool or None."""
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if key.shape[1] != query.shape[1]:  # grouped KV heads
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        if self.kind in ("cls", "last"):
            row = 0 if self.kind == "cls" else query.shape[2] - 1
            logits = torch.matmul(query[:, :, row : row + 1].float(), key.float().transpose(-1, -2)) * scale
            logits = _apply_mask(logits, attention_mask, rows=slice(row, row + 1))
            weights = logits.softmax(-1).mean(dim=1)[:, 0]
            self.records.append(weights[:, 1:] if self.kind == "cls" else weights)
        else:
            seq = query.shape[2]
            received = torch.zeros(query.shape[0], query.shape[1], key.shape[2], device=query.device)
            kt = key.float().transpose(-1, -2)
            for start in range(0, seq, _QUERY_CHUNK):
                rows = slice(start, min(start + _QUERY_CHUNK, seq))
                logits = torch.matmul(query[:, :, rows].float(), kt) * scale
                logits = _apply_mask(logits, attention_mask, rows=rows)
                received += logits.softmax(-1).sum(dim=2)
            self.records.append(received.mean(dim=1) / seq)


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
    if mask is None:
        return logits
    mask = mask[..., rows, :] if mask.shape[-2] > 1 else mask
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()
