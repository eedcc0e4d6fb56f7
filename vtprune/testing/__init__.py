"""Tiny random-weight models of the real transformers classes, and matching inputs, for tests and benchmarks.

Nothing here touches a hub: models are built from configs (``from_config`` semantics) with fixed seeds.
One builder per family, registered by ``model_type`` in :data:`TINY_FAMILIES` (a module per family in
this package); the test contract matrix, the benchmarks and the GPU check all read this one table.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "TinyFamily",
    "TINY_FAMILIES",
    "register_tiny",
    "tiny_llava",
    "llava_inputs",
    "tiny_qwen2_vl",
    "tiny_qwen2_5_vl",
    "qwen_vl_inputs",
]

IMAGE_TOKEN = 3
PAD, BOS = 0, 1


@dataclass(frozen=True)
class TinyFamily:
    """How to build a tiny model of one ``model_type`` and a batch for it.

    Attributes:
        build: ``build(attn_implementation="sdpa", text_layers=2, seed=0) -> model`` (eval mode, no EOS).
        inputs: ``inputs(model, seed=0) -> dict``: a left-padded batch of 2 samples, one image each, with
            different prompt lengths (and, where the family allows, different image sizes).
        contiguous: whether ``positions="auto"`` renumbers kept tokens on this family.
    """

    model_type: str
    build: Callable[..., torch.nn.Module]
    inputs: Callable[..., dict]
    contiguous: bool


TINY_FAMILIES: dict[str, TinyFamily] = {}


def register_tiny(family: TinyFamily) -> TinyFamily:
    TINY_FAMILIES[family.model_type] = family
    return family


def instantiate(cls, config, *, attn_implementation: str, seed: int, device=None, dtype=None):
    """``cls(config)`` in eval mode with seeded random weights, built on ``device`` in ``dtype`` directly (no
    CPU copy of a large model), and a generation config for fixed-length greedy runs (no EOS)."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device or "cpu"):
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def _left_pad(rows: list[torch.Tensor]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


from .llava import llava_inputs, tiny_llava  # noqa: E402
from .qwen2_vl import qwen_vl_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl  # noqa: E402

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
