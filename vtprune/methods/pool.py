"""Pooling: 2-D average pooling of each image's visual-token grid to a target count, before the LLM.

The training-free half of CrossLMM (Yan et al., 2025, "CrossLMM: Decoupling Long Video Sequences from LMMs
via Dual Cross-Attention Mechanisms"). Each budget unit's tokens, laid out on the grid the family reports
(:meth:`~vtprune.integrations.Integration.token_grids`: LLaVA ``24 x 24``, Qwen-VL ``(h, w) / merge``), are
average-pooled to an ``R x C`` grid with ``R * C <= target`` and ``R / C`` close to the grid's aspect ratio;
the pooled tokens enter the LLM in row-major order.

The operator is *adaptive* average pooling: output cell ``(i, j)`` averages input rows
``[floor(i H / R), ceil((i + 1) H / R))`` and the same for columns (``torch.nn.functional.adaptive_avg_pool2d``).
The paper contradicts itself on its grid: "3x3 local aggregation, N/9 tokens" (27 x 27 -> 9 x 9 = 81) and
"27 x 27 -> 3 x 3 = 9 tokens"; its results use 1, 9 or 16 tokens per frame, so the target here is a *token
count* (``tokens=9`` gives 3 x 3 windows of 9 x 9 on 27 x 27). The other reading is ``keep_ratio=1/9``
(27 x 27 -> 9 x 9 windows of 3 x 3). Both are tested.

Where a pooled token sits: it takes the place of one placeholder of its window, the window's *centre*
cell (``anchor="center"``: row ``(r0 + r1 - 1) // 2``, same for columns) or its *first* (top-left) cell
(``anchor="first"``); the other placeholders are dropped. With contiguous positions (LLaVA) only the order
matters; with original positions (Qwen-VL's M-RoPE) the pooled token takes that cell's 3-D position.

Deviations: the paper pools the vision encoder's output *before* the projector ("bilinear pooling"); a
plug-in sees the projected features the LLM receives (``get_image_features``), so pooling runs after the
projector (equal for a linear projector, not for LLaVA's 2-layer MLP). A unit whose family reports no grid
(e.g. it holds layout tokens) is pooled as a ``1 x n`` strip. Budget groups (tiles) are not used: each
budget unit is pooled on its own grid.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..config import PruneConfig, check_int, check_ratio
from ..errors import UsageError
from ..registry import register_method
from ..runtime.parts import MethodParts, Transform
from ..runtime.selection import keep_count

__all__ = ["PoolConfig", "pooled_grid", "window_bounds", "pool_unit", "pool_transform", "DEFAULT_TOKENS"]

DEFAULT_TOKENS = 9
ANCHORS = ("center", "first")
POSITIONS = ("auto", "contiguous", "original")


@dataclasses.dataclass
class PoolConfig(PruneConfig):
    """Args:
    tokens: pooled tokens per image (at most; the grid keeps the image's aspect ratio). With neither
        ``tokens`` nor ``keep_ratio`` set: 9 (the paper's 3 x 3 per frame).
    keep_ratio: instead of ``tokens``, a fraction of each image's tokens (``max(1, round(ratio * n))``).
    anchor: the placeholder a pooled token takes, ``"center"`` or ``"first"`` cell of its window.
    positions: position ids of the pooled tokens, as for selections (``"auto"``: the family's default).
    """

    method = "pool"

    tokens: int | None = None
    keep_ratio: float | None = None
    anchor: str = "center"
    positions: str = "auto"

    def validate(self) -> None:
        check_int("tokens", self.tokens, minimum=1, optional=True)
        if self.keep_ratio is not None:
            check_ratio("keep_ratio", self.keep_ratio)
        if self.tokens is not None and self.keep_ratio is not None:
            raise UsageError("set tokens or keep_ratio, not both")
        if self.anchor not in ANCHORS:
            raise UsageError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.positions not in POSITIONS:
            raise UsageError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    def target(self, n: int) -> int:
        """Pooled tokens wanted for a unit of ``n`` tokens."""
        if self.keep_ratio is not None:
            return keep_count(n, self.keep_ratio)
        return min(n, self.tokens if self.tokens is not None else DEFAULT_TOKENS)


def pooled_grid(rows: int, cols: int, target: int) -> tuple[int, int]:
    """The output grid ``(R, C)``: ``R * C <= target``, ``R <= rows``, ``C <= cols``, ``R / C`` near
    ``rows / cols`` (a square grid and a square target give ``sqrt(target)`` a side)."""
    if target >= rows * cols:
        return rows, cols
    r = min(rows, max(1, round(math.sqrt(target * rows / cols))))
    c = min(cols, max(1, target // r))
    r = min(rows, max(1, target // c))
    return r, c


def window_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling windows ``[floor(i size / out), ceil((i + 1) size / out))`` for ``i < out``."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_unit(
    features: torch.Tensor, grid: tuple[int, int] | None, target: int, anchor: str = "center"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool one unit's ``(n, hidden)`` features, row-major on ``grid`` (None: a ``1 x n`` strip), to at
    most ``target`` tokens. Returns the kept placeholder indices ``(k,)`` (ascending) and the pooled
    rows ``(k, hidden)``."""
    n, hidden = features.shape
    rows, cols = grid if grid is not None else (1, n)
    if rows * cols != n:
        raise ValueError(f"a grid of {rows} x {cols} does not hold {n} tokens")
    out_r, out_c = pooled_grid(rows, cols, target)
    if (out_r, out_c) == (rows, cols):
        return torch.arange(n), features
    image = features.t().reshape(1, hidden, rows, cols)
    pooled = F.adaptive_avg_pool2d(image, (out_r, out_c)).reshape(hidden, out_r * out_c).t()
    pick = (lambda lo, hi: (lo + hi - 1) // 2) if anchor == "center" else (lambda lo, hi: lo)
    r_at = torch.tensor([pick(lo, hi) for lo, hi in window_bounds(rows, out_r)])
    c_at = torch.tensor([pick(lo, hi) for lo, hi in window_bounds(cols, out_c)])
    positions = (r_at[:, None] * cols + c_at[None, :]).reshape(-1)
    return positions, pooled


def pool_transform(config: PoolConfig) -> Transform:
    def transform(units):
        return [pool_unit(u.features, u.grid, config.target(u.size), config.anchor) for u in units]

    return transform


@register_method(PoolConfig)
def _parts(config: PoolConfig, family) -> MethodParts:
    return MethodParts(transform=pool_transform(config), positions=config.positions)
