"""In-LLM token dropping (FastV, static visual-token exit): generate equals a masked no-cache recomputation."""

import pytest
import torch
from helpers import alive_per_layer, capture_language_model_inputs, greedy_masked_no_cache, greedy_with_logits

import vtprune
from vtprune.testing import llava_inputs, qwen_vl_inputs, tiny_llava, tiny_qwen2_vl

FAMILIES = {
    "llava": (lambda **kw: tiny_llava(text_layers=4, **kw), llava_inputs),
    "qwen2_vl": (lambda **kw: tiny_qwen2_vl(text_layers=4, **kw), qwen_vl_inputs),
}
METHODS = {
    "fastv": dict(method="fastv", layer=2, keep_ratio=0.3),
    "static_exit": dict(method="static_exit", layer=2),
}


def _positions_for(model, inputs):
    mask = inputs["attention_mask"]
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_equals_masked_recomputation(family, method, attn, cache):
    make_model, make_inputs = FAMILIES[family]
    model = make_model(attn_implementation=attn)
    inputs = make_inputs(model)
    steps = 4
    vtprune.wrap(model, dict(METHODS[method]))
    out = greedy_with_logits(model, inputs, steps, cache)
    pruner = vtprune.get_pruner(model)
    engine, selection = pruner.engine, pruner.last
    batch, seq = inputs["input_ids"].shape
    alive = alive_per_layer(engine, batch, seq)
    vtprune.unwrap(model)
    if "mm_token_type_ids" not in inputs:
        inputs = inputs | {"position_ids": _positions_for(model, inputs)}
    lm_inputs = capture_language_model_inputs(model, inputs)
    ref_tokens, ref_logits = greedy_masked_no_cache(model, lm_inputs, alive, steps)
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    # The token sets really shrink after layer 2 and per-layer counts are reported.
    for sel in selection:
        assert sel.layer_visual[0] == sel.layer_visual[1] == sel.visual_in
        expected = 0 if method == "static_exit" else max(1, int(sel.visual_in * 0.3 + 0.5))
        assert sel.layer_visual[2:] == [expected] * 2


def test_beam_search_runs_and_matches_unpruned_when_nothing_is_dropped():
    model = tiny_llava(text_layers=4)
    inputs = llava_inputs(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
        vtprune.wrap(model, "fastv", layer=2, keep_ratio=1.0)
        out = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
        vtprune.unwrap(model)
        vtprune.wrap(model, "static_exit", layer=1)
        exit_out = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert torch.equal(out, ref)
    assert exit_out.shape == ref.shape


def test_layer_methods_validate():
    model = tiny_llava(text_layers=4)
    with pytest.raises(ValueError, match="below the 4 decoder layers"):
        vtprune.wrap(model, "static_exit", layer=4)
    with pytest.raises(ValueError, match="K"):
        vtprune.wrap(model, "fastv", layer=0)
    assert not vtprune.is_wrapped(model)
