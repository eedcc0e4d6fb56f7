"""Property-based tests: selection, compaction and the gathers against straightforward reference loops.

Shapes, padding patterns, keep ratios, score ties and per-sample image counts (zero images included) are
drawn by hypothesis; tensor contents come from a drawn seed (cheap to shrink, reproducible).
"""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.kernels.gather import gather_tokens, keep_mask_to_index
from vtprune.runtime.compact import compact
from vtprune.runtime.selection import keep_count, kept_visual_indices, select_visual_tokens, top_k_indices

SETTINGS = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scores(n: int, g: torch.Generator, ties: bool) -> torch.Tensor:
    """Scores with many ties (few distinct values) or almost none."""
    if ties:
        return torch.randint(0, 3, (n,), generator=g).float()
    return torch.rand(n, generator=g)


# ------------------------------------------------------------------------------------------- references
def ref_top_k(scores: list[float], k: int) -> list[int]:
    """The k highest scores, ties to the lower index, returned in ascending index order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def ref_select(image_mask, scores, keep, groups):
    """Images fill the placeholders in flattened (batch, seq) order; keep the top keep(n) of each group."""
    batch, seq = image_mask.shape
    keep_mask = [[True] * seq for _ in range(batch)]
    slots = [(b, j) for b in range(batch) for j in range(seq) if image_mask[b, j]]
    kept_counts, cursor = [], 0
    for s, g in zip(scores, groups):
        s = s.tolist()
        n = len(s)
        members = {}
        for i in range(n):
            label = 0 if g is None else int(g[i])
            members.setdefault(label, []).append(i)
        chosen = set(members.pop(-1, []))  # pinned tokens are always kept
        for idx in members.values():
            sub = [s[i] for i in idx]
            chosen.update(idx[t] for t in ref_top_k(sub, keep(len(idx))))
        for i in range(n):
            b, j = slots[cursor + i]
            keep_mask[b][j] = i in chosen
        cursor += n
        kept_counts.append(len(chosen))
    return torch.tensor(keep_mask, dtype=torch.bool).reshape(batch, seq), kept_counts


# ---------------------------------------------------------------------------------------------- drawing
@st.composite
def image_layouts(draw):
    """A batch of left-padded prompts holding 0..3 images each (some samples with none), image sizes
    equal (the batched path) or not, optional budget groups with pinned (-1) tokens."""
    batch = draw(st.integers(1, 4))
    equal = draw(st.booleans())
    size = draw(st.integers(1, 6))
    rows, units = [], []
    for _ in range(batch):
        row = [False] * draw(st.integers(0, 3))  # leading text
        for _ in range(draw(st.integers(0, 3))):
            n = size if equal else draw(st.integers(1, 6))
            row += [True] * n + [False] * draw(st.integers(0, 2))
            units.append(n)
        rows.append(row)
    seq = max(1, max(len(r) for r in rows))
    pads = [seq - len(r) for r in rows]
    image_mask = torch.tensor([[False] * p + r for p, r in zip(pads, rows)], dtype=torch.bool)
    use_groups = draw(st.booleans())
    seed = draw(seeds)
    g = _gen(seed)
    ties = draw(st.booleans())
    scores = [_scores(n, g, ties) for n in units]
    groups = [torch.randint(-1, 3, (n,), generator=g) if use_groups else None for n in units]
    ratio = draw(st.floats(0.01, 1.0))
    return image_mask, scores, groups, ratio


# ---------------------------------------------------------------------------------------------- tests
@SETTINGS
@given(n=st.integers(0, 5000), ratio=st.floats(0.0, 1.0, exclude_min=True))
def test_keep_count_is_round_half_up_at_least_one(n, ratio):
    from fractions import Fraction

    k = keep_count(n, ratio)
    product = Fraction(n * ratio)  # the float product, then rounded half up exactly
    want = min(n, max(1, int(product + Fraction(1, 2))))
    assert k == want
    if n:
        assert 1 <= k <= n
        assert k >= keep_count(n, ratio / 2)  # monotone in the ratio


@SETTINGS
@given(n=st.integers(0, 40), data=st.data(), seed=seeds, ties=st.booleans())
def test_top_k_indices_matches_sorted_reference(n, data, seed, ties):
    k = data.draw(st.integers(0, n))
    scores = _scores(n, _gen(seed), ties)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    got = top_k_indices(scores.to(dtype), k)
    assert got.tolist() == ref_top_k(scores.to(dtype).float().tolist(), k)


@SETTINGS
@given(layout=image_layouts(), known=st.booleans())
def test_select_visual_tokens_matches_reference(layout, known):
    image_mask, scores, groups, ratio = layout
    keep = functools.partial(keep_count, keep_ratio=ratio)
    want_mask, want_kept = ref_select(image_mask, scores, keep, groups)
    got_mask, got_kept = select_visual_tokens(
        image_mask, scores, keep, groups, int(image_mask.sum()) if known else None
    )
    assert torch.equal(got_mask, want_mask)
    assert got_kept == want_kept
    assert not (~got_mask & ~image_mask).any()  # text and padding are never dropped

    # kept_visual_indices: per sample, ascending ranks among its visual tokens of the kept ones.
    got_ranks = kept_visual_indices(got_mask, image_mask)
    for b in range(image_mask.shape[0]):
        visual = [j for j in range(image_mask.shape[1]) if image_mask[b, j]]
        want = [r for r, j in enumerate(visual) if want_mask[b, j]]
        assert got_ranks[b].tolist() == want


@SETTINGS
@given(layout=image_layouts())
def test_select_visual_tokens_refuses_a_count_mismatch(layout):
    image_mask, scores, groups, ratio = layout
    keep = functools.partial(keep_count, keep_ratio=ratio)
    try:
        select_visual_tokens(image_mask, scores + [torch.ones(2)], keep, groups + [None])
    except ValueError as e:
        assert "image tokens" in str(e)
    else:
        raise AssertionError("a mismatch between placeholders and features must be refused")


@st.composite
def keep_masks(draw, min_batch=0, min_len=0):
    batch = draw(st.integers(min_batch, 5))
    length = draw(st.integers(min_len, 12))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    g = _gen(draw(seeds))
    return torch.rand(batch, length, generator=g) < density


@SETTINGS
@given(keep=keep_masks(), data=st.data())
def test_keep_mask_to_index_matches_reference(keep, data):
    rows = [[j for j in range(keep.shape[1]) if keep[b, j]] for b in range(keep.shape[0])]
    width = max((len(r) for r in rows), default=0)
    size = data.draw(st.sampled_from([None, width + data.draw(st.integers(0, 3))]))
    got = keep_mask_to_index(keep, size)
    k = width if size is None else min(size, keep.shape[1])  # a size beyond the length is clipped
    assert got.dtype == torch.long and tuple(got.shape) == (keep.shape[0], k)
    assert got.tolist() == [[-1] * (k - len(r)) + r for r in rows]


@SETTINGS
@given(
    keep=keep_masks(min_batch=1),
    data=st.data(),
    pos_kind=st.sampled_from(["none", "2d", "3d"]),
    mask_dtype=st.sampled_from([None, torch.long, torch.bool, torch.float32]),
)
def test_gather_tokens_torch_matches_reference(keep, data, pos_kind, mask_dtype):
    batch, length = keep.shape
    g = _gen(data.draw(seeds))
    dim = data.draw(st.integers(1, 5))
    hidden = torch.randn(batch, length, dim, generator=g)
    if data.draw(st.booleans()):  # any index in range, not only what keep_mask_to_index builds
        k = data.draw(st.integers(0, 6))
        index = (
            torch.randint(-1, max(length, 1), (batch, k), generator=g)
            if length
            else torch.full((batch, k), -1)
        )
    else:
        index = keep_mask_to_index(keep)
    positions = None
    if pos_kind == "2d":
        positions = torch.randint(0, 100, (batch, length), generator=g)
    elif pos_kind == "3d":
        positions = torch.randint(0, 100, (3, batch, length), generator=g)
    mask = None if mask_dtype is None else (torch.rand(batch, length, generator=g) < 0.8).to(mask_dtype)

    out_hidden, out_pos, out_mask = gather_tokens(hidden, index, positions, mask, backend="torch")
    k = index.shape[1]
    assert out_hidden.shape == (batch, k, dim)
    for b in range(batch):
        for j in range(k):
            i = int(index[b, j])
            assert torch.equal(out_hidden[b, j], hidden[b, i] if i >= 0 else torch.zeros(dim))
            if positions is not None:
                want = positions[..., b, i] if i >= 0 else positions.new_zeros(positions.shape[:-2])
                assert torch.equal(out_pos[..., b, j], want)
            if mask is None:
                assert out_mask[b, j].item() == int(i >= 0) and out_mask.dtype == torch.long
            else:
                assert out_mask.dtype == mask.dtype
                assert out_mask[b, j].item() == (mask[b, i].item() if i >= 0 else 0)
    if out_pos is None:
        assert positions is None


@SETTINGS
@given(keep=keep_masks(min_batch=1, min_len=1), data=st.data())
def test_gather_tokens_refuses_out_of_range_entries(keep, data):
    batch, length = keep.shape
    bad = data.draw(st.sampled_from([-2, length, length + 3]))
    index = torch.full((batch, 1), bad, dtype=torch.long)
    try:
        gather_tokens(torch.zeros(batch, length, 2), index, backend="torch")
    except IndexError:
        pass
    else:
        raise AssertionError(f"index entry {bad} outside [-1, {length}) must be refused")


@st.composite
def prefills(draw):
    """Left- or right-padded (or unpadded, or holed) batches with a random keep mask."""
    batch = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 10))
    g = _gen(draw(seeds))
    pattern = draw(st.sampled_from(["none", "left", "right", "holes"]))
    lengths = torch.randint(0, seq + 1, (batch,), generator=g)
    cols = torch.arange(seq)
    if pattern == "none":
        real = torch.ones(batch, seq, dtype=torch.bool)
    elif pattern == "left":
        real = cols[None] >= (seq - lengths)[:, None]
    elif pattern == "right":
        real = cols[None] < lengths[:, None]
    else:
        real = torch.rand(batch, seq, generator=g) < 0.7
    keep = torch.rand(batch, seq, generator=g) < draw(st.sampled_from([0.2, 0.6, 1.0]))
    return real, keep, g


@SETTINGS
@given(
    prefill=prefills(),
    contiguous=st.booleans(),
    pos_kind=st.sampled_from(["none", "2d", "broadcast", "3d"]),
    mask_given=st.booleans(),
    size_known=st.booleans(),
)
def test_compact_matches_reference(prefill, contiguous, pos_kind, mask_given, size_known):
    real, keep, g = prefill
    batch, seq = keep.shape
    if not mask_given:
        real = torch.ones_like(real)
    embeds = torch.randn(batch, seq, 3, generator=g)
    positions = {
        "none": None,
        "2d": torch.randint(0, 50, (batch, seq), generator=g),
        "broadcast": torch.arange(seq)[None],
        "3d": torch.randint(0, 50, (3, batch, seq), generator=g),
    }[pos_kind]
    full_pos = torch.arange(seq).expand(batch, seq) if positions is None else positions
    full_pos = full_pos.expand(*full_pos.shape[:-2], batch, seq)
    kept_cols = [[j for j in range(seq) if keep[b, j] and real[b, j]] for b in range(batch)]
    width = max(len(c) for c in kept_cols)
    out = compact(
        embeds,
        real.long() if mask_given else None,
        positions,
        keep,
        contiguous,
        size=width if size_known else None,
    )
    assert out.inputs_embeds.shape == (batch, width, 3)
    assert out.position_ids.shape == (*full_pos.shape[:-2], batch, width)
    for b in range(batch):
        cols = kept_cols[b]
        pad = width - len(cols)
        dropped_before = [sum(1 for i in range(j) if real[b, i] and not keep[b, i]) for j in cols]
        assert out.index[b].tolist() == [-1] * pad + cols
        assert out.attention_mask[b].tolist() == [0] * pad + [1] * len(cols)
        assert torch.equal(out.inputs_embeds[b, pad:], embeds[b, cols])
        assert not out.inputs_embeds[b, :pad].any()
        want_pos = full_pos[..., b, cols]
        if contiguous:
            want_pos = want_pos - torch.tensor(dropped_before, dtype=want_pos.dtype)
        assert torch.equal(out.position_ids[..., b, pad:], want_pos)
        total_dropped = sum(1 for i in range(seq) if real[b, i] and not keep[b, i])
        assert int(out.shift[b]) == (total_dropped if contiguous else 0)
