"""Prefill FLOPs from the token counts each decoder layer actually processed.

Convention (FastV, Chen et al. 2024, counting multiply-accumulates): a decoder layer over ``n`` tokens with
hidden size ``d`` and MLP width ``m`` costs ``4 n d^2 + 2 n^2 d + 2 n d m``; for gated (SwiGLU) MLPs, as in
Llama and Qwen, the MLP term is ``3 n d m``. The vision encoder and the LM head are not counted, so ratios
isolate the language model, where visual-token pruning acts. The dimensions come from the family
(:meth:`vtprune.integrations.Integration.text_dims`).
"""

from __future__ import annotations

__all__ = ["FLOPS_CONVENTION", "layer_flops", "prefill_flops"]

FLOPS_CONVENTION = "FastV MACs per layer: 4nd^2 + 2n^2d + k*n*d*m (k=3 for SwiGLU MLPs, 2 otherwise)"


def layer_flops(n: int, d: int, m: int, gated: bool = True) -> float:
    return 4 * n * d * d + 2 * n * n * d + (3 if gated else 2) * n * d * m


def prefill_flops(text_tokens: int, layer_visual: list[int], d: int, m: int, gated: bool = True) -> float:
    """Sum over layers; layer ``l`` processes ``text_tokens + layer_visual[l]`` tokens."""
    return float(sum(layer_flops(text_tokens + v, d, m, gated) for v in layer_visual))
