"""The public surface: configs, wrap/unwrap verbs, and clear errors for bad input."""

import json

import pytest
import torch

import vtprune
from vtprune import FasterVLMConfig, PruneConfig, RandomConfig
from vtprune.testing import llava_inputs, tiny_llava


def test_wrap_returns_same_model_and_exposes_selection():
    model = tiny_llava()
    assert vtprune.wrap(model, "fastervlm", keep_ratio=0.5) is model
    assert vtprune.is_wrapped(model)
    with torch.no_grad():
        model(**llava_inputs(model))
    pruner = vtprune.get_pruner(model)
    assert isinstance(pruner.config, FasterVLMConfig) and pruner.config.keep_ratio == 0.5
    assert [s.visual_out for s in pruner.last] == [8, 8]
    assert vtprune.unwrap(model) is model


@pytest.mark.parametrize(
    "config", [FasterVLMConfig(keep_ratio=0.1, vision_layer=-3), RandomConfig(keep_ratio=0.7, seed=3)]
)
def test_config_json_round_trip(config, tmp_path):
    path = tmp_path / "c.json"
    config.to_json(path)
    back = PruneConfig.from_json(path)
    assert back == config and type(back) is type(config)
    assert PruneConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["method"] == config.method


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.5", True])
def test_bad_keep_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        FasterVLMConfig(keep_ratio=ratio)


def test_bad_input_gives_clear_errors():
    model = tiny_llava()
    with pytest.raises(ValueError, match="unknown pruning method 'fastest'.*fastervlm"):
        vtprune.wrap(model, "fastest")
    with pytest.raises(TypeError, match="no option"):
        vtprune.wrap(model, "fastervlm", keep_rate=0.5)
    with pytest.raises(ValueError, match="positions"):
        vtprune.wrap(model, "fastervlm", positions="shuffled")
    with pytest.raises(ValueError, match="unknown field"):
        PruneConfig.from_dict({"method": "random", "keep_ratio": 0.5, "sed": 1})
    with pytest.raises(ValueError, match="'method' key"):
        PruneConfig.from_dict({"keep_ratio": 0.5})
    with pytest.raises(ValueError, match="not wrapped"):
        vtprune.unwrap(model)
    vtprune.wrap(model, "random")
    with pytest.raises(RuntimeError, match="already wrapped"):
        vtprune.wrap(model, "fastervlm")
    vtprune.unwrap(model)
    config = FasterVLMConfig()
    config.keep_ratio = 3.0  # mutated after construction: validated again at wrap
    with pytest.raises(ValueError, match="keep_ratio"):
        vtprune.wrap(model, config)
    assert not vtprune.is_wrapped(model)


def test_unsupported_model_type_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
        )
    )
    with pytest.raises(NotImplementedError, match="model_type 'llama' is not supported.*llava"):
        vtprune.wrap(text_only, "fastervlm")
    with pytest.raises(TypeError, match="transformers model"):
        vtprune.wrap(torch.nn.Linear(2, 2), "fastervlm")


def test_vision_layer_out_of_range_and_failed_wrap_leaves_model_clean():
    model = tiny_llava()
    with pytest.raises(ValueError, match="out of range"):
        vtprune.wrap(model, "fastervlm", vision_layer=10)
    assert not vtprune.is_wrapped(model)
    assert "forward" not in model.model.__dict__


def test_pre_encoded_features_without_scores_are_rejected():
    model = tiny_llava()
    inputs = llava_inputs(model)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], return_dict=True)  # before wrap
    vtprune.wrap(model, "fastervlm")
    pixel_values = inputs.pop("pixel_values")
    with pytest.raises(ValueError, match="carry no vtprune scores"):
        model(**inputs, mm_encoder_outputs={"image": feats})
    # Features encoded after wrapping carry their scores and give the same result as pixel_values.
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, return_dict=True)
        a = model(**inputs, mm_encoder_outputs={"image": feats}).logits
        b = model(**inputs, pixel_values=pixel_values).logits
    torch.testing.assert_close(a, b)


def test_random_differs_from_fastervlm_and_is_seeded():
    model = tiny_llava()
    inputs = llava_inputs(model)

    def kept(method, **kw):
        vtprune.wrap(model, method, keep_ratio=0.25, **kw)
        with torch.no_grad():
            model(**inputs)
        out = [s.kept_visual for s in vtprune.get_pruner(model).last]
        vtprune.unwrap(model)
        return out

    assert all(torch.equal(a, b) for a, b in zip(kept("random", seed=1), kept("random", seed=1)))
    assert not all(torch.equal(a, b) for a, b in zip(kept("random", seed=1), kept("random", seed=2)))


def test_keep_count_rounding_matches_paper_counts():
    from vtprune.runtime.selection import keep_count

    assert [keep_count(576, r) for r in (0.25, 0.1, 0.05)] == [144, 58, 29]
    assert keep_count(3, 0.01) == 1


def test_budget_modes_are_the_familys():
    model = tiny_llava()
    inputs = llava_inputs(model)
    with pytest.raises(vtprune.UsageError, match=r"budget='tile' is not offered for llava.*'image'"):
        vtprune.wrap(model, "fastervlm", budget="tile")
    assert not vtprune.is_wrapped(model)
    with torch.no_grad():
        vtprune.wrap(model, "fastervlm", keep_ratio=0.5, budget="image")
        model(**inputs)
    assert [s.visual_out for s in vtprune.get_pruner(model).last] == [8, 8]


def test_feature_layer_zero_and_full_strategy_are_handled_clearly():
    model = tiny_llava()
    model.config.vision_feature_layer = (
        0  # hidden_states[0]: the patch embeddings, no attention produced them
    )
    with pytest.raises(vtprune.UsageError, match="patch embeddings"):
        vtprune.wrap(model, "fastervlm")
    assert not vtprune.is_wrapped(model)
    vtprune.wrap(model, "fastervlm", vision_layer=1)  # an explicit layer is fine
    vtprune.unwrap(model)
    model = tiny_llava()
    model.config.vision_feature_select_strategy = "full"  # [CLS] is a visual token: nothing needs refusing
    for config in ({"method": "static_exit", "layer": 1}, {"method": "fastv", "layer": 1}, "fastervlm"):
        vtprune.wrap(model, config)
        vtprune.unwrap(model)
