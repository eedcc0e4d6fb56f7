"""torch.compile of the decoding step: generate()'s compiled decode path with a static cache.

* compiled pruned generate() equals eager pruned generate() token for token (a fresh wrap for each, so that
  ``random`` draws the same selection);
* the whole decoding step is one graph: ``torch._dynamo.explain`` reports no graph break (a break would
  also be where a host sync hides: ``.item()`` / ``int(tensor)`` / a branch on a tensor), as for the
  unwrapped model.

The compiled generate uses the ``aot_eager`` backend (Dynamo capture + AOTAutograd, as inductor gets the
graph, without the C++ build that makes a CPU inductor compile take minutes); ``scripts/device_check.sh``
times inductor on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.testing import TINY_FAMILIES

CASES = [
    ("llava", {"method": "fastervlm", "keep_ratio": 0.3}),
    ("qwen2_vl", {"method": "fastervlm", "keep_ratio": 0.3}),
    ("llava", {"method": "static_exit", "layer": 1}),
    ("qwen2_vl", {"method": "fastv", "layer": 1, "keep_ratio": 0.3}),
]
GEN = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")


def _build(family):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=3)
    return model, tiny.inputs(model)


def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # generate() compiles on CUDA only unless told (a test flag)
    return config


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family,setting", CASES, ids=lambda v: v if isinstance(v, str) else v["method"])
def test_compiled_decode_equals_eager(family, setting):
    from torch._dynamo.utils import counters

    model, inputs = _build(family)
    with torch.no_grad():
        vtprune.wrap(model, setting)
        eager = model.generate(**inputs, **GEN)
        vtprune.unwrap(model)
        vtprune.wrap(model, setting)
        counters.clear()
        compiled = model.generate(**inputs, **GEN, compile_config=_compile_config())
        graphs = counters["stats"]["unique_graphs"]
        vtprune.unwrap(model)
    assert torch.equal(compiled, eager)
    # fullgraph=True raises on any break; one graph serves every decoding step (no recompile per token)
    assert graphs == 1, f"{graphs} graphs for the decoding steps"


def _decode_step(model, inputs):
    """The first decoding step of a static-cache generate(), replayable: the prefill call's kwargs, and a
    function preparing the decoding call's kwargs as generate() does (its mask preparation included)."""
    from transformers.masking_utils import create_masks_for_generate

    calls, masks = [], []
    shadow = model.__dict__.get("create_masks_for_generate")  # vtprune's, while wrapped
    prepare = shadow or getattr(model, "create_masks_for_generate", create_masks_for_generate)

    def record(**kwargs):
        masks.append(kwargs)
        return prepare(**kwargs)

    model.__dict__["create_masks_for_generate"] = record
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, **(GEN | {"max_new_tokens": 2}))
    finally:
        hook.remove()
        if shadow is None:
            del model.__dict__["create_masks_for_generate"]
        else:
            model.__dict__["create_masks_for_generate"] = shadow
    prefill, step = calls[0], calls[1]

    def prepared_step():
        return step | {"attention_mask": prepare(**masks[-1])}

    return prefill, prepared_step


@pytest.mark.parametrize(
    "family,setting", [CASES[0], CASES[3]], ids=lambda v: v if isinstance(v, str) else v["method"]
)
def test_decode_step_has_no_graph_break(family, setting):
    """The unwrapped model's decoding step is one graph with no break; so is the wrapped one's (a pre-LLM
    method on LLaVA; an in-LLM one, with per-layer masks and M-RoPE positions, on Qwen2-VL)."""
    model, inputs = _build(family)
    vtprune.wrap(model, setting)
    prefill, prepared_step = _decode_step(model, inputs)
    with torch.no_grad():
        prefill["cache"].reset()
        model(**prefill)
        explanation = torch._dynamo.explain(model)(**prepared_step())
    reasons = [
        f"{b.reason.splitlines()[0]} at "
        + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(b.user_stack[-4:]))
        for b in explanation.break_reasons
    ]
    in_vtprune = [r for r in reasons if "vtprune" in r or any(n in r for n in ("pruner.py", "compact.py"))]
    assert not in_vtprune, "\n".join(in_vtprune)
    assert explanation.graph_break_count == 0, "\n".join(reasons)
    assert explanation.graph_count == 1


def _lm_lengths(model):
    """Sequence lengths the first decoder layer receives (the compact prefill first)."""
    lengths = []
    layer = vtprune.get_pruner(model).family.decoder_layers[0]
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: lengths.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True
    )
    return lengths, hook


@pytest.mark.parametrize(
    "setting",
    [
        {"method": "fastervlm", "keep_ratio": 0.3},
        {"method": "fastv", "layer": 1, "keep_ratio": 0.3},  # the drop inside the LLM is padded too
    ],
    ids=lambda s: s["method"],
)
def test_pad_to_multiple_of_buckets_the_prefill_and_keeps_the_answer(setting):
    """Prompts of different lengths meet one prefill shape (a compiled model reuses its graph), and the
    masked padding changes no generated token."""
    from vtprune.testing import llava_inputs

    model, _ = _build("llava")
    shapes = {}
    for multiple in (None, 20):
        config = setting | ({"pad_to_multiple_of": multiple} if multiple else {})
        outs, seen = [], []
        for text in ((5, 9), (7, 12)):
            inputs = llava_inputs(model, text_lengths=text)
            vtprune.wrap(model, config)
            lengths, hook = _lm_lengths(model)
            engine = vtprune.get_pruner(model).engine
            try:
                with torch.no_grad():
                    outs.append(model.generate(**inputs, max_new_tokens=3, do_sample=False))
                # the shortened sequences: the compact prefill, or the rows left after an in-LLM drop
                short = [int(i.shape[1]) for i in engine.layer_index if i is not None] if engine else []
            finally:
                hook.remove()
                vtprune.unwrap(model)
            seen.append(tuple(short) if engine else (lengths[0],))
        shapes[multiple] = seen
        if multiple is None:
            plain = outs
        else:
            for got, want in zip(outs, plain):
                assert torch.equal(got, want)
    assert shapes[None][0] != shapes[None][1]  # without padding each prompt is its own shape
    assert shapes[20][0] == shapes[20][1] and all(n % 20 == 0 for n in shapes[20][0])


def test_pad_to_multiple_of_is_validated_and_travels_with_the_config():
    with pytest.raises(vtprune.UsageError, match="pad_to_multiple_of"):
        vtprune.FasterVLMConfig(pad_to_multiple_of=0)
    config = vtprune.FastVConfig(layer=1, pad_to_multiple_of=64)
    assert vtprune.PruneConfig.from_dict(config.to_dict()) == config
    assert "pad_to_multiple_of" not in vtprune.FastVConfig().to_dict()
    model, _ = _build("llava")
    with pytest.raises(vtprune.UsageError, match="different pad_to_multiple_of"):
        vtprune.wrap(
            model,
            [{"method": "fastervlm", "pad_to_multiple_of": 8}, {"method": "fastv", "pad_to_multiple_of": 16}],
        )
    assert not vtprune.is_wrapped(model)
