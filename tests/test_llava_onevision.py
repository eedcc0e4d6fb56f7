"""LLaVA-OneVision (SigLIP, no [CLS]): kept tokens against a manual received-attention reference on an
independent account of the anyres_max layout, scores interpolated with the features, multi-image prompts,
the torchvision-free processor and ``vtprune eval`` on a saved checkpoint."""

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
from vtprune.testing.llava_onevision import onevision_inputs, save_tiny_llava_onevision, tiny_llava_onevision

# sample 0: two images (base views only, as OneVision encodes multi-image samples), sample 1: one image
TWO_IMAGES = dict(image_sizes=((40, 70), (30, 30), (20, 70)), images_per_sample=(2, 1))


def _received_attention(model, pixels, layer: int) -> torch.Tensor:
    """``(views, patches)``: mean over heads and over the view's patches (queries) of the softmax attention
    each patch receives at encoder ``layer``, from the layer's own projections (eager, by hand)."""
    attn_module = model.model.vision_tower.encoder.layers[layer].self_attn
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = attn_module.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model.model.vision_tower(pixels)
    handle.remove()
    h = seen["h"]
    views, n, _ = h.shape
    heads = attn_module.num_heads
    with torch.no_grad():
        q = attn_module.q_proj(h).view(views, n, heads, -1).transpose(1, 2)
        k = attn_module.k_proj(h).view(views, n, heads, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn_module.scale).softmax(-1)  # (views, heads, queries, keys)
    return probs.mean(1).mean(1)


def _images(inputs, model):
    """Per image: size, whether it is cropped (single-image sample), its tower rows."""
    per_sample = inputs["batch_num_images"].tolist()
    cropped = [n == 1 for n in per_sample for _ in range(n)]
    sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
    counts = [view_count(model, s, c) for s, c in zip(sizes, cropped)]
    pixels = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)])
    return sizes, cropped, counts, pixels, per_sample


@pytest.mark.parametrize("budget", ["crop", "image"])
@pytest.mark.parametrize("case", ["default", "two_images"])
def test_kept_tokens_equal_a_received_attention_reference(budget, case):
    model = tiny_llava_onevision()
    extra = TWO_IMAGES if case == "two_images" else {}
    inputs = onevision_inputs(model, **extra)
    ratio = 0.3
    vtprune.wrap(model, "fastervlm", keep_ratio=ratio, budget=budget)
    with torch.no_grad():
        model(**inputs)
    selection = selection_of(model)
    vtprune.unwrap(model)
    sizes, cropped, counts, pixels, per_sample = _images(inputs, model)
    layers = model.config.vision_config.num_hidden_layers
    received = _received_attention(model, pixels, layers - 1)  # vision_feature_layer -1: the last layer
    expected, row = [], 0
    for size, crop, views in zip(sizes, cropped, counts):
        tokens = image_layout(model, size, crop)
        expected.append((tokens, reference_kept(tokens, received[row : row + views], ratio, budget)))
        row += views
    image = 0
    for sel, n_images in zip(selection, per_sample):
        want, offset = [], 0
        for tokens, kept in expected[image : image + n_images]:
            want += [offset + i for i in kept]
            offset += len(tokens)
        image += n_images
        assert sel.kept_visual.tolist() == want
        assert sel.visual_in == offset


def test_the_default_inputs_cover_interpolation_and_a_single_crop():
    model = tiny_llava_onevision()
    inputs = onevision_inputs(model)
    first, second = (image_layout(model, tuple(s)) for s in inputs["image_sizes"].tolist())
    assert any(t is not None and len(t) > 1 for t in first)  # anyres_max blended patches
    assert view_count(model, (30, 30)) == 2 and all(t is None or len(t) == 1 for t in second)


_MODEL = {}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(6, 110), st.integers(6, 110)), min_size=1, max_size=3),
    st.sampled_from(["anyres_max_1", "anyres_max_2", "anyres_max_9"]),
)
def test_scores_and_groups_follow_the_interpolated_features(sizes, aspect):
    """Fake per-view scores = the projected features' first channel: the packed (unpadded, interpolated)
    scores equal the features' first channel; groups match the independent layout's dominant view."""
    if "m" not in _MODEL:
        _MODEL["m"] = tiny_llava_onevision()
    model = _MODEL["m"]
    model.config.vision_aspect_ratio = aspect
    family = get_family(model)
    batch = onevision_inputs(model, image_sizes=sizes, text_lengths=(3,), images_per_sample=(len(sizes),))
    _, cropped, counts, pixels, _ = _images(batch, model)
    encode = {k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        proj = model.model.multi_modal_projector(hidden)
        feats = list(model.model.get_image_features(**encode).pooler_output)
    scores = family.token_scores([proj[..., 0]], feats, encode)
    groups = family.token_groups(feats, encode, "crop")
    for size, crop, feat, score, group in zip(sizes, cropped, feats, scores, groups):
        newline = (feat == model.model.image_newline).all(-1)
        assert torch.equal(group == -1, newline)
        torch.testing.assert_close(score[~newline], feat[~newline, 0], rtol=1e-6, atol=1e-6)
        want = reference_groups(image_layout(model, size, crop), "crop")
        assert len(want) == len(group)
        assert all(w == -1 if g < 0 else g in w for g, w in zip(group.tolist(), want))


def test_siglip_tower_facts():
    model = tiny_llava_onevision()
    family = get_family(model)
    tower = family.vision_tower()
    assert type(tower).__name__ == "SiglipTower" and not tower.has_cls
    assert tower.default_layer() == 2  # vision_feature_layer -1 of 3 layers
    parts = vtprune.registry.method_parts(vtprune.FasterVLMConfig(keep_ratio=0.1), family)
    assert parts.probe.statistic == "received"
    assert family.budget_modes == ("crop", "image") and family.resolve_positions("auto") == "contiguous"


@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_two_image_prompts_generate_as_a_no_cache_reference(method):
    model = tiny_llava_onevision()
    inputs = onevision_inputs(model, **TWO_IMAGES)
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
    newline = model.model.image_newline
    from helpers import image_features_per_sample

    for sel, feat in zip(selection, image_features_per_sample(model, inputs)):
        rows = (feat == newline).all(-1).nonzero().squeeze(-1)
        assert set(rows.tolist()) <= set(sel.kept_visual.tolist())
        assert sel.visual_out < sel.visual_in


def _csv(path):
    with open(path) as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def test_processor_without_torchvision_and_eval_on_a_saved_checkpoint(tmp_path):
    import importlib.util

    from PIL import Image

    from vtprune.cli import main
    from vtprune.integrations import load_processor

    folder = save_tiny_llava_onevision(tmp_path / "tiny-llava-onevision")
    assert '"processor_class": "LlavaOnevisionProcessor"' in (folder / "processor_config.json").read_text()
    processor = load_processor(str(folder), "llava_onevision")
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__name__ == "LlavaOnevisionProcessorNoVideo"
        with pytest.raises(UsageError, match="torchvision"):
            processor(text=["<video>"], videos=[torch.zeros(2, 3, 32, 32)])
    assert type(processor.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    model = tiny_llava_onevision()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}],
        add_generation_prompt=True,
    )
    two = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same ?"}],
            }
        ],
        add_generation_prompt=True,
    )
    wide, square = Image.new("RGB", (70, 40), "red"), Image.new("RGB", (30, 30), "blue")
    batch = processor(images=[[wide, square], [wide]], text=[two, text], return_tensors="pt", padding=True)
    visual = (batch["input_ids"] == 3).sum(-1).tolist()
    layout = [image_layout(model, (40, 70), False), image_layout(model, (30, 30), False)]
    assert visual == [sum(map(len, layout)), len(image_layout(model, (40, 70)))]
    assert batch["batch_num_images"].tolist() == [2, 1]
    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    with torch.no_grad():
        model(**batch)  # the model agrees with the processor's token counts, pruned
    assert [s.visual_in for s in selection_of(model)] == visual

    out = tmp_path / "run"
    args = ["eval", "--model", str(folder), "--benchmarks", "synthetic", "--limit", "2", "--batch-size", "2",
            "--methods", "none", "fastervlm:keep_ratio=0.25", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = _csv(out / "summary.csv")
    tokens = image_layout(model, (96, 96))  # 96px images: 2x2 crops interpolated by anyres_max_1 + base
    kept = reference_kept(tokens, torch.zeros(5, 16), 0.25, "crop")
    assert float(rows["none"]["visual_tokens_mean"]) == len(tokens)
    assert float(rows["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == len(kept)


def test_a_video_input_is_refused_clearly():
    """Videos are not pruned on this family: a prompt with a video (beside images, or alone) is refused
    rather than run with its video tokens silently unpruned and counted as text; unwrapped it runs."""
    from vtprune.errors import UnsupportedError
    from vtprune.testing import BOS
    from vtprune.testing.llava_onevision import VIDEO_TOKEN

    model = tiny_llava_onevision()
    inputs = onevision_inputs(model)
    n_video = 2 * 2 * 2 + 1  # 2 frames of 4x4 patches pooled to 2x2, one newline
    video = torch.full((2, n_video), VIDEO_TOKEN)
    ids = inputs["input_ids"]
    start = (ids == BOS).int().argmax(-1)  # put the video right after each sample's BOS
    rows = [torch.cat([ids[b, : s + 1], video[b], ids[b, s + 1 :]]) for b, s in enumerate(start.tolist())]
    mask = [torch.cat([inputs["attention_mask"][b, : s + 1], torch.ones(n_video, dtype=torch.long),
                       inputs["attention_mask"][b, s + 1 :]]) for b, s in enumerate(start.tolist())]  # fmt: skip
    batch = dict(inputs, input_ids=torch.stack(rows), attention_mask=torch.stack(mask))
    batch["pixel_values_videos"] = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    video_only = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_sizes")}
    video_only["input_ids"] = batch["input_ids"].masked_fill(
        batch["input_ids"] == model.config.image_token_id, 5
    )
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    for case in (batch, video_only):
        with pytest.raises(UnsupportedError, match="does not prune llava_onevision videos"), torch.no_grad():
            model(**case)
    vtprune.unwrap(model)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
