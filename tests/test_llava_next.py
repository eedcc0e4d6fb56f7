"""LLaVA-NeXT (anyres): kept tokens against an eager [CLS]-attention reference per crop on an independent
account of the layout, newline tokens never pruned, scores packed as the features are, one-crop and
two-image prompts, budgets, the processor and ``vtprune eval`` on a saved checkpoint."""

from __future__ import annotations

import csv

import pytest
import torch
from anyres_reference import image_layout, reference_groups, reference_kept, view_count
from helpers import greedy_no_cache, greedy_with_logits, kept_reference_inputs, selection_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.errors import UsageError
from vtprune.registry import get_family
from vtprune.testing.llava_next import anyres_inputs, save_tiny_llava_next, tiny_llava_next

# sample 0: two images (2x2 crops, unpadded rows; 1x1 crop), sample 1: one image (1x3 crops)
TWO_IMAGES = dict(image_sizes=((40, 70), (30, 30), (20, 70)), images_per_sample=(2, 1))


def _tower_rows(inputs, model):
    """Image sizes, the tower's input rows (each image's views, the processor's padding dropped), views."""
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    counts = [view_count(model, s) for s in sizes]
    return sizes, torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)]), counts


def _per_sample(images_per_sample, per_image):
    """Split a per-image list into per-sample lists (images fill samples in prompt order)."""
    out, i = [], 0
    for n in images_per_sample:
        out.append(per_image[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("budget", ["crop", "image"])
@pytest.mark.parametrize("case", ["default", "two_images"])
def test_kept_tokens_equal_an_eager_cls_attention_reference(budget, case):
    model = tiny_llava_next()
    eager = tiny_llava_next(attn_implementation="eager")  # same seed, same weights
    extra = TWO_IMAGES if case == "two_images" else {}
    inputs = anyres_inputs(model, **extra)
    ratio = 0.3
    vtprune.wrap(model, "fastervlm", keep_ratio=ratio, budget=budget)
    with torch.no_grad():
        model(**inputs)
        sizes, pixels, counts = _tower_rows(inputs, model)
        attn = eager.model.vision_tower(pixels, output_attentions=True).attentions
    layer = len(attn) - 2  # features are hidden_states[-2]: the output of layer n - 2
    cls = attn[layer][:, :, 0, 1:].mean(1)  # (views, patches): each view's own [CLS] row
    expected, row = [], 0
    for size, views in zip(sizes, counts):
        tokens = image_layout(model, size)
        expected.append((tokens, reference_kept(tokens, cls[row : row + views], ratio, budget)))
        row += views
    per_sample = _per_sample(extra.get("images_per_sample", [1] * len(sizes)), expected)
    for sel, images in zip(selection_of(model), per_sample):
        want, offset = [], 0
        for tokens, kept in images:
            want += [offset + i for i in kept]
            offset += len(tokens)
        assert sel.kept_visual.tolist() == want
        assert sel.visual_in == offset


def _newline_rows(model, inputs):
    """Per sample, the indices of its visual tokens that are the model's ``image_newline`` vector."""
    from helpers import image_features_per_sample

    newline = model.model.image_newline
    return [(f == newline).all(-1).nonzero().squeeze(-1) for f in image_features_per_sample(model, inputs)]


@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_newline_tokens_are_never_pruned(method):
    model = tiny_llava_next()
    inputs = anyres_inputs(model, **TWO_IMAGES)
    newlines = _newline_rows(model, inputs)
    assert all(len(n) > 0 for n in newlines)
    vtprune.wrap(model, method, keep_ratio=0.05)
    with torch.no_grad():
        model(**inputs)
    for sel, rows in zip(selection_of(model), newlines):
        assert set(rows.tolist()) <= set(sel.kept_visual.tolist())
        assert sel.visual_out < sel.visual_in


def test_features_encoded_before_wrap_keep_their_newlines_or_are_refused():
    model = tiny_llava_next()
    inputs = anyres_inputs(model)
    newlines = _newline_rows(model, inputs)

    def encode():
        with torch.no_grad():
            return model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], return_dict=True
            )

    first, second, third = encode(), encode(), encode()  # before wrapping: no scores, no layout attached
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    vtprune.wrap(model, "random", keep_ratio=0.05)
    with torch.no_grad():
        model(**text, image_sizes=inputs["image_sizes"], mm_encoder_outputs={"image": first})
    for sel, rows in zip(selection_of(model), newlines):
        assert set(rows.tolist()) <= set(sel.kept_visual.tolist())
        assert sel.visual_out < sel.visual_in
    with pytest.raises(UsageError, match="image_sizes"), torch.no_grad():  # no layout: refused, not guessed
        model(**text, mm_encoder_outputs={"image": second})
    vtprune.unwrap(model)
    vtprune.wrap(model, "fastervlm", keep_ratio=0.05)
    with pytest.raises(UsageError, match="encoded before vtprune.wrap"), torch.no_grad():
        model(**text, image_sizes=inputs["image_sizes"], mm_encoder_outputs={"image": third})


_MODEL = {}


def _shared_model():
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_llava_next()
    return _MODEL["m"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(6, 110), st.integers(6, 110)), min_size=1, max_size=3), st.integers(0, 99)
)
def test_scores_and_groups_follow_the_packed_features(sizes, seed):
    """Fake per-view scores = the projected features' first channel: the packed scores must equal the packed
    features' first channel; every token's group must be the view its feature came from."""
    model = _shared_model()
    family = get_family(model)
    batch = anyres_inputs(
        model, image_sizes=sizes, text_lengths=(3,), images_per_sample=(len(sizes),), seed=seed
    )
    _, pixels, counts = _tower_rows(batch, model)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = model.model.multi_modal_projector(hidden)  # (views, patches, dim)
        feats = list(model.model.get_image_features(pixels, batch["image_sizes"]).pooler_output)
    records = [torch.cat([torch.zeros(proj.shape[0], 1), proj[..., 0]], 1)]  # a [CLS] column, dropped
    args = {"image_sizes": batch["image_sizes"]}
    scores = family.token_scores(records, feats, args)
    groups = family.token_groups(feats, args, "crop")
    row = 0
    for size, feat, score, group, views in zip(sizes, feats, scores, groups, counts):
        newline = (feat == model.model.image_newline).all(-1)
        assert torch.equal(group == -1, newline)
        torch.testing.assert_close(score[~newline], feat[~newline, 0], rtol=0, atol=0)
        source = proj[row : row + views].reshape(-1, proj.shape[-1])
        match = (feat[~newline, None, :] == source[None]).all(-1).float().argmax(-1)  # flat (view, patch)
        assert torch.equal(group[~newline], match // proj.shape[1])
        assert [g for g in reference_groups(image_layout(model, size), "crop")] == [
            -1 if g < 0 else frozenset([g]) for g in group.tolist()
        ]
        row += views


@pytest.mark.parametrize("method", ["fastervlm", "random"])
@pytest.mark.parametrize("case", ["one_crop", "two_images"])
def test_one_crop_and_two_image_prompts_generate_as_a_no_cache_reference(method, case):
    model = tiny_llava_next()
    extra = TWO_IMAGES if case == "two_images" else dict(image_sizes=((30, 30), (12, 16)))
    inputs = anyres_inputs(model, **extra)
    steps = 3
    vtprune.wrap(model, method, keep_ratio=0.3)
    out = greedy_with_logits(model, inputs, steps)
    selection = selection_of(model)
    vtprune.unwrap(model)
    ref_tokens, ref_logits = greedy_no_cache(
        model, kept_reference_inputs(model, inputs, selection, True), steps
    )
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    assert all(s.visual_out < s.visual_in for s in selection)


def test_layout_facts():
    model = tiny_llava_next()
    family = get_family(model)
    tower = family.vision_tower()
    assert type(tower).__name__ == "ClipTower" and tower.has_cls
    assert tower.default_layer() == 1  # 3 layers, hidden_states[-2]
    assert family.budget_modes == ("crop", "image") and family.resolve_budget("auto") == "crop"
    assert family.resolve_positions("auto") == "contiguous"
    assert family.text_dims().num_layers == 2
    with pytest.raises(UsageError, match="offers"):
        vtprune.wrap(model, "fastervlm", budget="tile")
    assert not vtprune.is_wrapped(model)
    inputs = anyres_inputs(model)
    assert family.token_grids([torch.zeros(52, 4), torch.zeros(68, 4)], inputs) == [None, None]


def _csv(path):
    with open(path) as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def test_processor_and_eval_on_a_saved_checkpoint(tmp_path):
    from PIL import Image

    from vtprune.cli import main
    from vtprune.integrations import load_processor

    folder = save_tiny_llava_next(tmp_path / "tiny-llava-next")
    processor = load_processor(str(folder), "llava_next")
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    model = tiny_llava_next()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
        add_generation_prompt=True,
    )
    wide, square = Image.new("RGB", (70, 40), "red"), Image.new("RGB", (30, 30), "blue")
    batch = processor(images=[wide, square], text=[text, text], return_tensors="pt", padding=True)
    visual = (batch["input_ids"] == 3).sum(-1).tolist()
    assert visual == [len(image_layout(model, (40, 70))), len(image_layout(model, (30, 30)))]
    assert batch["input_ids"][1, 0] == 0  # left-padded
    with torch.no_grad():
        model(**batch)  # the model agrees with the processor's token counts

    out = tmp_path / "run"
    args = ["eval", "--model", str(folder), "--benchmarks", "synthetic", "--limit", "2", "--batch-size", "2",
            "--methods", "none", "fastervlm:keep_ratio=0.25", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _csv(out / "summary.csv")
    tokens = image_layout(model, (96, 96))  # the synthetic benchmark's 96px images: 2x2 crops + base
    kept = reference_kept(tokens, torch.zeros(5, 16), 0.25, "crop")
    assert float(rows["none"]["visual_tokens_mean"]) == len(tokens)
    assert float(rows["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == len(kept)
