"""Pooling (``pool``, CrossLMM's training-free half): geometry against plain loops, the paper's two readings
of its grid, anchors and M-RoPE positions, family grids, config checks. Generate equivalence on every family
is in tests/contract/test_matrix.py."""

from __future__ import annotations

import pytest
import torch
from helpers import full_positions, reference_pool
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.methods.pool import PoolConfig, pool_unit, pooled_grid
from vtprune.registry import get_family
from vtprune.testing import tiny_llava, tiny_qwen2_vl

HIDDEN = 5


def _decoder_inputs(model, inputs) -> dict:
    """What the first decoder layer gets (hidden states) and the positions the rotary embedding reads, in a
    wrapped model's forward (after vtprune compacted the prompt)."""
    lm = model.model.language_model
    seen = {}

    def layer_hook(module, args, kwargs):
        seen.setdefault("inputs_embeds", args[0] if args else kwargs["hidden_states"])

    def rope_hook(module, args, kwargs):
        seen.setdefault("position_ids", args[1] if len(args) > 1 else kwargs["position_ids"])

    hooks = [
        lm.layers[0].register_forward_pre_hook(layer_hook, with_kwargs=True),
        lm.rotary_emb.register_forward_pre_hook(rope_hook, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 11),
    cols=st.integers(1, 11),
    target=st.integers(1, 130),
    anchor=st.sampled_from(["center", "first"]),
)
def test_pooling_equals_plain_window_means(rows, cols, target, anchor):
    features = torch.randn(rows * cols, HIDDEN, generator=torch.Generator().manual_seed(rows * 131 + cols))
    positions, pooled = pool_unit(features, (rows, cols), target, anchor)
    want_positions, want = reference_pool(features, (rows, cols), target, anchor)
    assert torch.equal(positions, want_positions)
    torch.testing.assert_close(pooled, want, atol=1e-6, rtol=1e-5)
    assert len(positions) <= max(target, 1) or target >= rows * cols
    assert torch.all(positions[1:] > positions[:-1])  # row-major, so placeholder order


def test_the_papers_two_readings_of_its_grid():
    """27 x 27 (SigLIP at 384 px): tokens=9 pools 9 x 9 windows (the paper's '3 x 3 = 9 tokens'),
    keep_ratio=1/9 pools 3 x 3 windows (its '3 x 3 aggregation, N / 9' = 81 tokens)."""
    grid = torch.arange(27 * 27, dtype=torch.float64)[:, None]  # value = raster index
    values = grid.reshape(27, 27)
    positions, pooled = pool_unit(grid, (27, 27), PoolConfig(tokens=9).target(729))
    assert pooled.shape == (9, 1)
    assert pooled[4, 0] == values[9:18, 9:18].mean()
    assert positions.tolist() == [r * 27 + c for r in (4, 13, 22) for c in (4, 13, 22)]  # window centres
    _, pooled = pool_unit(grid, (27, 27), PoolConfig(keep_ratio=1 / 9).target(729))
    assert pooled.shape == (81, 1)
    assert pooled[10, 0] == values[3:6, 3:6].mean()
    assert pooled_grid(24, 24, 16) == (4, 4) and pooled_grid(24, 24, 9) == (3, 3)  # LLaVA's 576 -> 16 / 9


def test_anchor_decides_the_m_rope_position_of_a_pooled_token():
    """Qwen2-VL keeps original positions: a pooled token takes its anchor cell's 3-D (t, h, w) position."""
    model = tiny_qwen2_vl()
    from vtprune.testing import qwen_vl_inputs

    inputs = qwen_vl_inputs(model)
    full = full_positions(model, inputs)
    seen = {}
    for anchor in ("center", "first"):
        vtprune.wrap(model, "pool", tokens=4, anchor=anchor)
        try:
            lm = _decoder_inputs(model, inputs)
            selection = vtprune.get_pruner(model).last
        finally:
            vtprune.unwrap(model)
        seen[anchor] = [s.kept_visual.tolist() for s in selection]
        for b, sel in enumerate(selection):  # positions of the kept columns are the original ones
            cols = sel.kept_columns
            got = lm["position_ids"][:, b, -len(cols) :]
            assert torch.equal(got, full[:, b, cols])
    # grid 4 x 4 -> 2 x 2 windows of 2 x 2; grid 4 x 6 -> 2 x 2 windows of 2 x 3
    assert seen["center"] == [[0, 2, 8, 10], [1, 4, 13, 16]]
    assert seen["first"] == [[0, 2, 8, 10], [0, 3, 12, 15]]


def test_llava_language_model_sees_the_pooled_rows_at_contiguous_positions():
    model = tiny_llava()
    from vtprune.testing import llava_inputs

    inputs = llava_inputs(model)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    vtprune.wrap(model, "pool", tokens=4)
    try:
        lm = _decoder_inputs(model, inputs)
        selection = vtprune.get_pruner(model).last
    finally:
        vtprune.unwrap(model)
    for b, sel in enumerate(selection):
        _, want = reference_pool(feats[b], (4, 4), 4)
        cols = sel.kept_columns
        image = (inputs["input_ids"][b, cols] == model.config.image_token_id).nonzero().squeeze(-1)
        rows = lm["inputs_embeds"][b, -len(cols) :][image]
        torch.testing.assert_close(rows, want, atol=1e-6, rtol=1e-5)
        assert torch.all(lm["position_ids"][b, -len(cols) :].diff() == 1)  # renumbered: no gaps
        assert sel.visual_out == 4 and sel.tokens_in - sel.tokens_out == 12


def test_family_token_grids():
    llava = get_family(tiny_llava())
    unit = torch.zeros(16, 3)
    assert llava.token_grids([unit, unit], {}) == [(4, 4), (4, 4)]
    assert llava.token_grids([torch.zeros(17, 3)], {}) == [None]  # [CLS] kept ("full"): no grid
    qwen = get_family(tiny_qwen2_vl())
    grid_thw = torch.tensor([[1, 8, 8], [1, 8, 12], [2, 8, 8]])
    units = [torch.zeros(16, 3), torch.zeros(24, 3), torch.zeros(32, 3)]
    # a video (t = 2) is its frames stacked; a count that disagrees with the grid has none
    assert qwen.token_grids(units, {"image_grid_thw": grid_thw}) == [(4, 4), (4, 6), (8, 4)]
    assert qwen.token_grids([torch.zeros(30, 3)], {"image_grid_thw": grid_thw[:1]}) == [None]
    base = type(llava).__mro__[1]  # Integration's default: a square count is a square grid
    assert base.token_grids(llava, [torch.zeros(9, 3), torch.zeros(10, 3)], {}) == [(3, 3), None]


def test_a_unit_without_a_grid_is_pooled_as_a_strip():
    features = torch.randn(10, HIDDEN)
    positions, pooled = pool_unit(features, None, 3)
    want_positions, want = reference_pool(features, (1, 10), 3)
    assert torch.equal(positions, want_positions)
    torch.testing.assert_close(pooled, want)
    assert pool_unit(features, None, 20)[1] is features  # nothing to pool


@pytest.mark.parametrize(
    "bad",
    [
        {"tokens": 0},
        {"tokens": 4, "keep_ratio": 0.5},
        {"keep_ratio": 1.5},
        {"anchor": "middle"},
        {"positions": "x"},
    ],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(vtprune.UsageError):
        PoolConfig(**bad)


def test_default_target_is_nine_and_never_exceeds_the_unit():
    assert PoolConfig().target(576) == 9
    assert PoolConfig(tokens=16).target(9) == 9
    assert PoolConfig(keep_ratio=0.1).target(576) == 58
