"""The contract every method keeps on every family, generated from the registries.

For each registered family (``vtprune.testing.TINY_FAMILIES``) x each registered method (``METHOD_CASES``
must name every method in ``vtprune.available_methods()``):

* generate() (dynamic and static cache, SDPA and eager) equals an independent no-cache recomputation: the
  unwrapped model fed only the tokens kept before the LLM, with each decoder layer masked to the tokens the
  method kept at that layer;
* unwrap restores bit-identical logits and generations and leaves no attribute, config, hook or probe;
* a bad option is refused with a UsageError before anything is patched.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import (
    alive_per_layer,
    capture_language_model_inputs,
    greedy_masked_no_cache,
    greedy_with_logits,
    image_features_per_sample,
    kept_reference_inputs,
    reference_grids,
    reference_pool,
)

import vtprune
from vtprune.errors import UsageError
from vtprune.methods.dyvte import ExitGates
from vtprune.testing import TINY_FAMILIES

TEXT_LAYERS = 4


def _dyvte(model, tmp_path):
    torch.manual_seed(1)
    gates = ExitGates(model.config.get_text_config().hidden_size, TEXT_LAYERS)
    folder = gates.save(tmp_path / "gates")
    return {"method": "dyvte", "gates": str(folder), "threshold": 0.3}


def _crosslmm(model, tmp_path):
    """Untrained adapters (gates at 0, so the no-cache reference is pooling's; tests/test_crosslmm.py
    checks trained ones against a no-cache recomputation)."""
    from vtprune.methods.crosslmm import CrossLMMAdapters

    torch.manual_seed(2)
    folder = Path(tmp_path if tmp_path is not None else tempfile.mkdtemp()) / "adapters"
    CrossLMMAdapters.for_model(model, every=2).save(folder)
    return {"method": "crosslmm", "tokens": 4, "adapters": str(folder)}


# Methods whose transform pools: the reference places independently pooled rows (helpers.reference_pool).
POOLING = {"pool", "crosslmm"}


# name -> (config(model, tmp_path) -> dict, a bad override that must be refused)
METHOD_CASES = {
    "fastervlm": (lambda m, p: {"method": "fastervlm", "keep_ratio": 0.3}, {"keep_ratio": 1.5}),
    "random": (lambda m, p: {"method": "random", "keep_ratio": 0.4, "seed": 3}, {"seed": "x"}),
    "fastv": (lambda m, p: {"method": "fastv", "layer": 2, "keep_ratio": 0.3}, {"layer": 0}),
    "static_exit": (lambda m, p: {"method": "static_exit", "layer": 2}, {"layer": TEXT_LAYERS}),
    "dyvte": (_dyvte, {"threshold": "0.7"}),
    "pool": (lambda m, p: {"method": "pool", "keep_ratio": 0.3, "anchor": "first"}, {"tokens": 0}),
    "crosslmm": (_crosslmm, {"anchor": "middle"}),
    "schedule": (
        lambda m, p: {"method": "schedule", "keep": [1.0, 1.0, 0.5, 0.25]},
        {"keep": [1.0, 0.5, 0.75, 0.0]},
    ),
    "pdrop": (lambda m, p: {"method": "pdrop", "layers": [1, 2], "ratio": 0.5}, {"layers": [2, 1]}),
    "dart": (
        lambda m, p: {"method": "dart", "layer": 2, "keep_ratio": 0.3, "pivot_image": 2, "pivot_text": 2},
        {"pivot_image": -1},
    ),
    "visionzip": (
        lambda m, p: {"method": "visionzip", "keep_ratio": 0.5, "contextual_ratio": 0.25},
        {"contextual_ratio": 1.5},
    ),
    "divprune": (lambda m, p: {"method": "divprune", "keep_ratio": 0.3}, {"budget": ""}),
    "cdpruner": (lambda m, p: {"method": "cdpruner", "keep_ratio": 0.3, "theta": 0.5}, {"theta": 1.0}),
}
FAMILIES = list(TINY_FAMILIES)

# Methods whose transform merges tokens by the tower's scores: the reference places the rows the transform
# wrote at this prefill (recorded; tests/test_baselines_selection.py checks those rows independently).
RECORDED = {"visionzip"}


def _record_rows(pruner, config) -> list:
    """Record what the wrapped method's transform returns per prefill (a list of per-unit outputs)."""
    calls = []
    if config["method"] not in RECORDED:
        return calls
    inner = pruner.parts.transform

    def recording(units):
        out = inner(units)
        calls.append(out)
        return out

    pruner.parts.transform = recording
    return calls


def _recorded_rows(calls, selection):
    """Per sample, the rows the call's first prefill's transform wrote (units fill samples in order)."""
    if not calls:
        return None
    rows = torch.cat([new for _, new in calls[0]])
    return list(rows.split([sel.visual_out for sel in selection]))


def test_every_registered_method_and_family_is_in_the_matrix():
    assert sorted(METHOD_CASES) == vtprune.available_methods()
    assert sorted(FAMILIES) == vtprune.supported_model_types()


def _build(family, attn="sdpa"):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(attn_implementation=attn, text_layers=TEXT_LAYERS)
    return model, tiny.inputs(model)


def _pooled_rows(model, inputs, selection, config):
    """Per sample, the rows an independent pooling writes; checks the kept placeholders are its anchors."""
    feats = image_features_per_sample(model, inputs)
    rows = []
    for feat, grid, sel in zip(feats, reference_grids(model, inputs), selection):
        n = feat.shape[0]
        target = config.get("tokens") or max(1, math.floor(n * config.get("keep_ratio", 1.0) + 0.5))
        anchors, pooled = reference_pool(feat, grid, target, config.get("anchor", "center"))
        assert torch.equal(sel.kept_visual, anchors)
        rows.append(pooled)
    return rows


def _reference(model, inputs, selection, engine, contiguous, steps, config=None, rows=None):
    """Greedy tokens and logits of the unwrapped model on the kept tokens, masked per layer, no cache.
    ``rows``: per sample, the rows a transform wrote at the kept visual tokens (default: the model's own)."""
    if config is not None and config["method"] in POOLING:
        rows = _pooled_rows(model, inputs, selection, config)
    ref = kept_reference_inputs(model, inputs, selection, contiguous, rows)
    batch, seq = ref["input_ids"].shape
    alive = alive_per_layer(engine, batch, seq) if engine is not None else [None] * TEXT_LAYERS
    alive = [a if a is not None else torch.ones(batch, seq, dtype=torch.bool) for a in alive]
    lm_inputs = capture_language_model_inputs(model, ref)
    return greedy_masked_no_cache(model, lm_inputs, alive, steps)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(METHOD_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_no_cache_reference(family, method, attn, cache, tmp_path):
    model, inputs = _build(family, attn)
    config = METHOD_CASES[method][0](model, tmp_path)
    steps = 4
    vtprune.wrap(model, config)
    pruner = vtprune.get_pruner(model)
    calls = _record_rows(pruner, config)
    out = greedy_with_logits(model, inputs, steps, cache)
    selection, engine, contiguous = pruner.last, pruner.engine, pruner.contiguous
    vtprune.unwrap(model)
    rows = _recorded_rows(calls, selection)
    ref_tokens, ref_logits = _reference(model, inputs, selection, engine, contiguous, steps, config, rows)
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    for sel in selection:
        assert len(sel.layer_visual) == TEXT_LAYERS
        assert sel.layer_visual[0] == sel.visual_out <= sel.visual_in
        assert sel.tokens_in - sel.tokens_out == sel.visual_in - sel.visual_out
        assert all(a >= b for a, b in zip(sel.layer_visual, sel.layer_visual[1:]))


@pytest.mark.parametrize("method", list(METHOD_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_restores_bit_identical_outputs_and_leaves_nothing(family, method, tmp_path):
    model, inputs = _build(family)
    config = METHOD_CASES[method][0](model, tmp_path)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # Snapshot after a first run: transformers installs its own output-capturing hooks lazily.
    modules = dict(model.named_modules())
    before = {name: dict(mod.__dict__) for name, mod in modules.items()}
    hooks = {name: (len(mod._forward_hooks), len(mod._forward_pre_hooks)) for name, mod in modules.items()}
    with torch.no_grad():
        vtprune.wrap(model, config)
        model(**inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        vtprune.unwrap(model)
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert not vtprune.is_wrapped(model)
    for name, mod in modules.items():
        assert set(mod.__dict__) == set(before[name]), name
        for key, value in before[name].items():  # the same objects: configs, bound methods, dicts
            if not isinstance(value, torch.Tensor):  # HF itself rewrites per-call tensors (rope_deltas)
                assert mod.__dict__[key] is value, (name, key)
        assert (len(mod._forward_hooks), len(mod._forward_pre_hooks)) == hooks[name], name
        if hasattr(mod, "config"):
            assert mod.config._attn_implementation != "vtprune_probe", name


@pytest.mark.parametrize("method", list(METHOD_CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_option_is_refused_before_patching(family, method, tmp_path):
    model, _ = _build(family)
    make, bad = METHOD_CASES[method]
    before = {name: set(mod.__dict__) for name, mod in model.named_modules()}
    with pytest.raises(UsageError):
        vtprune.wrap(model, make(model, tmp_path) | bad)
    with pytest.raises(UsageError, match="no option"):
        vtprune.wrap(model, make(model, tmp_path) | {"no_such_option": 1})
    assert not vtprune.is_wrapped(model)
    assert {name: set(mod.__dict__) for name, mod in model.named_modules()} == before


def _stages() -> tuple[list[str], list[str]]:
    """Registered methods that select before the LLM, and those that drop inside it (from their parts)."""
    from vtprune.registry import get_family, method_parts

    model, _ = _build("llava")
    family = get_family(model)
    pre, inside = [], []
    for name, (make, _) in METHOD_CASES.items():
        if name == "dyvte":  # needs a gates folder; its parts are a plan (checked in the loop below)
            inside.append(name)
            continue
        parts = method_parts(vtprune.PruneConfig.from_dict(make(model, None)), family)
        (pre if parts.pre_llm else inside).append(name)
        assert parts.pre_llm != (parts.plan is not None), name
    return pre, inside


PRE, INSIDE = _stages()


@pytest.mark.parametrize("inside", INSIDE)
@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_pre_llm_and_an_in_llm_method_compose(family, pre, inside, tmp_path):
    model, inputs = _build(family)
    configs = [METHOD_CASES[pre][0](model, tmp_path), METHOD_CASES[inside][0](model, tmp_path)]
    steps = 3
    vtprune.wrap(model, configs)
    pruner = vtprune.get_pruner(model)
    calls = _record_rows(pruner, configs[0])
    out = greedy_with_logits(model, inputs, steps, "dynamic")
    selection, engine, contiguous = pruner.last, pruner.engine, pruner.contiguous
    vtprune.unwrap(model)
    rows = _recorded_rows(calls, selection)
    ref_tokens, ref_logits = _reference(model, inputs, selection, engine, contiguous, steps, configs[0], rows)
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    assert all(sel.visual_out < sel.visual_in for sel in selection)  # the pre-LLM part ran


def test_two_methods_for_one_slot_are_refused():
    model, _ = _build("llava")
    with pytest.raises(UsageError, match="cannot compose fastervlm and random"):
        vtprune.wrap(model, ["fastervlm", "random"])
    with pytest.raises(UsageError, match="cannot compose fastv and static_exit"):
        vtprune.wrap(model, ["fastv", {"method": "static_exit", "layer": 1}])
    assert not vtprune.is_wrapped(model)
