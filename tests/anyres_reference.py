"""An independent, loop-by-loop account of LLaVA-NeXT / OneVision's anyres token layout, written from the
LLaVA-NeXT recipe (best grid resolution, crops in row-major order, unpadding, a newline token after each
row, OneVision's ``anyres_max`` bilinear shrink), to check what vtprune derives from transformers' own
``pack_image_features``. Nothing here calls transformers' packing code or vtprune."""

from __future__ import annotations

import math

from vtprune.runtime.selection import keep_count

__all__ = [
    "best_resolution",
    "view_count",
    "image_layout",
    "reference_scores",
    "reference_groups",
    "reference_kept",
]


def best_resolution(size, pinpoints):
    """The grid resolution (H, W) an (h, w) image is cropped at: most effective pixels, then least waste."""
    h, w = size
    best, best_fit, best_waste = None, -1, math.inf
    for H, W in pinpoints:
        scale = min(W / w, H / h)
        fit = min(int(w * scale) * int(h * scale), w * h)
        waste = H * W - fit
        if fit > best_fit or (fit == best_fit and waste < best_waste):
            best, best_fit, best_waste = (H, W), fit, waste
    return best


def view_count(model, size, cropped: bool = True) -> int:
    """Tower rows of one image: the base view plus its crops (OneVision multi-image: the base view only)."""
    if not cropped:
        return 1
    S = model.config.vision_config.image_size
    H, W = best_resolution(size, model.config.image_grid_pinpoints)
    return 1 + (H // S) * (W // S)


def _unpadded(size, cur_h, cur_w):
    """Rows and columns of the stitched patch grid that cover the image (not the processor's padding)."""
    h, w = size
    if w / h > cur_w / cur_h:
        pad = (cur_h - int(round(h * (cur_w / w), 7))) // 2
        return range(pad, cur_h - pad), range(cur_w)
    pad = (cur_w - int(round(w * (cur_h / h), 7))) // 2
    return range(cur_h), range(pad, cur_w - pad)


def _bilinear(n_in: int, n_out: int):
    """Per output index, ``[(input index, weight)]`` of a bilinear resize (half-pixel centres, edges
    clamped), as ``align_corners=False`` defines it."""
    scale = n_in / n_out
    out = []
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        out.append([(lo, 1.0 - frac), (hi, frac)])
    return out


def image_layout(model, size, cropped: bool = True):
    """The LLM tokens of one (h, w) image, in order: ``None`` for a newline token, else
    ``[(view, patch, weight), ...]`` - the tower rows (0 = base view, 1.. = crops row-major) and patch
    indices (row-major in the view) the token is made of. ``cropped=False``: a OneVision image of a
    multi-image sample (base view + one newline)."""
    cfg = model.config
    S = cfg.vision_config.image_size
    p = S // cfg.vision_config.patch_size
    tokens = [[(0, j, 1.0)] for j in range(p * p)]
    if not cropped:
        return tokens + [None]
    H, W = best_resolution(size, cfg.image_grid_pinpoints)
    gw = W // S
    rows, cols = _unpadded(size, (H // S) * p, gw * p)

    def cell(r, c):
        return 1 + (r // p) * gw + c // p, (r % p) * p + c % p

    grid = [[[(*cell(r, c), 1.0)] for c in cols] for r in rows]
    if cfg.model_type == "llava_onevision":
        limit = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(len(rows) * len(cols) / (limit * p * p))
        if ratio > 1.1:
            wr = _bilinear(len(rows), int(len(rows) // ratio))
            wc = _bilinear(len(cols), int(len(cols) // ratio))
            grid = [
                [
                    [(*cell(rows[a], cols[b]), x * y) for a, x in r_src for b, y in c_src if x * y > 0]
                    for c_src in wc
                ]
                for r_src in wr
            ]
    for row in grid:
        tokens += row + [None]
    return tokens


def reference_scores(tokens, view_scores):
    """Per token, the weighted sum of its patches' scores (``view_scores[view][patch]``); None: newline."""
    return [None if t is None else sum(w * float(view_scores[v][j]) for v, j, w in t) for t in tokens]


def reference_groups(tokens, budget: str):
    """Per token, its budget group: -1 newline; ``"image"``: 0; ``"crop"``: the view carrying most of its
    weight (a set of views when several carry the same weight)."""
    out = []
    for t in tokens:
        if t is None:
            out.append(-1)
        elif budget == "image":
            out.append(0)
        else:
            share = {}
            for v, _, w in t:
                share[v] = share.get(v, 0.0) + w
            top = max(share.values())
            out.append(frozenset(v for v, s in share.items() if s > top - 1e-6))
    return out


def reference_kept(tokens, view_scores, ratio: float, budget: str):
    """Indices of the kept tokens: the top ``keep_count(n_g, ratio)`` scores of each budget group, every
    newline token."""
    scores = reference_scores(tokens, view_scores)
    groups = [min(g) if isinstance(g, frozenset) else g for g in reference_groups(tokens, budget)]
    kept = {i for i, g in enumerate(groups) if g == -1}
    for g in set(groups) - {-1}:
        members = [i for i, x in enumerate(groups) if x == g]
        ranked = sorted(members, key=lambda i: -scores[i])
        kept.update(ranked[: keep_count(len(members), ratio)])
    return sorted(kept)
