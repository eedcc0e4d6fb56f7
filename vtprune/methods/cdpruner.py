"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", arXiv 2506.10967; authors' code github.com/Theia-4869/CDPruner).

Keeps each image's visual tokens that maximise a *conditional* determinantal point process before the
LLM. For one image (budget group) of ``n`` tokens with features ``x_i`` (as the LLM receives them, after
the projector, as the authors' code):

* similarity ``S_ij = cos(x_i, x_j)``;
* relevance ``r_i``: the mean over the instruction's tokens ``t`` of ``cos(x_i, t)``, min-max normalised
  over the group: ``r = (r - min r + 1e-6) / (max r - min r)``; with ``theta`` set, ``r = exp(alpha r)``,
  ``alpha = theta / (2 (1 - theta))`` (the authors' optional trade-off, off by default as in their code);
* kernel ``L = diag(r) S diag(r)``;
* MAP by fast greedy inference (Chen et al., NeurIPS 2018, "Fast Greedy MAP Inference for Determinantal
  Point Process ..."): with Cholesky rows ``c_j`` and residuals ``d_j^2 = L_jj - |c_j|^2``, pick
  ``j = argmax d_j^2`` (the largest gain of ``log det L_S``), then for every token
  ``e_i = (L_ji - <c_j, c_i>) / d_j``, ``c_i <- [c_i, e_i]``, ``d_i^2 <- d_i^2 - e_i^2``; ``k`` times.

As a vtprune scorer the greedy order is a score: the ``t``-th pick (from 0) scores ``k - t``, every other
token 0, so the keep rule's top-``k`` is the greedy selection.

Choices where the paper or the authors' code leaves a detail open, and deviations:

* **The instruction's representation.** The authors' LLaVA code embeds the question with CLIP's *text*
  tower and compares it with the patch embeddings through CLIP's visual projection. Hugging Face LLaVA
  checkpoints ship no CLIP text tower (and Qwen-VL, InternVL, SigLIP towers have none usable), so here
  the instruction is the sample's text tokens as the language model's *input embeddings* (every prompt
  token that is neither padding nor an image placeholder: chat template and system prompt included,
  because a plug-in cannot tell the question apart from the template), compared with the visual
  features the LLM receives, in the same space. The authors compare the question without answer-format
  suffixes; here the whole prompt text is used.
* **Sign of the relevance.** The authors' code negates the CLIP cosine (``(-relevance).mean``), a
  CLIP-specific observation by the authors (issues #9, #14 of their repository). With the LLM's own
  embeddings the relevance is the plain (positive) cosine.
* **Per sample.** The authors' code min-max normalises the relevance over the whole batch (so one sample's
  text shifts another's kernel); here each sample's image (each budget group) is normalised on its own,
  and a constant relevance (max = min) gives ``r = 1`` everywhere (the authors' formula divides by zero).
* **Exhausted kernel.** ``L`` has rank at most the feature width; when every remaining ``d_j^2`` is
  ``<= 1e-10`` (float64) before ``k`` picks, nothing can raise ``det L_S`` and the authors' code would
  divide by zero. The remaining picks then go by relevance, highest first (ties: lower index).
* Budget: the authors' LLaVA-NeXT code selects per encoded view (``k`` per crop); the default here is the
  family's default budget (per crop for LLaVA-NeXT and OneVision; per image elsewhere, InternVL's tiles
  joined first).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from ..config import VisualTokenConfig, check_number
from ..errors import UsageError
from ..registry import register_method
from ..runtime.parts import MethodParts
from ..runtime.selection import keep_count

__all__ = ["CDPrunerConfig", "relevance", "dpp_kernel", "dpp_greedy", "cdpruner_scores"]

EXHAUSTED = 1e-10


@dataclasses.dataclass
class CDPrunerConfig(VisualTokenConfig):
    """Args:
    keep_ratio: fraction of each image's tokens kept (default 64 / 576, the paper's headline setting).
    theta: optional relevance/diversity trade-off in (0, 1): ``r = exp(theta / (2 (1 - theta)) r)``; None
        (default, as the authors' code) uses the normalised relevance itself.
    positions, budget: see :class:`~vtprune.config.VisualTokenConfig`.
    """

    method = "cdpruner"

    keep_ratio: float = 64 / 576
    theta: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.theta is not None:
            check_number("theta", self.theta, 0.0, 1.0, closed_low=False, closed_high=False)


def _exact(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the greedy's residuals cancel to ~1e-16, not ~1e-7)."""
    return torch.float32 if device.type == "mps" else torch.float64


def relevance(features: torch.Tensor, text: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """``(n,)`` relevance of ``(n, hidden)`` visual features to ``(m, hidden)`` text embeddings: mean cosine,
    min-max normalised (then ``exp(alpha r)`` with ``theta``)."""
    if text.shape[0] == 0:
        raise UsageError(
            "cdpruner conditions on the prompt's text, and a sample's prompt has no text tokens: put the "
            "instruction in the prompt, or use divprune (the same diversity without an instruction)"
        )
    dtype = _exact(features.device)
    cos = F.normalize(features.to(dtype), dim=-1) @ F.normalize(text.to(features.device, dtype), dim=-1).t()
    r = cos.mean(-1)
    low, high = r.min(), r.max()
    r = (r - low + 1e-6) / (high - low).clamp(min=1e-6)
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def dpp_kernel(features: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """``L = diag(r) S diag(r)``, ``S`` the cosine similarity of the ``(n, hidden)`` features: ``(n, n)``."""
    unit = F.normalize(features.to(_exact(features.device)), dim=-1)
    return rel[:, None] * (unit @ unit.t()) * rel[None, :]


def dpp_greedy(kernel: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    """Fast greedy MAP of the DPP with ``(n, n)`` ``kernel``: ``(k,)`` picks in order. Once every residual
    is exhausted (``<= 1e-10``) the rest follow ``fallback`` scores, highest first. No host sync."""
    n = kernel.shape[0]
    device = kernel.device
    rows = torch.zeros(k, n, dtype=kernel.dtype, device=device)  # Cholesky rows c_i, one per pick
    residual = torch.diagonal(kernel).clone()  # d_i^2
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    fallback = fallback.to(device=device, dtype=kernel.dtype)
    picks = []
    for t in range(k):
        gains = residual.masked_fill(chosen, float("-inf"))
        best = gains.max()
        exhausted = best <= EXHAUSTED
        j = torch.where(exhausted, fallback.masked_fill(chosen, float("-inf")).argmax(), gains.argmax())
        e = (kernel[j] - rows[:t, j] @ rows[:t]) / residual[j].clamp(min=EXHAUSTED).sqrt()
        e = torch.where(exhausted, torch.zeros_like(e), e)
        rows[t] = e
        residual = residual - e.square()
        chosen[j] = True
        picks.append(j)
    return torch.stack(picks) if picks else torch.zeros(0, dtype=torch.long, device=device)


def cdpruner_scores(unit, keep, theta: float | None = None) -> torch.Tensor:
    """``(n,)`` scores of one :class:`~vtprune.runtime.parts.VisualUnit` (needs ``text``): per budget group
    (layout tokens excluded) the greedy DPP pick order as ``k - t`` for the ``t``-th pick, 0 elsewhere."""
    if unit.text is None:
        raise RuntimeError("cdpruner needs the sample's text embeddings on every unit")
    device = unit.features.device
    score = torch.zeros(unit.size, device=device)
    if unit.groups is None:
        members = [torch.arange(unit.size, device=device)]
    else:
        groups = unit.groups.to(device)
        members = [(groups == g).nonzero().squeeze(-1) for g in torch.unique(groups[groups >= 0]).tolist()]
    for idx in members:
        k = keep(idx.numel())
        feats = unit.features[idx]
        rel = relevance(feats, unit.text, theta)
        order = dpp_greedy(dpp_kernel(feats, rel), k, rel)
        score[idx[order]] = torch.arange(k, 0, -1, device=device, dtype=score.dtype)
    return score


@register_method(CDPrunerConfig)
def _parts(config: CDPrunerConfig, family) -> MethodParts:
    keep = functools.partial(keep_count, keep_ratio=config.keep_ratio)
    return MethodParts(
        scorer=lambda units: [cdpruner_scores(u, keep, config.theta) for u in units],
        keep=keep,
        positions=config.positions,
        budget=config.budget,
        prompt_scorer=True,
    )
