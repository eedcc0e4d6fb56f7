"""One generate() call, one selection per sample (issue 17.3).

Every beam, returned sequence and decoding step of one sample in one ``generate()`` call is pruned the same
way: random scores are drawn once per encoded image (beams share the encoded features), and with
``use_cache=False`` the later full-sequence forwards of the call reuse the first forward's in-LLM decisions,
so that greedy decoding without a cache equals greedy decoding with one. A *later* ``generate()`` call
encodes its images again and may draw a new random subset (reproducible from the seed).
"""

from __future__ import annotations

import pytest
import torch
from helpers import forbid_generating

import vtprune
from vtprune.methods.dyvte import ExitGates
from vtprune.testing import TINY_FAMILIES

TEXT_LAYERS = 3
FAMILIES = list(TINY_FAMILIES)


class LastTokenGates(ExitGates):
    """Exit when the last token's state says so: a decision that changes with every generated token."""

    def forward(self, layer, features):
        last = features[:, self.hidden_size :]
        exit_logit = torch.where(last.sum(-1) > 0, 5.0, -5.0)
        return torch.stack([torch.zeros_like(exit_logit), exit_logit], -1)


def _dyvte(tmp_path):
    gates = LastTokenGates(64, TEXT_LAYERS)  # every tiny family's text hidden size is 64
    return {"method": "dyvte", "gates": str(gates.save(tmp_path / "gates"))}


def _wrap(model, config):
    vtprune.wrap(model, config)
    plan = getattr(vtprune.get_pruner(model).engine, "plan", None)
    if hasattr(plan, "gates"):  # the rule, not the saved weights
        plan.gates = LastTokenGates(plan.gates.hidden_size, plan.gates.num_layers)


CONFIGS = {
    "random": lambda p: {"method": "random", "keep_ratio": 0.3, "seed": 2},
    "fastv": lambda p: {"method": "fastv", "layer": 1, "keep_ratio": 0.3},
    "static_exit": lambda p: {"method": "static_exit", "layer": 2},
    "dyvte": _dyvte,
    "random+fastv": lambda p: [
        {"method": "random", "keep_ratio": 0.5, "seed": 3},
        {"method": "fastv", "layer": 1, "keep_ratio": 0.4},
    ],
}


def _build(family, seed=0):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=TEXT_LAYERS, seed=seed)
    forbid_generating(model, [model.config.image_token_id])  # no stray placeholder in a re-fed sequence
    return model, tiny.inputs(model)


def _generate(model, inputs, steps, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )


def _kept(model):
    return [s.kept_visual for s in vtprune.get_pruner(model).last]


@pytest.mark.parametrize("family", FAMILIES)
def test_beams_and_returned_sequences_of_a_sample_share_one_random_selection(family):
    model, inputs = _build(family)
    vtprune.wrap(model, "random", keep_ratio=0.3, seed=2)
    for kwargs in (
        {"num_beams": 3, "num_return_sequences": 3},
        {"do_sample": True, "num_return_sequences": 3},
    ):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, **kwargs)
        kept = _kept(model)
        assert len(kept) == 6
        for sample in range(2):
            group = kept[3 * sample : 3 * sample + 3]
            assert all(torch.equal(group[0], k) for k in group[1:]), (kwargs, [k.tolist() for k in group])


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_without_cache_equals_greedy_with_cache(family, method, tmp_path):
    model, inputs = _build(family)
    config = CONFIGS[method](tmp_path)
    steps = 5
    _wrap(model, config)
    cached = _generate(model, inputs, steps)
    cached_sel = vtprune.get_pruner(model).last
    vtprune.unwrap(model)
    _wrap(model, config)  # the same random draws as the cached run
    plain = _generate(model, inputs, steps, use_cache=False)
    assert torch.equal(plain.sequences, cached.sequences)
    for got, want in zip(plain.logits, cached.logits):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    # The last forward of the call (the whole sequence) kept what the first one kept, at every layer.
    for got, want in zip(vtprune.get_pruner(model).last, cached_sel):
        assert torch.equal(got.kept_visual, want.kept_visual)
        assert got.layer_visual == want.layer_visual


@pytest.mark.parametrize("method", ["random", "fastv", "random+fastv"])
def test_beam_search_without_cache_equals_beam_search_with_cache(method, tmp_path):
    model, inputs = _build("qwen2_vl")
    config = CONFIGS[method](tmp_path)
    kwargs = {"num_beams": 3, "num_return_sequences": 2}
    vtprune.wrap(model, config)
    cached = _generate(model, inputs, 4, **kwargs)
    vtprune.unwrap(model)
    vtprune.wrap(model, config)
    plain = _generate(model, inputs, 4, use_cache=False, **kwargs)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(plain.sequences_scores, cached.sequences_scores, atol=1e-4, rtol=1e-4)


def test_each_generate_call_draws_one_random_subset_reproducibly():
    """Documented: a later generate() call encodes the images again and draws a new subset; the sequence
    of draws is fixed by the seed."""
    model, inputs = _build("llava")
    vtprune.wrap(model, "random", keep_ratio=0.3, seed=4)
    _generate(model, inputs, 2)
    first = _kept(model)
    _generate(model, inputs, 2)
    second = _kept(model)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    vtprune.unwrap(model)
    vtprune.wrap(model, "random", keep_ratio=0.3, seed=4)
    _generate(model, inputs, 2, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(first, _kept(model)))


def test_reuse_ends_with_the_generate_call():
    """A forward after a no-cache generate() decides afresh: nothing of the call leaks into later calls."""
    model, inputs = _build("llava")
    config = {"method": "fastv", "layer": 1, "keep_ratio": 0.3}
    vtprune.wrap(model, config)
    out = _generate(model, inputs, 4, use_cache=False)
    longer = dict(inputs)
    longer["input_ids"] = out.sequences
    longer["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones_like(out.sequences[:, inputs["input_ids"].shape[1] :])], -1
    )
    with torch.no_grad():
        got = model(**longer).logits
        vtprune.unwrap(model)
        vtprune.wrap(model, config)
        want = model(**longer).logits
    assert torch.equal(got, want)
