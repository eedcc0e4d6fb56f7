"""vtprune.viz: token geometry of every family, overlays, comparisons, layer counts, Pareto plots (Agg)."""

from __future__ import annotations

import sys

import matplotlib
import numpy as np
import pytest
import torch
from anyres_reference import _unpadded, best_resolution, image_layout
from PIL import Image

import vtprune
from vtprune import viz
from vtprune.errors import UsageError
from vtprune.integrations.base import grid_boxes
from vtprune.registry import get_family
from vtprune.runtime.selection import keep_count

matplotlib.use("Agg")


def _boxes_tile_the_unit_square(boxes: np.ndarray) -> None:
    """No two boxes overlap and together they cover [0, 1]^2 (areas add up, every box inside)."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert area == pytest.approx(1.0)
    assert (boxes >= -1e-9).all() and (boxes <= 1 + 1e-9).all()
    assert len({tuple(np.round(b, 9)) for b in boxes}) == len(boxes)


def test_grid_boxes_row_major():
    boxes = grid_boxes(2, 3, view=1, region=(0.5, 0.0, 1.0, 0.6))
    assert boxes.shape == (6, 5)
    assert boxes[:, 0].eq(1).all()
    # token 4: row 1, column 1 of a 2x3 grid over the lower half, left 60%
    assert boxes[4, 1:].tolist() == pytest.approx([0.75, 0.2, 1.0, 0.4])


# ------------------------------------------------------------------------------------ toy LLaVA
@pytest.fixture(scope="module")
def toy():
    from vtprune.toy import build_prompt, load_toy_benchmark, load_toy_model

    model, processor = load_toy_model()
    row = load_toy_benchmark("test")[0]
    return model, processor, row["image"], build_prompt(row["question"])


def test_toy_token_map_matches_the_selection(toy):
    model, processor, image, text = toy
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    try:
        tokens = viz.token_map(model, inputs, image_size=(image.height, image.width))
        sel = vtprune.get_pruner(model).last[0]
    finally:
        vtprune.unwrap(model)
    assert tokens.stage == "input"
    assert np.flatnonzero(tokens.kept).tolist() == sel.kept_visual.tolist()
    assert tokens.kept.sum() == keep_count(36, 0.25) == 9
    _boxes_tile_the_unit_square(tokens.boxes)
    # token 7 of the 6x6 grid: row 1, column 1
    assert tokens.boxes[7].tolist() == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])


def test_toy_in_llm_stage_is_the_last_layer(toy):
    model, processor, image, text = toy
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    vtprune.wrap(model, "fastv", layer=1, keep_ratio=0.25)
    try:
        last = viz.token_map(model, inputs)
        first = viz.token_map(model, inputs, stage="input")
    finally:
        vtprune.unwrap(model)
    assert last.stage == "last" and last.kept.sum() == last.layer_visual[-1] < 36
    assert first.kept.all()
    with pytest.raises(UsageError, match="stage"):
        viz.token_map(model, inputs, stage="middle")


def test_toy_compare_figure(toy, tmp_path):
    model, processor, image, text = toy
    settings = [None, {"method": "fastervlm", "keep_ratio": 0.1}, {"method": "pool", "tokens": 4}]
    fig, maps = viz.compare(
        model, processor, image, settings, text=text, answer_tokens=2, path=tmp_path / "c.png"
    )
    assert (tmp_path / "c.png").stat().st_size > 0
    assert len(fig.axes) == 3
    assert [int(m.kept.sum()) for m in maps] == [36, keep_count(36, 0.1), 4]
    assert maps[2].pooled and not maps[1].pooled
    assert all(isinstance(m.answer, str) for m in maps)
    assert "kept 4 / 36" in fig.axes[1].get_title()
    with pytest.raises(UsageError, match="unwrap"):
        vtprune.wrap(model, "random", keep_ratio=0.5)
        try:
            viz.show(model, processor, image, "fastervlm", text=text)
        finally:
            vtprune.unwrap(model)


def test_overlay_darkens_dropped_patches_only(toy):
    """Draw on a white image and read the pixels back: dropped cells are dark, kept cells stay white."""
    plt = pytest.importorskip("matplotlib.pyplot")
    white = Image.new("RGB", (60, 60), "white")
    kept = np.zeros(9, dtype=bool)
    kept[[0, 4]] = True
    tokens = viz.TokenMap(boxes=grid_boxes(3, 3)[:, 1:].numpy(), views=np.zeros(9, int), kept=kept)
    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    viz.overlay(white, tokens, axes=ax, title=False, alpha=1.0)
    fig.subplots_adjust(0, 0, 1, 1)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    plt.close(fig)
    h, w = pixels.shape[:2]

    def centre(cell):
        r, c = divmod(cell, 3)
        return pixels[int((r + 0.5) * h / 3), int((c + 0.5) * w / 3)]

    assert centre(0).min() > 200 and centre(4).min() > 200
    assert centre(1).max() < 60 and centre(8).max() < 60


def test_center_crop_region():
    class Size:
        shortest_edge = 100

    class Crop:
        height = width = 100

    class Proc:
        do_center_crop = True
        size = Size()
        crop_size = Crop()

    # a 200x100 (h x w) portrait image: resized to 200 x 100, the middle half of its height survives
    assert viz._center_crop_region(Proc(), (200, 100)) == pytest.approx((0.25, 0.0, 0.75, 1.0))
    Proc.do_center_crop = False
    assert viz._center_crop_region(Proc(), (200, 100)) == (0.0, 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------- other families
def test_qwen_merged_grid():
    from vtprune.testing import qwen_vl_inputs, tiny_qwen2_vl

    model = tiny_qwen2_vl()
    inputs = qwen_vl_inputs(model, grids=((1, 8, 12),), text_lengths=(5,))
    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    try:
        tokens = viz.token_map(model, inputs)
        sel = vtprune.get_pruner(model).last[0]
    finally:
        vtprune.unwrap(model)
    assert len(tokens.kept) == 24  # (8 / 2) x (12 / 2) merged tokens
    assert np.flatnonzero(tokens.kept).tolist() == sel.kept_visual.tolist()
    _boxes_tile_the_unit_square(tokens.boxes)
    assert tokens.boxes[7].tolist() == pytest.approx([0.25, 1 / 6, 0.5, 2 / 6])  # row 1, column 1 of 4x6


@pytest.mark.parametrize("size", [(40, 70), (70, 40), (30, 30)])
def test_anyres_boxes_follow_the_reference_layout(size):
    """Each token's box agrees with tests/anyres_reference.py's account of base view, crops and unpadding."""
    from vtprune.testing.llava_next import tiny_llava_next, tiny_llava_next_processor

    model = tiny_llava_next()
    processor = tiny_llava_next_processor(model)
    image = Image.new("RGB", (size[1], size[0]), "red")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
        add_generation_prompt=True,
    )
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    try:
        tokens = viz.token_map(model, inputs, image_size=size)
        sel = vtprune.get_pruner(model).last[0]
    finally:
        vtprune.unwrap(model)
    ref = image_layout(model, size)
    assert len(tokens.kept) == len(ref)
    S = model.config.vision_config.image_size
    p = S // model.config.vision_config.patch_size
    H, W = best_resolution(size, model.config.image_grid_pinpoints)
    rows, cols = _unpadded(size, (H // S) * p, (W // S) * p)
    for token, box, view in zip(ref, tokens.boxes, tokens.views):
        if token is None:  # newline
            assert np.isnan(box).all()
            continue
        ((v, j, _),) = token
        if v == 0:
            r, c, nr, nc = j // p, j % p, p, p
        else:
            r = ((v - 1) // (W // S)) * p + j // p - rows.start
            c = ((v - 1) % (W // S)) * p + j % p - cols.start
            nr, nc = len(rows), len(cols)
        assert view == (0 if v == 0 else 1)
        assert box.tolist() == pytest.approx([r / nr, c / nc, (r + 1) / nr, (c + 1) / nc])
    for view in (0, 1):
        _boxes_tile_the_unit_square(tokens.boxes[tokens.counted & (tokens.views == view)])
    assert np.flatnonzero(tokens.kept).tolist() == sel.kept_visual.tolist()
    assert tokens.kept[~tokens.counted].all()  # newlines are never pruned
    axes = viz.overlay(image, tokens)
    assert len(axes) == 2


def test_internvl_pixel_shuffle_is_row_major():
    """A token's box assumes pixel_shuffle folds the 2x2 patches at its row-major place in the tile."""
    from vtprune.testing.internvl import tiny_internvl

    model = tiny_internvl()
    side = 8  # patches a side of a 32px tile in 4px patches
    rows = torch.arange(side).repeat_interleave(side).float().reshape(1, side, side, 1)
    cols = torch.arange(side).repeat(side).float().reshape(1, side, side, 1)
    out = model.model.pixel_shuffle(torch.cat([rows, cols], -1), scale_factor=0.5).reshape(-1, 8)
    boxes = get_family(model).token_boxes([16], {})[0]
    for token, box in enumerate(boxes):
        patch_rows, patch_cols = out[token, 0::2], out[token, 1::2]
        # the token's four patches lie inside its box (box in tile fractions, patches in patch units)
        assert (patch_rows / side >= box[1] - 1e-6).all() and ((patch_rows + 1) / side <= box[3] + 1e-6).all()
        assert (patch_cols / side >= box[2] - 1e-6).all() and ((patch_cols + 1) / side <= box[4] + 1e-6).all()


@pytest.mark.parametrize("size", [(32, 96), (96, 40), (64, 64)])
def test_internvl_tiles_follow_the_processor(size):
    """The tile canvas is the one the processor cut: each tile's pixels are the image's pixels in the tile's
    box (an image with a colour ramp tells the places apart); the thumbnail covers the whole image."""
    from vtprune.testing.internvl import tiny_internvl, tiny_internvl_processor

    model = tiny_internvl()
    processor = tiny_internvl_processor(model, max_tiles=4)
    h, w = size
    ramp = np.zeros((h, w, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, w)[None, :]
    ramp[..., 1] = np.linspace(0, 255, h)[:, None]
    image = Image.fromarray(ramp)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
        add_generation_prompt=True,
    )
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    tiles = inputs["pixel_values"].shape[0]
    vtprune.wrap(model, "fastervlm", keep_ratio=0.2)
    try:
        tokens = viz.token_map(model, inputs, image_size=size)
    finally:
        vtprune.unwrap(model)
    per_tile = get_family(model).tile_tokens
    assert len(tokens.kept) == tiles * per_tile
    assert tokens.kept.sum() == keep_count(tiles * per_tile, 0.2)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    for t in range(tiles):
        box = tokens.boxes[t * per_tile : (t + 1) * per_tile]
        top, left = box[:, 0].min(), box[:, 1].min()
        bottom, right = box[:, 2].max(), box[:, 3].max()
        pixels = (inputs["pixel_values"][t] * std + mean) * 255  # the tile as the model saw it
        # the ramp's red channel encodes x, green y: the tile's mean colour is its box's centre
        assert float(pixels[0].mean()) / 255 == pytest.approx((left + right) / 2, abs=0.06)
        assert float(pixels[1].mean()) / 255 == pytest.approx((top + bottom) / 2, abs=0.06)
        expected_view = 0 if t == tiles - 1 or tiles == 1 else 1
        assert (tokens.views[t * per_tile : (t + 1) * per_tile] == expected_view).all()
    for view in set(tokens.views.tolist()):
        _boxes_tile_the_unit_square(tokens.boxes[tokens.views == view])
    if tiles > 1:
        inputs_without_size = viz.token_map  # a tiled image needs its size
        with pytest.raises(UsageError, match="image_size"):
            inputs_without_size(model, inputs)


# ------------------------------------------------------------------------- layers, exits, Pareto
def test_layer_counts_and_exits(toy, tmp_path):
    from vtprune.toy import load_toy_benchmark
    from vtprune.toy.model import build_prompt

    model, processor, _, _ = toy
    data = load_toy_benchmark("test").select(range(8))
    inputs = processor(
        images=list(data["image"]),
        text=[build_prompt(q) for q in data["question"]],
        return_tensors="pt",
        padding=True,
    )
    vtprune.wrap(model, "dyvte", threshold=0.5)
    try:
        with torch.no_grad():
            model(**inputs)
        selections = vtprune.get_pruner(model).last
    finally:
        vtprune.unwrap(model)
    ax = viz.layer_counts({"dyvte": selections, "schedule": [36, 30, 20, 10]}, path=tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 0
    mean_line = ax.get_lines()[0].get_ydata()
    assert list(mean_line) == pytest.approx(np.mean([s.layer_visual for s in selections], 0).tolist())
    ax = viz.exit_layers(selections)
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == len(selections)
    exits = [s.exit_layer for s in selections]
    assert heights[-1] == sum(e is None for e in exits)
    assert heights[:-1] == [sum(e == i for e in exits) for i in range(4)]


def test_pareto_from_an_eval_folder(tmp_path):
    from vtprune.cli import main

    out = tmp_path / "run"
    args = ["eval", "--model", "toy", "--benchmarks", "synthetic", "--limit", "4", "--batch-size", "4",
            "--warmup", "0", "--methods", "none", "fastervlm:keep_ratio=0.25", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = viz.read_summary(out)
    assert [r["setting"] for r in rows] == ["none", "fastervlm-keep_ratio=0.25"]
    assert isinstance(rows[1]["flops_ratio"], float) and rows[0]["samples"] == 4
    path = viz.pareto(out, path=tmp_path / "p.png", metric="exact_match")
    assert path.stat().st_size > 0
    with pytest.raises(UsageError, match="not a column"):
        viz.pareto(out, path=tmp_path / "q.png", metric="bleu")
    with pytest.raises(UsageError, match="summary.csv"):
        viz.read_summary(tmp_path)


def test_schedule_counts(tmp_path):
    (tmp_path / "s.json").write_text('{"method": "schedule", "keep": [36, 30, 12, 4]}')
    assert viz.schedule_counts(tmp_path / "s.json") == [36, 30, 12, 4]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UsageError, match="keep"):
        viz.schedule_counts(tmp_path / "bad.json")


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"vtprune\[viz\]"):
        viz.layer_counts({"a": [1, 2]})
