"""CrossLMM: untrained adapters equal pooling bit for bit; with adapters active, generate equals a no-cache
step-by-step recomputation; the adapter against plain loops; training resumes after a kill to the same
weights; save / load. The contract matrix (tests/contract/test_matrix.py) adds every family and unwrap."""

from __future__ import annotations

import math

import pytest
import torch

import vtprune
from vtprune.methods.crosslmm import CrossLMMAdapters, CrossLMMConfig, DualCrossAttention
from vtprune.runtime.adapters import AdapterContext
from vtprune.testing import TINY_FAMILIES, llava_inputs, tiny_llava
from vtprune.tune import crosslmm as tune

TOKENS = 4


def _build(family="llava", attn="sdpa"):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(attn_implementation=attn, text_layers=4)
    return model, tiny.inputs(model)


def _active_adapters(model, every=2, seed=3):
    """Random adapters with open gates (trained ones look like this: non-zero gates)."""
    torch.manual_seed(seed)
    adapters = CrossLMMAdapters.for_model(model, every=every)
    with torch.no_grad():
        for block in adapters.blocks.values():
            block.v2v.gate.fill_(0.9)
            block.t2v.gate.fill_(-0.7)
    return adapters


def _generate(model, inputs, config, steps=4, cache="dynamic"):
    vtprune.wrap(model, config)
    try:
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **extra,
            )
    finally:
        vtprune.unwrap(model)
    return out.sequences[:, -steps:], [x.float() for x in out.logits]


def _no_cache_steps(model, inputs, config, steps=4):
    """Greedy decoding by full recomputation: the wrapped model re-runs the whole (growing) prompt without a
    cache at every step, so every token reads the kept-aside features through a fresh prefill."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("mm_token_type_ids")
    tokens, logits = [], []
    vtprune.wrap(model, config)
    try:
        for _ in range(steps):
            kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            kwargs |= {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
            if types is not None:
                kwargs["mm_token_type_ids"] = types
            else:  # as generate() does for left padding
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with torch.no_grad():
                step = model(**kwargs).logits[:, -1].float()
            nxt = step.argmax(-1)
            tokens.append(nxt)
            logits.append(step)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if types is not None:
                types = torch.cat([types, torch.zeros_like(types[:, :1])], 1)
    finally:
        vtprune.unwrap(model)
    return torch.stack(tokens, 1), logits


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_untrained_adapters_equal_pooling_bit_for_bit(family):
    model, inputs = _build(family)
    adapters = CrossLMMAdapters.for_model(model, every=1)  # fresh: every gate at 0
    pool = {"method": "pool", "tokens": TOKENS}
    cross = CrossLMMConfig(tokens=TOKENS, adapters=adapters)
    for config in (pool, cross):
        vtprune.wrap(model, config)
        with torch.no_grad():
            logits = model(**inputs).logits
        vtprune.unwrap(model)
        if config is pool:
            want = logits
    assert torch.equal(logits, want)
    seq_pool, logits_pool = _generate(model, inputs, pool)
    seq_cross, logits_cross = _generate(model, inputs, cross)
    assert torch.equal(seq_cross, seq_pool)
    assert all(torch.equal(a, b) for a, b in zip(logits_cross, logits_pool))


@pytest.mark.parametrize(
    "family,attn,cache",
    [
        ("llava", "sdpa", "dynamic"),
        ("llava", "sdpa", "static"),
        ("llava", "eager", "dynamic"),
        ("llava", "eager", "static"),
        ("qwen2_vl", "sdpa", "static"),
    ],
)
def test_generate_with_active_adapters_equals_no_cache_recomputation(family, attn, cache):
    model, inputs = _build(family, attn)
    config = CrossLMMConfig(tokens=TOKENS, adapters=_active_adapters(model))
    tokens, logits = _generate(model, inputs, config, cache=cache)
    ref_tokens, ref_logits = _no_cache_steps(model, inputs, config)
    assert torch.equal(tokens, ref_tokens)
    for got, want in zip(logits, ref_logits):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    _, pool_logits = _generate(model, inputs, {"method": "pool", "tokens": TOKENS}, cache=cache)
    assert not torch.allclose(logits[-1], pool_logits[-1], atol=1e-3)  # the adapters did something


def _loop_reference(block: DualCrossAttention, hidden, ctx: AdapterContext):
    """Per sample, per token, per head: softmax attention over that sample's own feature rows."""
    out = torch.zeros_like(hidden)
    for b in range(hidden.shape[0]):
        feats = block.kv_norm(ctx.features[b][ctx.feature_mask[b]])
        if feats.shape[0] == 0:
            continue
        for s in range(hidden.shape[1]):
            if ctx.real is not None and not ctx.real[b, s]:
                continue
            path = block.v2v if ctx.visual is not None and ctx.visual[b, s] else block.t2v
            x = block.norm(hidden[b, s])
            heads, d = path.heads, path.head_dim
            q, k, v = (
                path.q(x).view(heads, d),
                path.k(feats).view(-1, heads, d),
                path.v(feats).view(-1, heads, d),
            )
            mixed = [torch.softmax(k[:, h] @ q[h] / math.sqrt(d), 0) @ v[:, h] for h in range(heads)]
            out[b, s] = torch.tanh(path.gate) * path.o(torch.cat(mixed))
    return out


@pytest.mark.parametrize("seq", [1, 12])  # 1: the absorbed form (decode), 12: projected keys / values
def test_adapter_equals_a_plain_loop(seq):
    torch.manual_seed(0)
    block = DualCrossAttention(hidden=16, dim=16, heads=2)
    with torch.no_grad():
        block.v2v.gate.fill_(0.5)
        block.t2v.gate.fill_(-1.2)
    features = torch.randn(3, 10, 16)
    feature_mask = torch.zeros(3, 10, dtype=torch.bool)
    feature_mask[0, :10], feature_mask[1, :6] = True, True  # sample 2 has no image
    hidden = torch.randn(3, seq, 16)
    visual = torch.rand(3, seq) < 0.4 if seq > 1 else None
    real = torch.ones(3, seq, dtype=torch.bool)
    real[1, : seq // 3] = False  # left padding
    ctx = AdapterContext(features, feature_mask, visual, real if seq > 1 else None, prefill=seq > 1)
    with torch.no_grad():
        got = block(hidden, ctx)
        want = _loop_reference(block, hidden, ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_adapters_stay_outside_the_model_and_skip_calls_without_a_pruned_prefill():
    model, inputs = _build()
    keys = set(model.state_dict())
    vtprune.wrap(model, CrossLMMConfig(tokens=TOKENS, adapters=_active_adapters(model)))
    try:
        assert set(model.state_dict()) == keys
        text = {"input_ids": inputs["input_ids"][:, -3:], "attention_mask": inputs["attention_mask"][:, -3:]}
        with torch.no_grad():
            wrapped = model(**text).logits
    finally:
        vtprune.unwrap(model)
    with torch.no_grad():
        assert torch.equal(wrapped, model(**text).logits)


def test_save_load_round_trip_and_clear_errors(tmp_path):
    model, inputs = _build()
    adapters = _active_adapters(model)
    folder = adapters.save(tmp_path / "adapters")
    loaded = CrossLMMAdapters.load(folder)
    assert loaded.config_dict() == adapters.config_dict()
    state = adapters.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    seq_mem, logits_mem = _generate(model, inputs, CrossLMMConfig(tokens=TOKENS, adapters=adapters))
    seq_disk, logits_disk = _generate(
        model, inputs, {"method": "crosslmm", "tokens": TOKENS, "adapters": str(folder)}
    )
    assert torch.equal(seq_mem, seq_disk)
    assert all(torch.equal(a, b) for a, b in zip(logits_mem, logits_disk))
    with pytest.raises(vtprune.UsageError, match="train-crosslmm"):
        vtprune.wrap(model, "crosslmm", adapters=str(tmp_path / "missing"))
    with pytest.raises(vtprune.UsageError, match="local folder"):
        vtprune.wrap(model, "crosslmm")  # a model built in memory has no folder to look beside
    other = CrossLMMAdapters.for_model(tiny_llava(text_layers=2)).save(tmp_path / "other")
    with pytest.raises(vtprune.UsageError, match="2-layer"):
        vtprune.wrap(model, "crosslmm", adapters=str(other))
    assert not vtprune.is_wrapped(model)


def _training_batches():
    model = tiny_llava(text_layers=2)
    batches = []
    for seed in range(3):
        batch = llava_inputs(model, text_lengths=(5, 8), seed=seed)
        batch["target_lengths"] = torch.tensor([2, 3])  # the last tokens of each row are the answer
        batches.append(batch)
    return model, batches


def test_training_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch):
    model, batches = _training_batches()
    kwargs = dict(
        tokens=(4, 1), every=1, steps=6, lr=1e-2, warmup=2, seed=5, checkpoint_every=2, progress=False
    )
    straight, report = tune.train_crosslmm(model, batches, tmp_path / "straight", **kwargs)
    assert report["parameters"] == CrossLMMAdapters.load(straight).num_parameters()

    calls, original = [], tune._answer_loss

    def killed_at_step_4(model, batch):  # dies between the checkpoints after steps 2 and 4
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(model, batch)

    monkeypatch.setattr(tune, "_answer_loss", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        tune.train_crosslmm(model, batches, tmp_path / "resumed", **kwargs)
    monkeypatch.undo()
    assert (tmp_path / "resumed" / tune.CHECKPOINT).is_file()
    assert not vtprune.is_wrapped(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(vtprune.UsageError, match="other settings"):
        tune.train_crosslmm(model, batches, tmp_path / "resumed", **(kwargs | {"lr": 1e-3}))
    resumed, _ = tune.train_crosslmm(model, batches, tmp_path / "resumed", **kwargs)

    a, b = CrossLMMAdapters.load(straight).state_dict(), CrossLMMAdapters.load(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(g["t2v"] != 0 for g in report["gates"].values())  # it trained
    assert not (tmp_path / "resumed" / tune.CHECKPOINT).exists()
