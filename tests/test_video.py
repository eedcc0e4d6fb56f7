"""Videos on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: every method prunes video tokens (mixed image + video
batches, left padding, videos of different lengths), against an independent no-cache reference; the budget
unit (per frame, or per video with a per-frame floor); per-frame received-attention scores; original
temporal M-RoPE positions."""

from __future__ import annotations

import pytest
import torch
from contract.test_matrix import METHOD_CASES
from helpers import alive_per_layer, capture_language_model_inputs, greedy_masked_no_cache, greedy_with_logits
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.runtime.selection import frame_floor, keep_count, top_k_indices
from vtprune.testing import TINY_FAMILIES
from vtprune.testing.qwen2_vl import qwen_vl_media_inputs

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TEXT_LAYERS = 4
# sample 0: a 3-frame video; sample 1: an image then a 2-frame video of another size (left-padded)
SAMPLES = ((("video", (3, 8, 8)),), (("image", (1, 8, 12)), ("video", (2, 8, 12))))


def _build(family, attn="sdpa"):
    model = TINY_FAMILIES[family].build(attn_implementation=attn, text_layers=TEXT_LAYERS)
    return model, qwen_vl_media_inputs(model, SAMPLES, text_lengths=(4, 7))


def _positions(model, inputs):
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    return pos


def _encode(model, inputs):
    """Per kind, the unwrapped model's features per unit (images / videos in their own placeholder order)
    and deepstack features per level per unit (Qwen3-VL), or None."""
    out = {}
    with torch.no_grad():
        for kind, fn, px, grid in (
            ("image", model.model.get_image_features, "pixel_values", "image_grid_thw"),
            ("video", model.model.get_video_features, "pixel_values_videos", "video_grid_thw"),
        ):
            if px not in inputs:
                out[kind] = ([], None)
                continue
            enc = fn(inputs[px], inputs[grid], return_dict=True)
            deep = getattr(enc, "deepstack_features", None)
            out[kind] = (list(enc.pooler_output), None if deep is None else [list(d) for d in deep])
    return out


def _union_tokens(model, inputs, encoded):
    """Per sample, its visual tokens in prompt order as ``(kind, unit, row)``, and the units in union
    placeholder order as ``(kind, unit)``."""
    ids = inputs["input_ids"]
    token = {"image": model.config.image_token_id, "video": model.config.video_token_id}
    cursor = {k: [0, 0] for k in token}  # unit, row within unit
    per_sample, units = [], []
    for b in range(ids.shape[0]):
        tokens = []
        for col in range(ids.shape[1]):
            kind = next((k for k, t in token.items() if int(ids[b, col]) == t), None)
            if kind is None:
                continue
            unit, row = cursor[kind]
            if row == 0:
                units.append((kind, unit))
            tokens.append((kind, unit, row))
            row += 1
            if row == encoded[kind][0][unit].shape[0]:
                unit, row = unit + 1, 0
            cursor[kind] = [unit, row]
        per_sample.append(tokens)
    return per_sample, units


def _reference(model, inputs, selection, engine, steps, rows=None):
    """Greedy tokens and logits of the unwrapped model fed only the kept tokens (original positions, the
    kept rows of each image and video, their deepstack rows), each layer masked to the tokens the method
    kept at that layer; no cache. ``rows``: per sample, a transform's new rows of its kept visual tokens."""
    encoded = _encode(model, inputs)
    per_sample, _ = _union_tokens(model, inputs, encoded)
    positions = _positions(model, inputs)
    batch = inputs["input_ids"].shape[0]
    width = max(len(s.kept_columns) for s in selection)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    pos = torch.zeros(positions.shape[0], batch, width, dtype=torch.long)
    kept = {"image": [], "video": []}
    deep = {"image": [], "video": []}
    for b, sel in enumerate(selection):
        cols = sel.kept_columns
        n = len(cols)
        ids[b, width - n :] = inputs["input_ids"][b, cols]
        mask[b, width - n :] = 1
        pos[:, b, width - n :] = positions[:, b, cols]
        for j, v in enumerate(sel.kept_visual.tolist()):
            kind, unit, row = per_sample[b][v]
            feats, levels = encoded[kind]
            kept[kind].append(feats[unit][row] if rows is None else rows[b][j])
            if levels is not None:
                deep[kind].append(torch.stack([lv[unit][row] for lv in levels]))
    mm = {}
    for kind in ("image", "video"):
        if not kept[kind]:
            continue
        pooled = [torch.stack(kept[kind])]
        if deep[kind]:
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            levels = torch.stack(deep[kind]).unbind(1)
            mm[kind] = BaseModelOutputWithDeepstackFeatures(
                pooler_output=pooled, deepstack_features=[[lv] for lv in levels]
            )
        else:
            mm[kind] = BaseModelOutputWithPooling(pooler_output=pooled)
    ref = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "mm_encoder_outputs": mm}
    seq = ids.shape[1]
    alive = alive_per_layer(engine, batch, seq) if engine is not None else [None] * TEXT_LAYERS
    alive = [a if a is not None else torch.ones(batch, seq, dtype=torch.bool) for a in alive]
    return greedy_masked_no_cache(model, capture_language_model_inputs(model, ref), alive, steps)


def _record_transform(pruner) -> list:
    """Record what the wrapped method's transform returns per prefill (per unit ``(positions, rows)``)."""
    calls = []
    inner = pruner.parts.transform
    if inner is None:
        return calls

    def recording(units):
        out = inner(units)
        calls.append(out)
        return out

    pruner.parts.transform = recording
    return calls


def _recorded_rows_per_sample(calls, model, inputs, selection):
    """Per sample, the rows the latest prefill's transform wrote (units in union placeholder order)."""
    if not calls:
        return None
    new = torch.cat([rows for _, rows in calls[-1]])
    return list(new.split([s.visual_out for s in selection]))


@pytest.mark.parametrize(("attn", "cache"), [("sdpa", "dynamic"), ("eager", "static")])
@pytest.mark.parametrize("method", list(METHOD_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_images_and_videos_equals_no_cache_reference(family, method, attn, cache, tmp_path):
    model, inputs = _build(family, attn)
    config = METHOD_CASES[method][0](model, tmp_path)
    steps = 3
    vtprune.wrap(model, config)
    pruner = vtprune.get_pruner(model)
    # a transform's new rows are recorded and placed by the reference (their values are each method's own
    # tests' business; here: where they land, with which positions and deepstack rows)
    calls = _record_transform(pruner)
    out = greedy_with_logits(model, inputs, steps, cache)
    selection, engine = pruner.last, pruner.engine
    vtprune.unwrap(model)
    rows = _recorded_rows_per_sample(calls, model, inputs, selection)
    ref_tokens, ref_logits = _reference(model, inputs, selection, engine, steps, rows)
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    counts = (inputs["input_ids"] == model.config.video_token_id).sum(-1)
    counts += (inputs["input_ids"] == model.config.image_token_id).sum(-1)
    assert [s.visual_in for s in selection] == counts.tolist()  # video tokens count as visual tokens
    for sel in selection:
        assert sel.layer_visual[0] == sel.visual_out <= sel.visual_in
        assert sel.tokens_in - sel.tokens_out == sel.visual_in - sel.visual_out


@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_after_video_is_bit_identical(family):
    model, inputs = _build(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        vtprune.unwrap(model)
        assert torch.equal(model(**inputs).logits, ref)


def _video_scores(model, inputs):
    """The FasterVLM scores the wrap attached to each video's features: ``(n,)`` per video."""
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return [f._vtprune_score for f in out.pooler_output]


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_per_frame_and_per_video_with_a_floor(family):
    model, inputs = _build(family)
    ratio = 0.1
    merge = model.config.vision_config.spatial_merge_size**2
    video_token = model.config.video_token_id
    ids = inputs["input_ids"]
    results = {}
    for budget in ("frame", "image"):
        vtprune.wrap(model, "fastervlm", keep_ratio=ratio, budget=budget)
        with torch.no_grad():
            model(**inputs)
            scores = _video_scores(model, inputs)
        selection = vtprune.get_pruner(model).last
        vtprune.unwrap(model)
        results[budget] = selection
        video = 0
        for b, sel in enumerate(selection):
            kinds = ids[b][(ids[b] == video_token) | (ids[b] == model.config.image_token_id)]
            is_video = kinds == video_token
            kept = sel.kept_visual[is_video[sel.kept_visual]]
            first = int(is_video.nonzero()[0])  # the sample's one video comes after its images
            t, h, w = inputs["video_grid_thw"][video].tolist()
            per_frame = h * w // merge
            frame_of = (kept - first) // per_frame
            score = scores[video]
            if budget == "frame":  # keep(n) of every frame, its top scores
                expected = []
                for f in range(t):
                    s = score[f * per_frame : (f + 1) * per_frame]
                    top = torch.sort(torch.topk(s, keep_count(per_frame, ratio)).indices).values
                    expected.append(top + f * per_frame)
                assert torch.equal(kept - first, torch.cat(expected))
            else:  # keep(n) of the whole video; every frame keeps its best token
                k = keep_count(t * per_frame, ratio)
                assert len(kept) == k and set(frame_of.tolist()) == set(range(t))
                best = [
                    int(score[f * per_frame : (f + 1) * per_frame].argmax()) + f * per_frame for f in range(t)
                ]
                rest = [
                    i for i in torch.argsort(score, descending=True, stable=True).tolist() if i not in best
                ]
                expected = sorted(best + rest[: k - t])
                assert (kept - first).tolist() == expected
            video += 1
    assert [s.visual_out for s in results["frame"]] != [s.visual_out for s in results["image"]]


def test_frame_floor_against_a_loop():
    g = torch.Generator().manual_seed(1)
    frames = torch.arange(4).repeat_interleave(5)
    scores = torch.randn(20, generator=g)
    scores[7] = scores[6]  # a tie inside frame 1
    lifted = frame_floor(scores, frames)
    for k in range(1, 21):
        top = set(top_k_indices(lifted, k).tolist())  # the engine's stable top-k (ties: lower index)
        best = {int(frames.eq(f).nonzero()[scores[frames == f].argmax()]) for f in range(4)}
        if k >= 4:
            assert best <= top
        rest = sorted(set(range(20)) - best, key=lambda i: (-float(scores[i]), i))
        expected = sorted(best, key=lambda i: -float(scores[i]))[:k] + rest[: max(0, k - 4)]
        assert top == set(expected), k
    assert frame_floor(scores, None) is scores


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_video_scores_are_received_attention_within_each_frame(family):
    """Per-frame received attention at the last full-attention ViT block: each frame is its own attention
    segment, so a token's score is the mean attention it receives from its own frame's patches."""
    model, inputs = _build(family)
    block = model.model.visual.blocks[-1].attn
    captured = {}

    def grab(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], **kwargs)

    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        scores = _video_scores(model, inputs)
    handle.remove()
    vtprune.unwrap(model)
    module = __import__(type(block).__module__, fromlist=["apply_rotary_pos_emb_vision"])
    h = captured["hidden"]
    q, k, _ = block.qkv(h).reshape(h.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = module.apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])
    cu = captured["cu_seqlens"].tolist()
    frames = []
    for i in range(len(cu) - 1):
        qi, ki = q[cu[i] : cu[i + 1]].transpose(0, 1), k[cu[i] : cu[i + 1]].transpose(0, 1)
        scale = block.scaling if hasattr(block, "scaling") else qi.shape[-1] ** -0.5
        attn = (qi @ ki.transpose(-1, -2) * scale).softmax(-1)
        frames.append(attn.mean(0).mean(0).view(-1, 4).mean(-1))
    torch.testing.assert_close(torch.cat(scores).float(), torch.cat(frames), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_video_tokens_keep_their_temporal_positions(family):
    model, inputs = _build(family)
    full = _positions(model, inputs)
    lm = model.model.language_model
    seen = {}
    vtprune.wrap(model, "fastervlm", keep_ratio=0.2)
    handle = lm.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(pe=kw["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    selection = vtprune.get_pruner(model).last
    vtprune.unwrap(model)
    for b, sel in enumerate(selection):
        pos = full[:, b : b + 1, sel.kept_columns]
        cos, _ = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        n = len(sel.kept_columns)
        torch.testing.assert_close(seen["pe"][0][b, -n:], cos[0], rtol=0, atol=0)
        # the kept video tokens span several temporal positions (frames), not one
        assert len(set(full[0, b, sel.kept_columns].tolist())) > 2


def test_prefill_speedups_count_video_tokens():
    from vtprune.speed import prefill_speedups

    model, _ = _build("qwen3_vl")
    first = qwen_vl_media_inputs(model, SAMPLES[:1], text_lengths=(4,))
    rows = prefill_speedups(model, first, [{"method": "fastervlm", "keep_ratio": 0.25}], repeats=1)
    n_video = int((first["input_ids"][0] == model.config.video_token_id).sum())
    assert rows[0].visual_tokens == n_video == 48
    assert rows[1].visual_tokens == 3 * keep_count(16, 0.25)  # per frame
    assert rows[1].flops < rows[0].flops and rows[0].encoder["flops_share"] > 0
