"""Continuing a conversation from a pruned cache (issue 17.1).

``first = model.generate(...)`` on a wrapped model, then ``model.generate(input_ids=cat(first.sequences,
new_turn), attention_mask=..., cache=first.cache)`` must give the tokens of an independent reference: the
unwrapped model fed only the tokens kept before the LLM (each decoder layer masked to the tokens the method
kept at that layer), then the first turn's tokens and the new turn, recomputed without a cache.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    alive_per_layer,
    capture_language_model_inputs,
    forbid_generating,
    greedy_masked_no_cache,
    greedy_with_logits,
    kept_reference_inputs,
)

import vtprune
from vtprune.methods.dyvte import ExitGates
from vtprune.testing import PAD, TINY_FAMILIES

TEXT_LAYERS = 4
FIRST, SECOND, THIRD = 3, 4, 2  # tokens generated in the first, second and third turn
NEW_TURN = (5, 3)  # tokens of the second user turn, per sample (left-padded inside the new segment)


def _config(method: str, model, tmp_path) -> dict:
    if method == "dyvte":
        torch.manual_seed(1)
        gates = ExitGates(model.config.get_text_config().hidden_size, TEXT_LAYERS)
        return {"method": "dyvte", "gates": str(gates.save(tmp_path / "gates")), "threshold": 0.3}
    return {
        "fastervlm": {"method": "fastervlm", "keep_ratio": 0.3},
        "random": {"method": "random", "keep_ratio": 0.4, "seed": 3},
        "fastv": {"method": "fastv", "layer": 2, "keep_ratio": 0.3},
        "static_exit": {"method": "static_exit", "layer": 2},
    }[method]


METHODS = ["fastervlm", "random", "fastv", "static_exit", "dyvte"]
FAMILIES = list(TINY_FAMILIES)


def _build(family, seed=0):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=TEXT_LAYERS)
    # A tiny random model may emit an image placeholder; a continuation holding one is not a text turn.
    forbid_generating(model, [model.config.image_token_id])
    return model, tiny.inputs(model, seed=seed)


def _new_turn(batch: int, lengths, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask of a new user turn, per-sample lengths, left-padded inside the new segment."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(10, 100, (n,), generator=g)
        mask[b, width - n :] = 1
    return ids, mask


def _second_turn_inputs(inputs, first_sequences, seed=7):
    batch = first_sequences.shape[0]
    new_ids, new_mask = _new_turn(batch, NEW_TURN[:batch], seed)
    generated = first_sequences.shape[1] - inputs["input_ids"].shape[1]
    ids = torch.cat([first_sequences, new_ids], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(batch, generated, dtype=torch.long), new_mask], 1)
    return ids, mask, new_ids, new_mask


class _Snapshot:
    """What the reference needs from a pruned prefill, read before the model is unwrapped."""

    def __init__(self, pruner, batch, inputs):
        self.selection = pruner.last
        self.contiguous = pruner.contiguous
        width = max(len(s.kept_columns) for s in self.selection)
        if pruner.engine is not None:
            self.alive = alive_per_layer(pruner.engine, batch, width)
        else:
            self.alive = [torch.ones(batch, width, dtype=torch.bool)] * TEXT_LAYERS
        self.inputs = inputs


def _reference(model, snap: _Snapshot, turns) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Greedy tokens and logits of every turn, on the unwrapped ``model``: the kept prompt, then for each
    turn ``(appended ids, appended mask, steps)`` the previous turn's tokens, the appended ids, and
    ``steps`` greedy tokens, recomputed without a cache with each layer masked to its kept tokens."""
    ref = kept_reference_inputs(model, snap.inputs, snap.selection, snap.contiguous)
    lm = capture_language_model_inputs(model, ref)
    embeds, mask, pos, alive = lm["inputs_embeds"], lm["attention_mask"], lm["position_ids"], snap.alive
    deepstack = lm.get("deepstack")  # Qwen3-VL: added at the prompt's visual positions
    embed_tokens = model.get_input_embeddings()
    out, previous = [], None
    for appended, appended_mask, steps in turns:
        if previous is not None:  # the previous turn's tokens, all real, then the new turn
            appended = torch.cat([previous, appended], 1)
            appended_mask = torch.cat([torch.ones_like(previous), appended_mask], 1)
        if appended.shape[1]:
            with torch.no_grad():
                embeds = torch.cat([embeds, embed_tokens(appended)], 1)
            pos = torch.cat([pos, pos[..., -1:] + appended_mask.cumsum(-1)], -1)
            mask = torch.cat([mask, appended_mask], -1)
            alive = [torch.cat([a, torch.ones_like(appended_mask, dtype=torch.bool)], -1) for a in alive]
            if deepstack is not None:  # appended tokens are text
                deepstack = (
                    torch.cat([deepstack[0], torch.zeros_like(appended_mask, dtype=torch.bool)], -1),
                    deepstack[1],
                )
        lm_inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
        if deepstack is not None:
            lm_inputs["deepstack"] = deepstack
        tokens, logits = greedy_masked_no_cache(model, lm_inputs, alive, steps)
        out.append((tokens, logits))
        previous = tokens
    return out


def _generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(**kwargs, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _assert_turn(out, steps, ref_tokens, ref_logits):
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_conversations_continue_from_their_pruned_caches(family, method, tmp_path):
    """Two conversations (batch 2, left-padded) on one wrapped model: turn 1 of each, then turn 2 of each
    from its own cache (another conversation's prefill ran in between), then turn 3 of the first."""
    model, inputs_a = _build(family, seed=0)
    inputs_b = TINY_FAMILIES[family].inputs(model, seed=1)
    vtprune.wrap(model, _config(method, model, tmp_path))
    pruner = vtprune.get_pruner(model)
    batch = inputs_a["input_ids"].shape[0]
    conversations = []
    for inputs in (inputs_a, inputs_b):
        first = greedy_with_logits(model, inputs, FIRST)
        # The cache reports its length in original coordinates (the last token is not in it yet).
        assert first.cache.get_seq_length() == first.sequences.shape[1] - 1
        conversations.append((inputs, first, _Snapshot(pruner, batch, inputs)))
    seconds = []
    for seed, (inputs, first, _) in enumerate(conversations):
        ids, mask, new_ids, new_mask = _second_turn_inputs(inputs, first.sequences, seed=seed)
        second = _generate(
            model, input_ids=ids, attention_mask=mask, cache=first.cache, max_new_tokens=SECOND
        )
        assert torch.equal(second.sequences[:, : ids.shape[1]], ids)
        seconds.append((second, mask, new_ids, new_mask))
    second_a, mask_a, _, _ = seconds[0]
    third_ids, third_mask = _new_turn(batch, (2, 4), seed=11)
    ids = torch.cat([second_a.sequences, third_ids], 1)
    mask = torch.cat([mask_a, torch.ones(batch, SECOND, dtype=torch.long), third_mask], 1)
    third_a = _generate(model, input_ids=ids, attention_mask=mask, cache=second_a.cache, max_new_tokens=THIRD)
    vtprune.unwrap(model)

    empty = inputs_a["input_ids"][:, :0]
    for (_, first, snap), (second, _, new_ids, new_mask), more in zip(
        conversations, seconds, [[(third_ids, third_mask, THIRD)], []]
    ):
        refs = _reference(model, snap, [(empty, empty, FIRST), (new_ids, new_mask, SECOND), *more])
        _assert_turn(first, FIRST, *refs[0])
        _assert_turn(second, SECOND, *refs[1])
        if more:
            _assert_turn(third_a, THIRD, *refs[2])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_static_cache_continuation_equals_the_reference(family, tmp_path):
    """A static cache the caller made large enough for both turns continues like a dynamic one (a pre-LLM
    and an in-LLM method composed: shorter prompt, and shorter caches in later layers)."""
    from transformers import StaticCache

    model, inputs = _build(family)
    vtprune.wrap(model, [_config("fastervlm", model, tmp_path), _config("fastv", model, tmp_path)])
    pruner = vtprune.get_pruner(model)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=96)
    first = _generate(model, **inputs, cache=cache, max_new_tokens=FIRST)
    snap = _Snapshot(pruner, 2, inputs)
    ids, mask, new_ids, new_mask = _second_turn_inputs(inputs, first.sequences)
    second = _generate(model, input_ids=ids, attention_mask=mask, cache=first.cache, max_new_tokens=SECOND)
    vtprune.unwrap(model)
    empty = new_ids[:, :0]
    (t1, l1), (t2, l2) = _reference(model, snap, [(empty, empty, FIRST), (new_ids, new_mask, SECOND)])
    _assert_turn(first, FIRST, t1, l1)
    _assert_turn(second, SECOND, t2, l2)


def test_images_passed_again_with_the_cache_are_refused_clearly():
    """The cache already holds the prompt's images: passing pixel_values again is refused with what to do."""
    model, inputs = _build("llava")
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    first = greedy_with_logits(model, inputs, FIRST)
    ids, mask, _, _ = _second_turn_inputs(inputs, first.sequences)
    with pytest.raises(vtprune.UsageError, match="without pixel_values"):
        _generate(
            model,
            input_ids=ids,
            attention_mask=mask,
            pixel_values=inputs["pixel_values"],
            cache=first.cache,
            max_new_tokens=2,
        )


def test_a_wrong_continuation_mask_is_refused_with_the_expected_width():
    """A forward on the pruned cache whose mask does not cover the whole sequence says what it expected."""
    model, inputs = _build("llava")
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    first = greedy_with_logits(model, inputs, FIRST)
    nxt = first.sequences[:, -1:]
    full = first.sequences.shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, FIRST, dtype=torch.long)], 1)
    with torch.no_grad():
        model(input_ids=nxt, attention_mask=mask, cache=first.cache)  # the full mask is accepted
        with pytest.raises(vtprune.UsageError, match=f"expected {full + 1}"):
            model(input_ids=first.sequences[:, -1:], attention_mask=mask[:, 1:], cache=first.cache)
