"""Read one registered attention statistic out of an attention module without materialising eager attention maps.

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

from ..errors import UnsupportedError
from .statistics import get_statistic

__all__ = ["PROBE_IMPL", "AttentionProbe"]

PROBE_IMPL = "vtprune_probe"


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
    """Records a registered attention statistic (:mod:`vtprune.runtime.statistics`) of one attention module.

    Args:
        module: the attention module to tag (e.g. ``CLIPAttention`` of layer -2, or a decoder layer's
            ``self_attn``).
        statistic: name of a registered statistic; each call of the module appends its ``(batch, keys)``
            result to ``records``.
        active: recording happens only while True (the vision encoder: always; a decoder layer: at prefill
            only).
    """

    def __init__(self, module: nn.Module, statistic: str, active: bool = True):
        self.active = active
        self.fn = get_statistic(statistic)
        _register()
        self.module = module
        self.statistic = statistic
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
                raise UnsupportedError(
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
        self.records.append(self.fn(query, key, attention_mask, scale))
