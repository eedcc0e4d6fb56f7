"""Copies of a wrapped model (issue 17.2): deepcopy, copy.copy and pickling give independent wrapped models.

A copy has its own Pruner with the same config, patched onto the copy's own modules: its logits follow the
copy's weights, ``unwrap`` of the copy restores the copy (bit for bit equal to a deepcopy of the unwrapped
model), and the original is unaffected by anything done to the copy.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import vtprune
from vtprune.testing import TINY_FAMILIES

# A pre-LLM selection with a vision probe composed with an in-LLM plan: every kind of patch is copied.
CONFIGS = {
    "fastervlm+fastv": [{"method": "fastervlm", "keep_ratio": 0.5}, {"method": "fastv", "layer": 1}],
    "random": {"method": "random", "keep_ratio": 0.4, "seed": 5},
}


def _build(family):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=3)
    return model, tiny.inputs(model)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _scale_llm(model):
    """Change the language model's weights (the issue's symptom: a copy ignored its own weights)."""
    with torch.no_grad():
        for p in model.model.language_model.layers[-1].parameters():
            p.mul_(1.5)


def _instance_attrs(model):
    return {name: set(mod.__dict__) for name, mod in model.named_modules()}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_deepcopy_is_an_independent_wrapped_model(family, config):
    model, inputs = _build(family)
    clean = copy.deepcopy(model)  # the unwrapped model, for references
    vtprune.wrap(model, CONFIGS[config])
    pruner = vtprune.get_pruner(model)
    before = _logits(model, inputs)

    clone = copy.deepcopy(model)
    assert vtprune.is_wrapped(clone)
    clone_pruner = vtprune.get_pruner(clone)
    assert clone_pruner is not pruner and clone_pruner.model is clone
    assert clone_pruner.config == pruner.config and clone_pruner.config is not pruner.config
    if config == "random":  # the copy's generator starts from the seed: compare with a fresh wrap
        reference = vtprune.wrap(copy.deepcopy(clean), CONFIGS[config])
        assert torch.equal(_logits(clone, inputs), _logits(reference, inputs))
    else:
        assert torch.equal(_logits(clone, inputs), before)

    # The copy runs its own modules: its logits follow its weights, the original's do not move.
    _scale_llm(clone)
    changed = copy.deepcopy(clean)
    _scale_llm(changed)
    reference = vtprune.wrap(copy.deepcopy(changed), CONFIGS[config])
    if config == "random":
        _logits(reference, inputs)  # the copy drew once already
    got, want = _logits(clone, inputs), _logits(reference, inputs)
    assert not torch.equal(got, before)
    assert torch.equal(got, want)
    if config != "random":
        assert torch.equal(_logits(model, inputs), before)

    # unwrap(copy) restores the copy: bit-identical to a deepcopy of the unwrapped model, no patch left.
    vtprune.unwrap(clone)
    assert not vtprune.is_wrapped(clone)
    assert torch.equal(_logits(clone, inputs), _logits(changed, inputs))
    assert _instance_attrs(clone) == _instance_attrs(changed)
    assert vtprune.get_pruner(model) is pruner
    if config != "random":
        assert torch.equal(_logits(model, inputs), before)
    vtprune.unwrap(model)
    assert torch.equal(_logits(model, inputs), _logits(clean, inputs))
    assert _instance_attrs(model) == _instance_attrs(clean)


def test_deepcopy_generates_like_the_original_and_keeps_shared_references():
    model, inputs = _build("llava")
    vtprune.wrap(model, "fastv", layer=1, keep_ratio=0.3)
    # A container that also holds a patched submodule and the pruner: references map into the copy.
    box = copy.deepcopy(
        {"model": model, "lm": model.model.language_model, "pruner": vtprune.get_pruner(model)}
    )
    clone = box["model"]
    assert box["lm"] is clone.model.language_model
    assert box["pruner"] is vtprune.get_pruner(clone)
    with torch.no_grad():
        a = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        b = clone.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
    assert [s.layer_visual for s in vtprune.get_pruner(clone).last] == [
        s.layer_visual for s in vtprune.get_pruner(model).last
    ]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_pickled_model_loads_wrapped_and_unwraps(family):
    model, inputs = _build(family)
    clean = copy.deepcopy(model)
    vtprune.wrap(model, CONFIGS["fastervlm+fastv"])
    buffer = io.BytesIO()
    # Before any forward: transformers' own lazily installed output hooks are local functions that no
    # pickle can hold (an unwrapped model that ran once cannot be pickled either).
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    before = _logits(model, inputs)
    assert vtprune.is_wrapped(loaded) and vtprune.get_pruner(loaded).model is loaded
    assert torch.equal(_logits(loaded, inputs), before)
    _scale_llm(loaded)
    assert not torch.equal(_logits(loaded, inputs), before)
    assert torch.equal(_logits(model, inputs), before)
    vtprune.unwrap(loaded)
    changed = copy.deepcopy(clean)
    _scale_llm(changed)
    assert torch.equal(_logits(loaded, inputs), _logits(changed, inputs))
    assert _instance_attrs(loaded) == _instance_attrs(changed)
    vtprune.unwrap(model)
    assert torch.equal(_logits(model, inputs), _logits(clean, inputs))
    assert _instance_attrs(model) == _instance_attrs(clean)


def test_shallow_copy_shares_weights_but_not_patches():
    model, inputs = _build("llava")
    clean = copy.deepcopy(model)
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    before = _logits(model, inputs)
    shallow = copy.copy(model)
    assert vtprune.is_wrapped(shallow) and vtprune.get_pruner(shallow) is not vtprune.get_pruner(model)
    assert torch.equal(_logits(shallow, inputs), before)
    assert shallow.lm_head.weight is model.lm_head.weight  # shallow: the same parameters
    vtprune.unwrap(shallow)
    assert torch.equal(_logits(shallow, inputs), _logits(clean, inputs))
    assert vtprune.is_wrapped(model) and torch.equal(_logits(model, inputs), before)
    vtprune.unwrap(model)
    assert torch.equal(_logits(model, inputs), _logits(clean, inputs))
    assert _instance_attrs(model) == _instance_attrs(clean)
