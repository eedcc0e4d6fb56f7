"""DyVTE: gates decide per sample; generate equals the masked recomputation; gates train, save and load."""

import pytest
import torch
from helpers import alive_per_layer, capture_language_model_inputs, greedy_masked_no_cache

import vtprune
from vtprune.methods.dyvte import ExitGates, text_state_features
from vtprune.testing import llava_inputs, tiny_llava
from vtprune.tune.dyvte import collect_exit_data, train_dyvte, train_gates


class RuleGates(ExitGates):
    """Gates with a hand-written rule: exit after ``layer`` for samples whose feature matches ``target``."""

    def __init__(self, hidden, layers, layer, target):
        super().__init__(hidden, layers)
        self.layer, self.target = layer, target

    def forward(self, layer, features):
        hit = (features - self.target).abs().amax(-1) < 1e-4
        exit_logit = torch.where(hit & (layer == self.layer), 5.0, -5.0)
        return torch.stack([torch.zeros_like(exit_logit), exit_logit], -1)


def _features_at(model, inputs, layer):
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
    visual = inputs["input_ids"] == model.config.image_token_id
    return text_state_features(hidden, visual, inputs["attention_mask"].bool())


def test_text_state_features_are_mean_of_text_after_image_and_last_token():
    hidden = torch.arange(2 * 6 * 1, dtype=torch.float).view(2, 6, 1)
    visual = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    f = text_state_features(hidden, visual, real)
    assert f[0].tolist() == [3.5, 5.0]  # tokens 3, 4 (token 5 is the last)
    assert f[1].tolist() == [11.0, 11.0]  # no text between the image and the last token


def test_per_sample_exit_and_generate_equivalence(tmp_path):
    model = tiny_llava(text_layers=4)
    inputs = llava_inputs(model)
    target = _features_at(model, inputs, 1)[0]  # sample 0 exits after layer 1, sample 1 never
    gates = RuleGates(model.config.text_config.hidden_size, 4, 1, target)
    gates.save(tmp_path / "g")
    plan_gates = ExitGates.load(tmp_path / "g")
    assert all(
        torch.equal(a, b) for a, b in zip(plan_gates.state_dict().values(), gates.state_dict().values())
    )

    vtprune.wrap(model, "dyvte", gates=str(tmp_path / "g"))
    pruner = vtprune.get_pruner(model)
    pruner.engine.plan.gates = gates  # the rule, not the saved weights
    steps = 4
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    sel = pruner.last
    assert sel[0].layer_visual == [16, 16, 0, 0] and sel[1].layer_visual == [16] * 4
    assert pruner.engine.plan.exit_layer.tolist() == [1, -1]
    assert [s.exit_layer for s in sel] == [1, None]
    alive = alive_per_layer(pruner.engine, *inputs["input_ids"].shape)
    vtprune.unwrap(model)
    mask = inputs["attention_mask"]
    lm_inputs = capture_language_model_inputs(
        model, inputs | {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}
    )
    ref_tokens, ref_logits = greedy_masked_no_cache(model, lm_inputs, alive, steps)
    assert torch.equal(out.sequences[:, -steps:], ref_tokens)
    for got, want in zip(out.logits, ref_logits):
        torch.testing.assert_close(got.float(), want, atol=5e-5, rtol=1e-4)


def test_labels_training_and_loading_beside_the_model(tmp_path):
    model = tiny_llava(text_layers=3)
    model.save_pretrained(tmp_path / "m")
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    model.generation_config.eos_token_id = None
    batches = [llava_inputs(model, seed=s) for s in range(3)]
    data = collect_exit_data(model, batches, max_new_tokens=2)
    assert data.features.shape[:2] == (6, 3) and set(data.labels.unique().tolist()) <= {0, 1}
    # A label is 1 exactly when the static exit after that layer keeps the greedy answer.
    with torch.no_grad():
        base = model.generate(**batches[0], max_new_tokens=2, do_sample=False)
        vtprune.wrap(model, "static_exit", layer=1)
        exit1 = model.generate(**batches[0], max_new_tokens=2, do_sample=False)
        vtprune.unwrap(model)
    assert data.labels[:2, 0].tolist() == (base == exit1).all(-1).long().tolist()

    gates, report = train_gates(data, epochs=50)
    assert set(report["layers"]) == {0, 1}
    folder, _ = train_dyvte(model, batches, max_new_tokens=2, epochs=20)
    assert folder == tmp_path / "m" / "vtprune_dyvte" and (folder / "report.json").is_file()
    vtprune.wrap(model, "dyvte")  # finds the gates beside the model
    with torch.no_grad():
        model.generate(**batches[0], max_new_tokens=2, do_sample=False)
    assert len(vtprune.get_pruner(model).last) == 2


def test_missing_gates_give_a_clear_error(tmp_path):
    model = tiny_llava()
    with pytest.raises(FileNotFoundError, match="train-dyvte"):
        vtprune.wrap(model, "dyvte", gates=str(tmp_path))
    with pytest.raises(ValueError, match="not loaded from a local folder"):
        vtprune.wrap(model, "dyvte")
    assert not vtprune.is_wrapped(model)
