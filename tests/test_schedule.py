"""The ``schedule`` method (G-Search / P-Sigmoid schedules): generate equivalence on every family, the tokens
each drop keeps against an independent eager-attention reference, per-layer counts, probes only where the
count falls, and clear errors for bad schedules."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    alive_per_layer,
    capture_language_model_inputs,
    greedy_masked_no_cache,
    greedy_with_logits,
    masked_layers_forward,
)

import vtprune
from vtprune import ScheduleConfig
from vtprune.errors import UsageError
from vtprune.methods.schedule import layer_counts
from vtprune.testing import TINY_FAMILIES

LAYERS = 4
# (rank, reuse_order, keep): every variant drops after layers 0, 1 and 2. The default (text, every drop) runs
# on every family x attention x cache in tests/contract/test_matrix.py; these are the other options.
VARIANTS = {
    "text-reuse": ("text", True, [1.0, 0.75, 0.5, 0.25]),
    "last-every": ("last", False, [1.0, 0.6, 0.6, 0.2]),
    "last-reuse-exit": ("last", True, [1.0, 0.5, 0.25, 0.0]),
}
SETTINGS = [("sdpa", "dynamic"), ("eager", "static"), ("sdpa", "static"), ("eager", "dynamic")]


def _build(family, attn="sdpa"):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(attn_implementation=attn, text_layers=LAYERS)
    return model, tiny.inputs(model)


def _lm_inputs(model, inputs):
    if "mm_token_type_ids" not in inputs:  # LLaVA: the positions the unwrapped model uses, explicitly
        mask = inputs["attention_mask"]
        inputs = inputs | {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}
    return capture_language_model_inputs(model, inputs)


# Each family once (variants and attention x cache settings cycle), then LLaVA with the variants it missed: the
# plan's options are family-independent; the engine on every family x setting is the contract matrix's job.
_FAMILY_CASES = [
    (family, list(VARIANTS)[i % len(VARIANTS)], *SETTINGS[i % len(SETTINGS)])
    for i, family in enumerate(TINY_FAMILIES)
]
CASES = _FAMILY_CASES + [
    ("llava", variant, *SETTINGS[(j + 1) % len(SETTINGS)])
    for j, variant in enumerate(VARIANTS)
    if ("llava", variant) not in {(c[0], c[1]) for c in _FAMILY_CASES}
]


@pytest.mark.parametrize("family,variant,attn,cache", CASES)
def test_generate_equals_masked_recomputation(family, variant, attn, cache):
    rank, reuse, keep = VARIANTS[variant]
    model, inputs = _build(family, attn)
    steps = 4
    vtprune.wrap(model, "schedule", keep=keep, rank=rank, reuse_order=reuse)
    pruner = vtprune.get_pruner(model)
    out = greedy_with_logits(model, inputs, steps, cache)
    engine, selection = pruner.engine, pruner.last
    batch, seq = inputs["input_ids"].shape
    alive = alive_per_layer(engine, batch, seq)
    vtprune.unwrap(model)
    ref_tokens, ref_logits = greedy_masked_no_cache(model, _lm_inputs(model, inputs), alive, steps)
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    for sel in selection:  # each layer processed what the schedule says (ratios of this sample's tokens)
        assert sel.layer_visual == layer_counts(keep, "ratio", sel.visual_in)


def _reference_scores(model, inputs, alive, rank):
    """Per layer ``(batch, seq)`` ranking scores from eager attention maps of the unwrapped model, each layer
    masked to the tokens the wrapped model kept there (an implementation independent of the probe)."""
    lm = model.model.language_model
    weights = {}
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
    visual = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    seq = visual.shape[1]
    last_visual = torch.where(visual, torch.arange(seq), -1).amax(-1, keepdim=True)
    text_rows = (torch.arange(seq)[None] > last_visual) & real  # the queries after the image
    scores = {}
    for layer, w in weights.items():
        probs = w.float().mean(1)  # (batch, queries, keys)
        if rank == "last":
            scores[layer] = probs[:, -1]
        else:
            rows = text_rows.float()
            scores[layer] = (probs * rows[:, :, None]).sum(1) / rows.sum(-1, keepdim=True)
    return scores, visual


@pytest.mark.parametrize(
    "family,rank,reuse",
    [("llava", "text", False), ("llava", "last", False), ("llava", "text", True), ("qwen2_vl", "text", True)],
)
def test_each_drop_keeps_the_top_tokens_of_the_reference_attention(family, rank, reuse):
    model, inputs = _build(family, "eager")
    keep = [1.0, 0.75, 0.5, 0.25]
    vtprune.wrap(model, "schedule", keep=keep, rank=rank, reuse_order=reuse)
    with torch.no_grad():
        model(**inputs)
    engine = vtprune.get_pruner(model).engine
    batch, seq = inputs["input_ids"].shape
    alive = alive_per_layer(engine, batch, seq)
    vtprune.unwrap(model)
    scores, visual = _reference_scores(model, inputs, alive, rank)
    for layer in range(LAYERS - 1):
        source = 0 if reuse else layer  # reuse_order ranks once, at the first drop (after layer 0)
        for b in range(batch):
            present = visual[b] & alive[layer][b]
            k = int((visual[b] & alive[layer + 1][b]).sum())
            s = scores[source][b].masked_fill(~present, float("-inf"))
            top = set(torch.topk(s, k).indices.tolist())
            kept = set(torch.nonzero(visual[b] & alive[layer + 1][b]).flatten().tolist())
            assert kept == top, (layer, b)


def test_probes_only_where_a_ranked_drop_happens_and_a_full_schedule_changes_nothing():
    model, inputs = _build("llava")
    with torch.no_grad():
        ref = model(**inputs).logits
    vtprune.wrap(model, "schedule", keep=[1.0, 1.0, 0.5, 0.5])
    assert set(vtprune.get_pruner(model).text_probes) == {1}
    vtprune.unwrap(model)
    vtprune.wrap(model, "schedule", keep=[1.0, 0.5, 0.25, 0.0], reuse_order=True)
    assert set(vtprune.get_pruner(model).text_probes) == {0}  # one ranking; the exit to 0 needs none
    vtprune.unwrap(model)
    vtprune.wrap(model, "schedule", keep=[1.0] * LAYERS)
    assert vtprune.get_pruner(model).text_probes == {}
    with torch.no_grad():
        out = model(**inputs).logits
    assert vtprune.get_pruner(model).last[0].layer_visual == [16] * LAYERS
    vtprune.unwrap(model)
    assert torch.equal(out, ref)


def test_dropping_everything_equals_static_exit_and_counts_work():
    model, inputs = _build("llava")
    with torch.no_grad():
        vtprune.wrap(model, "static_exit", layer=2)
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        vtprune.unwrap(model)
        vtprune.wrap(model, "schedule", keep=[16, 16, 0, 0], unit="count")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        vtprune.unwrap(model)
        vtprune.wrap(model, "schedule", keep=[20, 12, 5, 5], unit="count")
        model(**inputs)
        counts = [s.layer_visual for s in vtprune.get_pruner(model).last]
        vtprune.unwrap(model)
    assert torch.equal(out, ref)
    assert counts == [[16, 12, 5, 5]] * 2


def test_a_count_schedule_below_the_input_is_refused_at_prefill():
    model, inputs = _build("qwen2_vl")  # 16 and 24 visual tokens
    vtprune.wrap(model, "schedule", keep=[20, 10, 10, 5], unit="count")
    with pytest.raises(UsageError, match="keep\\[0\\] must be at least"), torch.no_grad():
        model(**inputs)
    vtprune.unwrap(model)
    with torch.no_grad():
        model(**inputs)  # the model is left usable


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"keep": [1.0, 0.5, 0.75, 0.25]}, "must not increase"),
        ({"keep": [1.0, 1.5, 0.5, 0.25]}, "must be in \\[0, 1\\]"),
        ({"keep": [1.0, 0.5, -0.1, 0.0]}, "must be in \\[0, 1\\]"),
        ({"keep": [0.5, 0.5, 0.5, 0.5]}, "keep\\[0\\] must be 1.0"),
        ({"keep": [16, 8, 4.5, 2], "unit": "count"}, "token count"),
        ({"keep": [16, 8, -1, 0], "unit": "count"}, "token count"),
        ({"keep": "1,0.5"}, "non-empty list"),
        ({"keep": []}, "non-empty list"),
        ({"keep": [1.0, 0.5], "unit": "percent"}, "unit must be one of"),
        ({"keep": [1.0, 0.5], "rank": "all"}, "rank must be one of"),
        ({"keep": [1.0, 0.5], "reuse_order": "yes"}, "reuse_order"),
        ({"keep": [1.0, 0.5], "path": "s.json"}, "not both"),
        ({"path": "/no/such/schedule.json"}, "does not exist"),
    ],
)
def test_bad_schedules_are_refused_with_a_clear_message(fields, message):
    with pytest.raises(UsageError, match=message):
        ScheduleConfig(**fields)


def test_wrong_length_is_refused_at_wrap_and_nothing_is_patched():
    model, _ = _build("llava")
    with pytest.raises(UsageError, match="5 entries but the model has 4 decoder layers"):
        vtprune.wrap(model, "schedule", keep=[1.0, 1.0, 0.5, 0.5, 0.25])
    with pytest.raises(UsageError, match="needs keep="):
        vtprune.wrap(model, "schedule")
    assert not vtprune.is_wrapped(model)


def test_schedule_files_round_trip_and_explicit_fields_override_them(tmp_path):
    path = tmp_path / "schedule.json"
    config = ScheduleConfig(keep=[16, 12, 6, 6], unit="count", rank="last", reuse_order=True)
    config.to_json(path)
    from_file = ScheduleConfig(path=str(path))
    assert from_file.resolved() == config.resolved()
    assert ScheduleConfig(path=str(path), rank="text").resolved()["rank"] == "text"
    assert vtprune.PruneConfig.from_json(from_file.to_json()) == from_file
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        ScheduleConfig(path=str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"method": "fastv", "keep": [1.0]}))
    with pytest.raises(UsageError, match="not a schedule"):
        ScheduleConfig(path=str(tmp_path / "other.json"))
    (tmp_path / "up.json").write_text(json.dumps({"keep": [1.0, 0.5, 1.0]}))
    with pytest.raises(UsageError, match="up.json.*must not increase"):
        ScheduleConfig(path=str(tmp_path / "up.json"))
    model, inputs = _build("llava")
    vtprune.wrap(model, "schedule", path=str(path))
    with torch.no_grad():
        model(**inputs)
    assert vtprune.get_pruner(model).last[0].layer_visual == [16, 12, 6, 6]
    vtprune.unwrap(model)
