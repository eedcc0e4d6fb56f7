"""A forward with labels on a wrapped model (issue 17.4).

``model(**inputs, labels=labels)`` takes labels in original coordinates; its ``logits`` cover the tokens the
language model returned (``SampleSelection.output_columns``, right-aligned per sample) and its loss is the
unwrapped model's loss on the kept sequence with the labels mapped to it. Log-likelihood scoring of a
multiple-choice answer (lmms-eval: sum of the log-probs of the answer tokens) works on a wrapped model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    alive_per_layer,
    capture_language_model_inputs,
    kept_reference_inputs,
    masked_layers_forward,
)

import vtprune
from vtprune.methods.dyvte import ExitGates
from vtprune.testing import TINY_FAMILIES

TEXT_LAYERS = 4
METHODS = ["fastervlm", "random", "fastv", "static_exit", "dyvte"]
FAMILIES = list(TINY_FAMILIES)


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


def _build(family):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=TEXT_LAYERS)
    return model, tiny.inputs(model)


def _text_labels(model, inputs) -> torch.Tensor:
    """Labels in original coordinates: every text token but the first, -100 at padding and image tokens."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((mask == 0) | (ids == model.config.image_token_id), -100)
    labels[torch.arange(ids.shape[0]), mask.argmax(-1)] = -100  # nothing predicts the first token
    return labels


class _Reference:
    """The unwrapped model on the kept tokens of a wrapped forward (each layer masked to its kept tokens).

    Attributes:
        logits: ``(B, W, V)`` at every kept column (right-aligned, W the widest sample).
        returned: ``(B, W)`` bool, the kept columns the wrapped model returned (alive at the last layer).
        mapped: ``(B, W)`` the labels of the kept columns (-100 at padding).
        loss: the loss over the returned columns, each predicting the next kept token's label.
    """

    def __init__(self, model, inputs, labels, selection, contiguous, layer_index):
        ref = kept_reference_inputs(model, inputs, selection, contiguous)
        batch, width = ref["input_ids"].shape
        self.mapped = torch.full((batch, width), -100, dtype=torch.long)
        for b, sel in enumerate(selection):
            self.mapped[b, width - len(sel.kept_columns) :] = labels[b, sel.kept_columns]
        real = ref["attention_mask"].bool()
        if layer_index is None:  # pre-LLM: the unwrapped model's own forward and loss on the kept sequence
            with torch.no_grad():
                out = model(**ref, labels=self.mapped)
            self.logits, self.loss, self.returned = out.logits.float(), out.loss, real
            return
        alive = alive_per_layer(_Engine(layer_index), batch, width)
        lm = capture_language_model_inputs(model, ref)
        deepstack = lm.get("deepstack")  # Qwen3-VL
        self.logits = masked_layers_forward(
            model,
            lm["inputs_embeds"],
            lm["attention_mask"],
            lm["position_ids"],
            alive,
            None if deepstack is None else (deepstack[0], list(deepstack[1])),
        )
        self.returned = alive[-1] & real
        shift = F.pad(self.mapped[:, 1:], (0, 1), value=-100).masked_fill(~self.returned, -100)
        self.loss = F.cross_entropy(self.logits.flatten(0, 1), shift.flatten(), ignore_index=-100)

    def returned_logits(self, b):
        return self.logits[b][self.returned[b]]


class _Engine:
    def __init__(self, layer_index):
        self.layer_index = layer_index


def _wrapped_forward(model, inputs, labels):
    pruner = vtprune.get_pruner(model)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    layer_index = list(pruner.engine.layer_index) if pruner.engine is not None else None
    return out, pruner.last, pruner.contiguous, layer_index


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_with_original_labels_equals_the_kept_sequence_loss(family, method, tmp_path):
    model, inputs = _build(family)
    labels = _text_labels(model, inputs)
    vtprune.wrap(model, _config(method, model, tmp_path))
    out, selection, contiguous, layer_index = _wrapped_forward(model, inputs, labels)
    with torch.no_grad():
        as_tuple = model(**inputs, labels=labels, return_dict=False)
    vtprune.unwrap(model)
    ref = _Reference(model, inputs, labels, selection, contiguous, layer_index)

    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if method != "random":  # a plain forward draws a new random subset per call
        torch.testing.assert_close(as_tuple[0], out.loss)
    assert as_tuple[0].ndim == 0 and as_tuple[1].shape[-1] == out.logits.shape[-1]
    assert out.logits.shape[1] == max(len(s.output_columns) for s in selection)
    width = ref.mapped.shape[1]
    for b, sel in enumerate(selection):
        n = len(sel.output_columns)
        # the documented column map: the returned logits are those of output_columns, right-aligned
        returned = ref.returned[b, width - len(sel.kept_columns) :]
        assert torch.equal(sel.output_columns, sel.kept_columns[returned])
        torch.testing.assert_close(out.logits[b, -n:].float(), ref.returned_logits(b), atol=5e-5, rtol=1e-4)
    if layer_index is None:
        assert all(torch.equal(s.output_columns, s.kept_columns) for s in selection)


def _append(inputs: dict, tokens: torch.Tensor) -> dict:
    """``inputs`` followed by ``tokens`` (text, every sample): a context and its continuation."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros(tokens.shape)], 1)
    return out


def _answer_log_likelihood(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lmms-eval's score of a continuation: the sum of its tokens' log-probs, and whether greedy decoding
    would produce it; read from the last columns (the answer closes every sample)."""
    n = answer.shape[1]
    step = logits[:, -n - 1 : -1].float()
    log_probs = step.log_softmax(-1).gather(-1, answer[..., None]).squeeze(-1)
    return log_probs.sum(-1), (step.argmax(-1) == answer).all(-1)


@pytest.mark.parametrize("method", ["fastervlm", "fastv"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_multiple_choice_log_likelihood_scoring(family, method, tmp_path):
    model, context = _build(family)
    g = torch.Generator().manual_seed(5)
    options = [torch.randint(10, 100, (2, n), generator=g) for n in (1, 3, 2)]
    vtprune.wrap(model, _config(method, model, tmp_path))
    runs = []
    for answer in options:
        inputs = _append(context, answer)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -answer.shape[1] :] = answer  # lmms-eval: the context is masked, the answer is scored
        runs.append((inputs, labels, *_wrapped_forward(model, inputs, labels)))
    # A text-only forward with labels is the unwrapped model's (nothing is pruned, nothing is mapped).
    text = {"input_ids": options[1], "attention_mask": torch.ones_like(options[1])}
    with torch.no_grad():
        text_loss = model(**text, labels=options[1]).loss
    vtprune.unwrap(model)
    with torch.no_grad():
        assert torch.equal(text_loss, model(**text, labels=options[1]).loss)

    scores, ref_scores = [], []
    for answer, (inputs, labels, out, selection, contiguous, layer_index) in zip(options, runs):
        ll, greedy = _answer_log_likelihood(out.logits, answer)
        ref = _Reference(model, inputs, labels, selection, contiguous, layer_index)
        ref_ll, ref_greedy = _answer_log_likelihood(ref.logits, answer)
        torch.testing.assert_close(ll, ref_ll, atol=1e-4, rtol=1e-5)
        assert torch.equal(greedy, ref_greedy)
        # the loss is the mean negative log-likelihood of the answer tokens
        torch.testing.assert_close(out.loss, -ll.sum() / answer.numel(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
        scores.append(ll)
        ref_scores.append(ref_ll)
    assert torch.equal(torch.stack(scores).argmax(0), torch.stack(ref_scores).argmax(0))


def test_labels_of_the_wrong_shape_are_refused_clearly():
    model, inputs = _build("llava")
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    with pytest.raises(vtprune.UsageError, match="one label per prompt token"):
        model(**inputs, labels=inputs["input_ids"][:, 1:])
