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
