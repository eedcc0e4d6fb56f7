"""In-LLM baselines ``pdrop`` (PyramidDrop) and ``dart`` (DART): the tokens each keeps against independent,
straightforward implementations of the papers' rules (eager attention maps, explicit keys, per-sample Python
loops), layer resolution for models of any depth, and clear errors. Generate equivalence on every family is
the contract matrix's job (tests/contract/test_matrix.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import alive_per_layer, capture_language_model_inputs, masked_layers_forward

import vtprune
from vtprune import DARTConfig, PDropConfig
from vtprune.errors import UsageError
from vtprune.methods.dart import dart_keep
from vtprune.methods.pdrop import pdrop_keep, resolve_layers
from vtprune.runtime.selection import keep_count
from vtprune.testing import TINY_FAMILIES

LAYERS = 4


def _build(family="llava", attn="eager", layers=LAYERS):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(attn_implementation=attn, text_layers=layers)
    return model, tiny.inputs(model)


def _with_positions(inputs):
    """LLaVA's positions under left padding as generate() gives them (a plain forward would count the
    padding), passed to the wrapped run and to the references alike."""
    mask = inputs["attention_mask"]
    return inputs | {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}


def _lm_inputs(model, inputs):
    return capture_language_model_inputs(model, _with_positions(inputs))


def _run(model, inputs, config):
    """Wrap, run one forward, unwrap; returns the per-layer alive masks (original columns) and selection."""
    vtprune.wrap(model, config)
    with torch.no_grad():
        model(**_with_positions(inputs))
    pruner = vtprune.get_pruner(model)
    batch, seq = inputs["input_ids"].shape
    alive = alive_per_layer(pruner.engine, batch, seq)
    selection = pruner.last
    vtprune.unwrap(model)
    return alive, selection


# ------------------------------------------------------------------------------------------------ PyramidDrop
def _reference_last_attention(model, inputs, alive):
    """Per layer, ``(batch, seq)`` the last query's attention (mean over heads) from eager attention maps of
    the unwrapped model, each layer masked to the tokens the wrapped model kept there."""
    weights = {}
    lm = model.model.language_model
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
        for i, layer in enumerate(lm.layers)
    ]
    lm_inputs = _lm_inputs(model, inputs)
    try:
        masked_layers_forward(
            model, lm_inputs["inputs_embeds"], lm_inputs["attention_mask"], lm_inputs["position_ids"], alive
        )
    finally:
        for h in hooks:
            h.remove()
    return {layer: w.float().mean(1)[:, -1] for layer, w in weights.items()}


@pytest.mark.parametrize("layers,ratio", [([1, 2, 3], 0.5), ([0.5], 0.25), ([1, 3], 0.6)])
def test_pdrop_each_stage_keeps_the_top_of_the_last_tokens_attention(layers, ratio):
    model, inputs = _build()
    alive, selection = _run(model, inputs, {"method": "pdrop", "layers": layers, "ratio": ratio})
    scores = _reference_last_attention(model, inputs, alive)
    visual = inputs["input_ids"] == model.config.image_token_id
    starts = resolve_layers(layers, LAYERS)
    for b, sel in enumerate(selection):
        n = sel.visual_in
        stage = lambda layer: sum(1 for s in starts if s <= layer)  # noqa: E731
        # the paper's counts: stage s keeps ratio ** s of the visual tokens at the LLM input
        assert sel.layer_visual == [keep_count(n, ratio ** stage(layer)) for layer in range(LAYERS)]
        for layer in range(1, LAYERS):
            present = visual[b] & alive[layer - 1][b]
            now = visual[b] & alive[layer][b]
            if layer not in starts:
                assert torch.equal(now, present)
                continue
            k = keep_count(n, ratio ** stage(layer))
            ranked = scores[layer - 1][b].masked_fill(~present, float("-inf"))
            top = set(torch.topk(ranked, k).indices.tolist())
            assert set(torch.nonzero(now).flatten().tolist()) == top, (layer, b)


def test_pdrop_layers_as_indices_or_depth_fractions():
    assert resolve_layers([0.25, 0.5, 0.75], 32) == [8, 16, 24]  # the paper's LLaVA-1.5-7B layers
    assert resolve_layers([0.25, 0.5, 0.75], 4) == [1, 2, 3]
    assert resolve_layers([0.25, 0.5, 0.75], 16) == [4, 8, 12]
    assert resolve_layers([8, 16, 24], 32) == [8, 16, 24]
    assert pdrop_keep([8, 16, 24], 0.5, 32) == [1.0] * 8 + [0.5] * 8 + [0.25] * 8 + [0.125] * 8
    assert PDropConfig() == PDropConfig(layers=[0.25, 0.5, 0.75], ratio=0.5)
    with pytest.raises(UsageError, match=r"resolve to \[1, 1\]"):
        resolve_layers([0.3, 0.35], 4)
    with pytest.raises(UsageError, match=r"within 1\.\.3"):
        resolve_layers([8, 16, 24], 4)
    model, _ = _build(layers=2)
    with pytest.raises(UsageError, match="within 1..1"):
        vtprune.wrap(model, "pdrop", layers=[0.25, 0.5, 0.75])  # 0.25 of 2 layers rounds to layer 1, then 1
    assert not vtprune.is_wrapped(model)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"layers": []}, "non-empty"),
        ({"layers": [1, 0.5]}, "mixes"),
        ({"layers": [0]}, "layer 1 or later"),
        ({"layers": [1.5]}, "strictly between 0 and 1"),
        ({"layers": [2, 2]}, "strictly increasing"),
        ({"ratio": 0.0}, "lambda"),
        ({"layers": "8,16"}, "non-empty list"),
    ],
)
def test_pdrop_bad_configs_are_refused(fields, message):
    with pytest.raises(UsageError, match=message):
        PDropConfig(**fields)


# ------------------------------------------------------------------------------------------------------ DART
def reference_dart(features, key_norm, visual, text, k, pivot_image, pivot_text) -> set[int]:
    """The paper's rule for one sample, written out: K-norm pivots, then each pivot keeps its quota of the
    remaining visual tokens least cosine-similar to it (exactly ``k`` kept, image pivots included)."""
    by_norm = lambda i: (-float(key_norm[i]), i)  # noqa: E731
    image_pivots = sorted(visual, key=by_norm)[: min(pivot_image, k)]
    text_pivots = sorted(text, key=by_norm)[:pivot_text]
    pivots = image_pivots + text_pivots
    rest = k - len(image_pivots)
    quotas = [rest // len(pivots) + (j < rest % len(pivots)) for j in range(len(pivots))]
    kept = set(image_pivots)
    pool = [i for i in visual if i not in kept]
    for pivot, quota in zip(pivots, quotas):
        sims = {i: float(F.cosine_similarity(features[pivot], features[i], dim=0)) for i in pool}
        chosen = sorted(pool, key=lambda i: (sims[i], i))[:quota]
        kept |= set(chosen)
        pool = [i for i in pool if i not in chosen]
    return kept


def test_dart_selection_matches_the_straightforward_rule_on_fixed_inputs():
    g = torch.Generator().manual_seed(0)
    batch, seq, dim = 4, 30, 12
    features = torch.randn(batch, seq, dim, generator=g)
    key_norm = torch.rand(batch, seq, generator=g)
    candidates = torch.zeros(batch, seq, dtype=torch.bool)
    text = torch.zeros(batch, seq, dtype=torch.bool)
    # sample 0: 20 visual tokens, 6 text after; 1: left padding, 12 visual, 2 text; 2: 25 visual, no text after;
    # 3: 16 visual, 5 text, keeps everything
    candidates[0, 2:22], text[0, 22:28] = True, True
    candidates[1, 10:22], text[1, 22:24] = True, True
    candidates[2, 5:30] = True
    candidates[3, 4:20], text[3, 20:25] = True, True
    cases = [(4, 4, [9, 5, 3, 16]), (2, 0, [7, 1, 10, 16]), (0, 3, [5, 4, 6, 16]), (6, 4, [8, 2, 13, 16])]
    for pivot_image, pivot_text, kept in cases:
        got = dart_keep(features, key_norm, candidates, text, kept, pivot_image, pivot_text)
        if pivot_image == 0 and pivot_text == 3:  # sample 2 has no text pivot and no image pivot: skip it
            kept = kept[:2] + [0] + kept[3:]
            got = dart_keep(features, key_norm, candidates, text, kept, pivot_image, pivot_text)
        for b in range(batch):
            visual = torch.nonzero(candidates[b]).flatten().tolist()
            texts = torch.nonzero(text[b]).flatten().tolist()
            want = (
                reference_dart(features[b], key_norm[b], visual, texts, kept[b], pivot_image, pivot_text)
                if kept[b]
                else set()
            )
            assert set(torch.nonzero(got[b]).flatten().tolist()) == want, (pivot_image, pivot_text, b)
            assert len(want) == kept[b]


def _reference_keys_and_states(model, inputs, layer):
    """Layer ``layer``'s post-rotary key L1 norms (explicit k_proj + RoPE) and its output through the final
    norm, from the unwrapped model run on every token."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    seen = {}

    def grab_input(module, args, kwargs):
        seen["in"] = (kwargs.get("hidden_states", args[0] if args else None), kwargs["position_embeddings"])

    def grab_output(module, args, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    attn = lm.layers[layer].self_attn
    hooks = [
        attn.register_forward_pre_hook(grab_input, with_kwargs=True),
        lm.layers[layer].register_forward_hook(grab_output),
    ]
    lm_inputs = _lm_inputs(model, inputs)
    batch, seq = lm_inputs["attention_mask"].shape
    alive = [torch.ones(batch, seq, dtype=torch.bool)] * LAYERS
    try:
        masked_layers_forward(
            model, lm_inputs["inputs_embeds"], lm_inputs["attention_mask"], lm_inputs["position_ids"], alive
        )
    finally:
        for h in hooks:
            h.remove()
    hidden, (cos, sin) = seen["in"]
    with torch.no_grad():
        k = attn.k_proj(hidden).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        states = lm.norm(seen["out"])
    return k.abs().sum(dim=(1, 3)), states


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layer,ratio,pivots", [(2, 0.3, (2, 2)), (1, 0.5, (4, 4)), (3, 0.1, (1, 0))])
def test_dart_keeps_what_the_papers_rule_keeps_on_the_model(attn, layer, ratio, pivots):
    model, inputs = _build(attn=attn)
    config = {"method": "dart", "layer": layer, "keep_ratio": ratio}
    config |= {"pivot_image": pivots[0], "pivot_text": pivots[1]}
    alive, selection = _run(model, inputs, config)
    key_norm, states = _reference_keys_and_states(model, inputs, layer - 1)
    visual_mask = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    seq = visual_mask.shape[1]
    for b, sel in enumerate(selection):
        k = keep_count(sel.visual_in, ratio)
        assert sel.layer_visual == [sel.visual_in] * layer + [k] * (LAYERS - layer)
        visual = torch.nonzero(visual_mask[b]).flatten().tolist()
        text = [i for i in range(max(visual) + 1, seq) if real[b, i]]
        want = reference_dart(states[b], key_norm[b], visual, text, k, *pivots)
        got = set(torch.nonzero(visual_mask[b] & alive[layer][b]).flatten().tolist())
        assert got == want, b
        assert all(alive[i][b].all() or i >= layer for i in range(LAYERS))  # nothing left before layer K


def test_dart_reads_no_attention_map_and_refuses_bad_configs():
    model, _ = _build(attn="sdpa")
    vtprune.wrap(model, "dart")
    pruner = vtprune.get_pruner(model)
    assert set(pruner.text_probes) == {1} and pruner.text_probes[1].statistic == "key_l1"
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    vtprune.unwrap(model)
    assert DARTConfig() == DARTConfig(layer=2, keep_ratio=0.222, pivot_image=4, pivot_text=4)
    assert keep_count(576, DARTConfig().keep_ratio) == 128  # the paper's 0.778 reduction
    for fields, message in [
        ({"layer": 0}, "K"),
        ({"keep_ratio": 0}, "keep_ratio"),
        ({"pivot_image": 0, "pivot_text": 0}, "at least one pivot"),
        ({"pivot_text": -1}, "pivot_text"),
    ]:
        with pytest.raises(UsageError, match=message):
            DARTConfig(**fields)
    with pytest.raises(UsageError, match="below the 4 decoder layers"):
        vtprune.wrap(model, "dart", layer=4)
    assert not vtprune.is_wrapped(model)
