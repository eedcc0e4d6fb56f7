"""FasterVLM on LLaVA and Qwen-VL: the pruned model equals the model fed only the kept tokens."""

import pytest
import torch
from helpers import full_positions, greedy_no_cache, greedy_with_logits, kept_reference_inputs, selection_of

import vtprune
from vtprune.testing import llava_inputs, qwen_vl_inputs, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl

FAMILIES = {
    "llava": (tiny_llava, llava_inputs, True),
    "qwen2_vl": (lambda **kw: tiny_qwen2_vl(**kw), qwen_vl_inputs, False),
    "qwen2_5_vl": (lambda **kw: tiny_qwen2_5_vl(**kw), qwen_vl_inputs, False),
}


def build(family, attn="sdpa"):
    make_model, make_inputs, contiguous = FAMILIES[family]
    model = make_model(attn_implementation=attn)
    return model, make_inputs(model), contiguous


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_pruned_forward_equals_model_fed_only_kept_tokens(family, ratio):
    model, inputs, contiguous = build(family)
    vtprune.wrap(model, "fastervlm", keep_ratio=ratio)
    with torch.no_grad():
        pruned = model(**inputs, position_ids=None).logits
    selection = selection_of(model)
    vtprune.unwrap(model)
    ref_inputs = kept_reference_inputs(model, inputs, selection, contiguous)
    with torch.no_grad():
        ref = model(**ref_inputs).logits
    assert pruned.shape == ref.shape
    real = ref_inputs["attention_mask"].bool()
    torch.testing.assert_close(pruned[real], ref[real], atol=2e-5, rtol=1e-4)
    for sel in selection:
        assert sel.visual_out == max(1, int(sel.visual_in * ratio + 0.5))
        assert sel.tokens_in - sel.tokens_out == sel.visual_in - sel.visual_out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_ratio_one_equals_unwrapped(family):
    model, inputs, _ = build(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.wrap(model, "fastervlm", keep_ratio=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_unwrap_restores_bit_identical_logits_and_leaves_no_patch(family, method):
    model, inputs, _ = build(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # Snapshot after a first run: transformers installs its own output-capturing hooks lazily.
    before_dicts = {name: set(mod.__dict__) for name, mod in model.named_modules()}
    configs = {name: mod.config for name, mod in model.named_modules() if "config" in mod.__dict__}
    hooks = {
        name: (len(mod._forward_hooks), len(mod._forward_pre_hooks)) for name, mod in model.named_modules()
    }
    with torch.no_grad():
        vtprune.wrap(model, method, keep_ratio=0.3)
        model(**inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        vtprune.unwrap(model)
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert not vtprune.is_wrapped(model)
    for name, mod in model.named_modules():
        assert set(mod.__dict__) == before_dicts[name], name
        if name in configs:
            assert mod.config is configs[name]
        assert (len(mod._forward_hooks), len(mod._forward_pre_hooks)) == hooks[name], name
        if hasattr(mod, "config"):
            assert mod.config._attn_implementation != "vtprune_probe", name


def test_kept_indices_match_eager_cls_attention_reference():
    model = tiny_llava(attn_implementation="sdpa")
    eager = tiny_llava(attn_implementation="eager")  # same seed, same weights
    inputs = llava_inputs(model)
    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    with torch.no_grad():
        model(**inputs)
        tower = eager.model.vision_tower
        attn = tower(inputs["pixel_values"], output_attentions=True).attentions
    layer = len(attn) - 2  # LLaVA reads features from hidden_states[-2]: the output of layer n-2
    cls_to_patch = attn[layer][:, :, 0, 1:].mean(1)
    for sel, scores in zip(selection_of(model), cls_to_patch):
        k = sel.visual_out
        assert k == 4  # 16 patches * 0.25
        expected = torch.sort(torch.topk(scores, k).indices).values
        assert torch.equal(sel.kept_visual, expected)


def test_qwen2_vl_received_attention_matches_manual_reference():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    model = tiny_qwen2_vl()
    inputs = qwen_vl_inputs(model)
    captured = {}
    block = model.model.visual.blocks[-1].attn

    def grab(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], **kwargs)

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    h = captured["hidden"]
    q, k, _ = block.qkv(h).reshape(h.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])
    cu = captured["cu_seqlens"].tolist()
    for b, sel in enumerate(selection_of(model)):
        qi, ki = q[cu[b] : cu[b + 1]].transpose(0, 1), k[cu[b] : cu[b + 1]].transpose(0, 1)
        attn = (qi @ ki.transpose(-1, -2) * block.scaling).softmax(-1)  # (heads, n, n)
        received = attn.mean(0).mean(0).view(-1, 4).mean(-1)
        expected = torch.sort(torch.topk(received, sel.visual_out).indices).values
        assert torch.equal(sel.kept_visual, expected)


def test_qwen2_5_vl_scores_follow_raw_token_order():
    """Window order inside the ViT must map back to the row-major order of the LLM's visual tokens."""
    model = tiny_qwen2_5_vl()
    inputs = qwen_vl_inputs(model, grids=((1, 8, 12),), text_lengths=(4,))
    visual = model.model.visual
    window_out = {}
    handle = visual.merger.register_forward_hook(lambda m, a, out: window_out.setdefault("x", out))
    vtprune.wrap(model, "fastervlm", keep_ratio=0.5)
    with torch.no_grad():
        raw = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[
            0
        ]
    handle.remove()
    score = raw._vtprune_score
    # The integration's mapping must agree with the ViT's own reordering of the merged features.
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(
        inputs["image_grid_thw"], visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    assert not torch.equal(window_index, torch.arange(len(window_index)))  # the test needs real windows
    torch.testing.assert_close(raw[window_index], window_out["x"])
    assert score.shape == (raw.shape[0],)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_equals_no_cache_recomputation_on_kept_tokens(family, attn, cache):
    model, inputs, contiguous = build(family, attn)
    steps = 5
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    out = greedy_with_logits(model, inputs, steps, cache)
    selection = selection_of(model)
    vtprune.unwrap(model)
    ref_tokens, ref_logits = greedy_no_cache(
        model, kept_reference_inputs(model, inputs, selection, contiguous), steps
    )
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)


def test_full_positions_helper_is_consistent():
    model = tiny_qwen2_vl()
    inputs = qwen_vl_inputs(model)
    assert full_positions(model, inputs).shape[0] == 3
