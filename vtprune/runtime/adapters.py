"""Trainable modules a method adds to the language model, and what they read at each call.

An :class:`Adapters` part maps decoder-layer indices to modules. The pruner installs each one through its
:class:`~vtprune.runtime.patching.Patcher` (``unwrap`` removes it; the modules are never registered as
sub-modules of the model, so its ``state_dict`` and ``named_modules`` do not change). In layer ``l`` the
module runs right after self-attention, on the residual stream ``h = x + SelfAttn(x)``, and what it
returns is added to that stream before the MLP::

    h = h + adapter(h, context)

The :class:`AdapterContext` of one call describes the current tokens and the *visual features kept aside*
at prefill: every visual token of each sample as the vision encoder produced it, before any pre-LLM
selection or transform. They are kept once per prefill (not in the sequence, not in the KV cache) and read
again at every later call on the cache that prefill filled; a call that continues no pruned prefill (a
text-only prompt, another cache) gets no context and the adapters are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AdapterContext", "Adapters", "pad_per_sample"]


@dataclass
class AdapterContext:
    """What an adapter reads in one call of its decoder layer.

    Attributes:
        features: ``(batch, n, hidden)`` the visual features kept aside for each sample (zero rows past
            ``feature_mask``), in prompt order.
        feature_mask: ``(batch, n)`` bool, True at a sample's real feature rows (a sample without images
            has none).
        visual: ``(batch, seq)`` bool, True at the visual tokens among this call's tokens; None when there
            are none (a decode step).
        real: ``(batch, seq)`` bool, False at left padding; None when every token is real.
        prefill: True at the prefill that kept the features, False at later calls on its cache.
    """

    features: torch.Tensor
    feature_mask: torch.Tensor
    visual: torch.Tensor | None = None
    real: torch.Tensor | None = None
    prefill: bool = True


@dataclass
class Adapters:
    """Modules to run after self-attention of some decoder layers.

    Attributes:
        modules: decoder-layer index -> module called as ``module(hidden, context) -> delta`` with
            ``hidden`` ``(batch, seq, hidden)`` and ``context`` an :class:`AdapterContext`; ``delta``
            (same shape as ``hidden``) is added to the residual stream.
    """

    modules: dict[int, nn.Module]


def pad_per_sample(units: list[torch.Tensor], per_sample: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each sample's visual feature rows (units fill samples in order; ``per_sample`` rows each) into
    a zero-padded ``(batch, max rows, hidden)`` tensor and its ``(batch, max rows)`` bool mask. Host counts
    only: no device sync."""
    flat = torch.cat(units) if units else None
    width = max(per_sample, default=0)
    batch = len(per_sample)
    if flat is None:
        raise ValueError("no visual features to keep aside")
    out = flat.new_zeros(batch, max(width, 1), flat.shape[-1])
    mask = torch.zeros(batch, max(width, 1), dtype=torch.bool, device=flat.device)
    start = 0
    for b, n in enumerate(per_sample):
        out[b, :n] = flat[start : start + n]
        mask[b, :n] = True
        start += n
    return out, mask
