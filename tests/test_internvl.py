"""InternVL (``internvl``): tiles, the [CLS]-attention score of a pixel-shuffled token, per-image / per-tile
budgets, multi-image prompts, the torchvision-free processor and ``vtprune eval`` on a saved checkpoint.

The family x method contract (generate == no-cache reference, unwrap, errors) runs in tests/contract."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import (
    alive_per_layer,
    capture_language_model_inputs,
    greedy_masked_no_cache,
    greedy_with_logits,
    kept_reference_inputs,
)

import vtprune
from vtprune.errors import UsageError
from vtprune.integrations.base import TextDims
from vtprune.registry import get_family
from vtprune.runtime.selection import keep_count
from vtprune.testing.internvl import (
    internvl_inputs,
    save_tiny_internvl,
    tiny_internvl,
    tiny_internvl_processor,
)

# Sample 0: one image of one tile; sample 1: two images (2 tiles + thumbnail, then one tile). 16 tokens a tile.
IMAGES = ((1,), (3, 1))
TOKENS = 16


def _eager_cls_tokens(model, pixel_values, layer: int) -> torch.Tensor:
    """Independent reference: eager attention maps of the tower, [CLS] row at ``layer`` averaged over heads,
    [CLS] column dropped, and each LLM token the sum over its 2x2 patch block (token ``(a, b)`` holds patches
    ``(2a + i, 2b + j)``), ``(tiles, tokens)``."""
    eager = tiny_internvl(attn_implementation="eager", vision_layers=3, vision_feature_layer=-1)
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values=pixel_values, output_attentions=True)
    cls = out.attentions[layer][:, :, 0, 1:].mean(1)  # (tiles, patches)
    tiles, patches = cls.shape
    side = math.isqrt(patches)
    half = side // 2
    tokens = torch.zeros(tiles, half * half)
    for t in range(tiles):
        for a in range(half):
            for b in range(half):
                cells = [(2 * a + i) * side + 2 * b + j for i in (0, 1) for j in (0, 1)]
                tokens[t, a * half + b] = sum(float(cls[t, c]) for c in cells)
    return tokens


def _top(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` largest (ties to the lower index), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])


@pytest.mark.parametrize(("budget", "feature_layer"), [("image", -1), ("tile", -2)])
def test_kept_tokens_equal_an_eager_cls_attention_reference(budget, feature_layer):
    model = tiny_internvl(vision_layers=3, vision_feature_layer=feature_layer)
    inputs = internvl_inputs(model, images=IMAGES, text_lengths=(4, 6))
    vtprune.wrap(model, {"method": "fastervlm", "keep_ratio": 0.3, "budget": budget})
    with torch.no_grad():
        model(**inputs)
    got = [s.kept_visual.tolist() for s in vtprune.get_pruner(model).last]
    vtprune.unwrap(model)

    layer = 3 + feature_layer  # hidden_states[-1] is layer 2's output, [-2] layer 1's
    tokens = _eager_cls_tokens(model, inputs["pixel_values"], layer).tolist()
    want, tile = [], 0
    for sample in IMAGES:
        kept, offset = [], 0
        for count in sample:
            image = tokens[tile : tile + count]
            tile += count
            if budget == "image":  # one top-k over all tiles of the image
                flat = [v for t in image for v in t]
                kept += [offset + i for i in _top(flat, keep_count(len(flat), 0.3))]
            else:  # top-k of every tile
                for j, t in enumerate(image):
                    kept += [offset + j * TOKENS + i for i in _top(t, keep_count(len(t), 0.3))]
            offset += count * TOKENS
        want.append(kept)
    assert got == want
    if budget == "tile":  # every tile keeps the same number
        assert [len(k) for k in got] == [keep_count(TOKENS, 0.3) * sum(s) for s in IMAGES]


CONFIGS = {
    "fastervlm": {"method": "fastervlm", "keep_ratio": 0.3},  # 0.3: per image != per tile (14 vs 3 x 5)
    "random-tile-original": {
        "method": "random",
        "keep_ratio": 0.4,
        "budget": "tile",
        "positions": "original",
    },
    "fastervlm+fastv": [
        {"method": "fastervlm", "keep_ratio": 0.3},
        {"method": "fastv", "layer": 1, "keep_ratio": 0.5},
    ],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_tile_and_two_image_prompts_generate_as_a_no_cache_reference(name):
    model = tiny_internvl(text_layers=3)
    inputs = internvl_inputs(model, images=IMAGES, text_lengths=(4, 6), seed=1)
    vtprune.wrap(model, CONFIGS[name])
    pruner = vtprune.get_pruner(model)
    out = greedy_with_logits(model, inputs, 3)
    selection, engine, contiguous = pruner.last, pruner.engine, pruner.contiguous
    vtprune.unwrap(model)
    assert contiguous == ("original" not in name)
    first = CONFIGS[name] if isinstance(CONFIGS[name], dict) else CONFIGS[name][0]
    ratio, per_tile = first["keep_ratio"], first.get("budget") == "tile"
    for sel, images in zip(selection, IMAGES):  # the budget is per image (or per tile), not per sample
        per_image = [
            keep_count(TOKENS, ratio) * n if per_tile else keep_count(TOKENS * n, ratio) for n in images
        ]
        assert (sel.visual_in, sel.visual_out) == (TOKENS * sum(images), sum(per_image))

    ref = kept_reference_inputs(model, inputs, selection, contiguous)
    batch, seq = ref["input_ids"].shape
    alive = alive_per_layer(engine, batch, seq) if engine is not None else [None] * 3
    alive = [a if a is not None else torch.ones(batch, seq, dtype=torch.bool) for a in alive]
    tokens, logits = greedy_masked_no_cache(model, capture_language_model_inputs(model, ref), alive, 3)
    assert torch.equal(out.sequences[:, -3:], tokens)
    for got, want in zip(out.logits, logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)


def test_layout_facts():
    model = tiny_internvl()
    family = get_family(model)
    assert family.budget_modes == ("image", "tile") and family.default_positions == "contiguous"
    assert family.text_dims() == TextDims(64, 128, True, 2)
    assert type(family.vision_tower()).__name__ == "InternViTTower" and family.vision_tower().has_cls
    inputs = internvl_inputs(model, images=((2, 1), (1,)), text_lengths=(3, 3), pixel_values=False)
    mask = inputs["input_ids"] == model.config.image_token_id
    rows = [torch.zeros(TOKENS, 8)] * 4
    assert family.unit_rows(rows, mask) == [2, 1, 1]
    mask[1, -5] = False  # a run that is not whole tiles
    with pytest.raises(UsageError, match="whole tiles"):
        family.unit_rows(rows, mask)
    with pytest.raises(UsageError, match="budget='crop' is not offered"):
        vtprune.wrap(model, "fastervlm", budget="crop")

    # While wrapped, the encoder hands out its stacked tiles as a list of rows (so beams keep the scored
    # tensors); the model itself gets one stacked tensor back, and unwrap restores the tensor output.
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        vtprune.wrap(model, "fastervlm")
        rows = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        vtprune.unwrap(model)
        again = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    assert isinstance(rows, list) and len(rows) == 3 and torch.equal(torch.stack(rows), plain)
    assert torch.equal(again, plain)


def _csv(path):
    with open(path) as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def test_processor_without_torchvision_and_eval_on_a_saved_checkpoint(tmp_path):
    from vtprune.cli import main
    from vtprune.integrations import load_processor

    folder = save_tiny_internvl(tmp_path / "tiny-internvl")
    processor = load_processor(str(folder), "internvl")
    assert type(processor).__name__ in ("InternVLProcessorNoVideo", "InternVLProcessor")
    assert '"processor_class": "InternVLProcessor"' in (folder / "processor_config.json").read_text()

    from PIL import Image

    wide, square = Image.new("RGB", (96, 40), "red"), Image.new("RGB", (32, 32), "blue")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=[wide, square], text=[text, text], return_tensors="pt", padding=True)
    visual = (batch["input_ids"] == 3).sum(-1).tolist()
    assert batch["input_ids"][1, 0] == 0 and visual[0] > visual[1] == TOKENS  # left-padded; tiles differ
    assert batch["pixel_values"].shape[0] == sum(visual) // TOKENS
    if type(processor).__name__ == "InternVLProcessorNoVideo":
        with pytest.raises(UsageError, match="torchvision"):
            processor(text=["<video>"], videos=[torch.zeros(2, 3, 32, 32)])

    out = tmp_path / "run"
    args = ["eval", "--model", str(folder), "--benchmarks", "synthetic", "--limit", "2", "--batch-size", "2",
            "--methods", "none", "fastervlm:keep_ratio=0.25", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _csv(out / "summary.csv")
    n_visual = 5 * TOKENS  # a 96px square image: 2x2 tiles + thumbnail
    assert float(rows["none"]["visual_tokens_mean"]) == n_visual
    assert float(rows["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == keep_count(n_visual, 0.25)


def test_tiny_processor_ids_match_the_model():
    model = tiny_internvl()
    tokenizer = tiny_internvl_processor(model).tokenizer
    assert tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<img>", "</img>"]) == [3, 5, 6]
