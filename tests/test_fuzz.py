"""Seeded fuzz of generate(): family x method x batch x padding x cache x beams against the no-cache reference.

Each case draws (from its seed) a tiny model of a registered family, a registered method (its contract
case, ``tests/contract/test_matrix.py``) or a composition of a pre-LLM and an in-LLM method, a batch of 1-3
samples with or without left padding, a cache (dynamic, static, none) and greedy or beam search. The
reference is independent of vtprune's runtime: the unwrapped model fed only the tokens the first (prompt)
forward kept, each decoder layer masked to the tokens the method kept at that layer, recomputed without a
cache at every step - greedy, or a plain beam search over the same recomputation.
"""

from __future__ import annotations

import inspect
import random
from types import SimpleNamespace

import pytest
import torch
from contract import test_matrix as matrix
from contract.test_matrix import INSIDE, METHOD_CASES, PRE, TEXT_LAYERS
from helpers import (
    alive_per_layer,
    capture_language_model_inputs,
    forbid_generating,
    greedy_masked_no_cache,
    kept_reference_inputs,
    masked_layers_forward,
)

import vtprune
from vtprune.testing import TINY_FAMILIES

CASES = 16
STEPS = 3
FAMILIES = sorted(TINY_FAMILIES)


def _draw(seed: int) -> SimpleNamespace:
    """One case. Families and methods are cycled (every one is drawn), the rest is random."""
    rng = random.Random(seed)
    methods = sorted(METHOD_CASES) + ["compose"]
    method = methods[seed % len(methods)]
    batch = rng.choice([1, 2, 2, 3])
    beams = rng.choice([1, 1, 2, 3])
    return SimpleNamespace(
        seed=seed,
        family=FAMILIES[seed % len(FAMILIES)],
        method=method,
        parts=(rng.choice(PRE), rng.choice(INSIDE)) if method == "compose" else (method,),
        batch=batch,
        # distinct text lengths: left padding; equal ones: none where the family's images are alike too
        lengths=rng.sample(range(3, 10), batch) if rng.random() < 0.6 else [rng.randint(3, 9)] * batch,
        cache=rng.choice(["dynamic", "static", "none"]),
        beams=beams,
        returned=rng.randint(1, beams),
    )


def _inputs(tiny, model, case) -> dict:
    """The family's batch with the case's text lengths: as many samples as the family's builder pairs with
    its default images (1 to 3), or its two samples where it wants one length per default image."""
    if "text_lengths" not in inspect.signature(tiny.inputs).parameters:
        return tiny.inputs(model, seed=case.seed)
    try:
        return tiny.inputs(model, text_lengths=tuple(case.lengths), seed=case.seed)
    except ValueError:
        return tiny.inputs(model, text_lengths=tuple((case.lengths * 2)[:2]), seed=case.seed)


def _capture_first_prefill(model) -> dict:
    """What the first language-model forward of the call (the prompt's prefill) kept."""
    pruner = vtprune.get_pruner(model)
    seen: dict = {}

    def hook(module, args, kwargs, out):
        if not seen:
            seen["selection"] = pruner.last
            engine = pruner.engine
            seen["layer_index"] = (
                [None if i is None else i.clone() for i in engine.layer_index] if engine is not None else None
            )

    handle = model.model.language_model.register_forward_hook(hook, with_kwargs=True)
    return seen, handle


def _beam_masked_no_cache(model, lm_inputs, alive, steps, beams, returned) -> torch.Tensor:
    """Beam search (no EOS, no length penalty effect) over the masked no-cache recomputation."""
    embeds, mask, pos = lm_inputs["inputs_embeds"], lm_inputs["attention_mask"], lm_inputs["position_ids"]
    batch = embeds.shape[0]
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if pos is None:
        pos = torch.arange(embeds.shape[1]).expand(batch, -1)
    embeds, mask = embeds.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    pos = pos.repeat_interleave(beams, pos.ndim - 2)
    alive = [a.repeat_interleave(beams, 0) for a in alive]
    deepstack = lm_inputs.get("deepstack")  # Qwen3-VL: (visual mask, rows per level, row-major over the mask)
    if deepstack is not None:
        counts = deepstack[0].sum(-1).tolist()
        levels = [torch.cat([p for p in rows.split(counts) for _ in range(beams)]) for rows in deepstack[1]]
        # a sample's beams share its image, so reordering beams within a sample leaves these rows unchanged
        deepstack = (deepstack[0].repeat_interleave(beams, 0), levels)
    scores = torch.zeros(batch, beams)
    scores[:, 1:] = -1e9  # the first step expands beam 0 only
    tokens = torch.zeros(batch * beams, 0, dtype=torch.long)
    embed_tokens = model.get_input_embeddings()
    for _ in range(steps):
        step = None if deepstack is None else (deepstack[0], list(deepstack[1]))
        logp = masked_layers_forward(model, embeds, mask, pos, alive, step)[:, -1].log_softmax(-1)
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(batch, beams * vocab)
        scores, flat = cand.topk(beams, dim=-1)
        rows = (torch.arange(batch)[:, None] * beams + flat // vocab).reshape(-1)
        new = (flat % vocab).reshape(-1)
        tokens = torch.cat([tokens[rows], new[:, None]], 1)
        with torch.no_grad():
            embeds = torch.cat([embeds[rows], embed_tokens(new)[:, None]], 1)
        mask = torch.cat([mask[rows], torch.ones_like(mask[:, :1])], -1)
        pos = pos[..., rows, :]
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
        alive = [torch.cat([a[rows], torch.ones_like(a[:, :1])], -1) for a in alive]
        if deepstack is not None:  # the generated token is no visual position
            deepstack = (torch.cat([deepstack[0], torch.zeros_like(deepstack[0][:, :1])], -1), deepstack[1])
    return tokens.reshape(batch, beams, steps)[:, :returned].reshape(batch * returned, steps)


@pytest.mark.parametrize("seed", range(CASES))
def test_generate_equals_no_cache_reference(seed, tmp_path):
    case = _draw(seed)
    tiny = TINY_FAMILIES[case.family]
    model = tiny.build(text_layers=TEXT_LAYERS, seed=seed)
    forbid_generating(model, [model.config.image_token_id])  # a re-fed stray placeholder fails in HF
    inputs = _inputs(tiny, model, case)
    batch = inputs["input_ids"].shape[0]
    configs = [METHOD_CASES[name][0](model, tmp_path) for name in case.parts]
    vtprune.wrap(model, configs if len(configs) > 1 else configs[0])
    contiguous = vtprune.get_pruner(model).contiguous
    calls = matrix._record_rows(vtprune.get_pruner(model), configs[0])  # a merging transform's rows
    seen, handle = _capture_first_prefill(model)
    extra = {"num_beams": case.beams, "num_return_sequences": case.returned}
    if case.cache == "static":
        extra["cache_implementation"] = "static"
    elif case.cache == "none":
        extra["use_cache"] = False
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=STEPS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **extra,
            )
    finally:
        handle.remove()
    vtprune.unwrap(model)

    # One selection per sample for all its beams: the expanded rows of a sample agree.
    selection, layer_index = seen["selection"], seen["layer_index"]
    k = case.beams
    assert len(selection) == batch * k
    for b in range(batch):
        for r in range(1, k):
            assert torch.equal(selection[b * k + r].kept_columns, selection[b * k].kept_columns), case
            assert selection[b * k + r].layer_visual == selection[b * k].layer_visual, case
    rows = matrix._recorded_rows(calls, selection)
    selection = selection[::k]
    rows = rows[::k] if rows is not None else None
    if case.parts[0] in getattr(matrix, "POOLING", ()):  # a transform's rows, placed independently
        rows = matrix._pooled_rows(model, inputs, selection, configs[0])
    ref = kept_reference_inputs(model, inputs, selection, contiguous, rows)
    seq = ref["input_ids"].shape[1]
    if layer_index is None:
        alive = [torch.ones(batch, seq, dtype=torch.bool)] * TEXT_LAYERS
    else:
        index = [None if i is None else i[::k] for i in layer_index]
        alive = alive_per_layer(SimpleNamespace(layer_index=index), batch, seq)
    lm_inputs = capture_language_model_inputs(model, ref)
    if k == 1:
        ref_tokens, ref_logits = greedy_masked_no_cache(model, lm_inputs, alive, STEPS)
        assert torch.equal(out.sequences[:, -STEPS:], ref_tokens), case
        for got, want in zip(out.logits, ref_logits):
            torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)
    else:
        ref_tokens = _beam_masked_no_cache(model, lm_inputs, alive, STEPS, k, case.returned)
        assert torch.equal(out.sequences[:, -STEPS:], ref_tokens), case


def test_the_cases_cover_every_family_method_cache_and_beam_setting():
    cases = [_draw(seed) for seed in range(CASES)]
    assert {c.family for c in cases} == set(FAMILIES)
    assert {c.method for c in cases} == set(METHOD_CASES) | {"compose"}
    assert {c.cache for c in cases} == {"dynamic", "static", "none"}
    assert {c.beams > 1 for c in cases} == {True, False}
    assert {len(set(c.lengths)) > 1 for c in cases} == {True, False}
    assert {c.batch for c in cases} >= {1, 2}
