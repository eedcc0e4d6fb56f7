"""vtprune.speed and ``vtprune bench-prefill``: FLOPs counted with CPU SDPA, the FLOPs-ideal speed-up beside
the realised one, interleaved timing, the Qwen2-VL benchmark models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vtprune import cli, speed
from vtprune.eval.flops import prefill_flops
from vtprune.testing import TINY_FAMILIES


def test_flop_counter_counts_cpu_sdpa():
    """torch's counter has no formula for the CPU fused attention op; ours counts it as the CUDA one."""
    b, h, q, k, d = 2, 3, 17, 29, 8
    query, key, value = torch.randn(b, h, q, d), torch.randn(b, h, k, d), torch.randn(b, h, k, d)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(query, key, value)
    with speed.flop_counter() as ours:
        F.scaled_dot_product_attention(query, key, value)
    assert plain.get_total_flops() == 0  # what CPU counts missed
    assert ours.get_total_flops() == 4 * b * h * q * k * d  # QK^T and PV, 2 FLOPs per MAC


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_speedups_report_ideal_and_ratio(family, monkeypatch):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=4)
    inputs = tiny.inputs(model)
    order = []
    real = speed._time_once

    def spy(model, inputs, clock, run=speed._prefill):
        order.append("encoder" if run is speed._encode else getattr(model, "_vtprune", None) is not None)
        return real(model, inputs, clock, run)

    monkeypatch.setattr(speed, "_time_once", spy)
    settings = [{"method": "fastervlm", "keep_ratio": 0.25}, {"method": "static_exit", "layer": 2}]
    rows = speed.prefill_speedups(model, inputs, settings, repeats=2, clock="cpu")
    # interleaved: unpruned, then each setting, then the encoder alone, every repeat
    assert order == [False, True, True, "encoder"] * 2
    base, fastervlm, exit_ = rows
    assert (base.label, base.speedup, base.ideal, base.realised_vs_ideal) == ("unpruned", 1.0, 1.0, 1.0)
    for row in rows[1:]:
        assert 0 < row.flops < base.flops
        assert row.ideal == pytest.approx(base.flops / row.flops)
        assert row.realised_vs_ideal == pytest.approx(row.speedup / row.ideal)
        assert 0 < row.llm_flops_ratio < 1
    # the LLM ratio follows FastV's convention from the per-layer token counts
    dims = model.config.get_text_config()
    text = base.prompt_tokens - base.visual_tokens
    full = prefill_flops(text, [base.visual_tokens] * 4, dims.hidden_size, dims.intermediate_size)
    kept = prefill_flops(
        text, [exit_.visual_tokens * 2] * 2 + [0, 0], dims.hidden_size, dims.intermediate_size
    )
    assert exit_.llm_flops_ratio == pytest.approx(kept / full)
    # the encoder-timed ideal: the encoder's measured time fixed, the rest shrinking with its FLOPs
    enc = base.encoder
    assert 0 < enc["time_share"] < 1 and 0 < enc["flops_share"] < 1
    encoder_flops = enc["flops_share"] * base.flops
    for row in rows:
        rest = (row.flops - encoder_flops) / (base.flops - encoder_flops)
        want = base.median_s / (enc["median_s"] + (base.median_s - enc["median_s"]) * rest)
        assert row.ideal_timed_encoder == pytest.approx(want)
    table = speed.format_table(rows)
    assert "| realised speed-up | ideal speed-up (FLOPs) | realised / ideal | ideal, encoder timed |" in table
    assert len(table.splitlines()) == 2 + len(rows) + 2
    assert "vision encoder (unpruned)" in table.splitlines()[-1]


def test_prefill_speedups_without_flops():
    tiny = TINY_FAMILIES["llava"]
    model = tiny.build()
    rows = speed.prefill_speedups(
        model, tiny.inputs(model), [{"method": "random", "keep_ratio": 0.5}], 1, flops=False
    )
    assert rows[1].ideal is None and rows[1].realised_vs_ideal is None
    assert "| random keep_ratio=0.5 |" in speed.format_table(rows)


def test_counted_flops_follow_the_kept_tokens():
    """Counted FLOPs of FasterVLM fall by about what the LLM's token count says (vision encoder and probe
    unchanged), and the probe's own matmul is counted."""
    tiny = TINY_FAMILIES["qwen2_vl"]
    model = tiny.build(text_layers=4)
    inputs = tiny.inputs(model)
    full = speed.count_flops(model, inputs)
    import vtprune

    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    try:
        pruned = speed.count_flops(model, inputs)
    finally:
        vtprune.unwrap(model)
    assert 0 < pruned < full


def test_mid_qwen2_vl_inputs_have_576_visual_tokens():
    model = speed.mid_qwen2_vl()
    inputs = speed.bench_inputs(model, batch=2, text_tokens=40)
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 576
    assert inputs["pixel_values"].shape == (2 * 48 * 48, 3 * 2 * 14 * 14)
    assert inputs["input_ids"].shape == (2, 40 + 576 + 3)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, model.config.vision_config.depth) == (768, 16, 6)
    with pytest.raises(ValueError, match="no benchmark model"):
        speed.bench_model("llava", "13b")


def test_bench_prefill_cli(monkeypatch, tmp_path, capsys):
    """The command runs a family's model, prints realised, ideal and their ratio, and writes JSON."""
    tiny = TINY_FAMILIES["qwen2_vl"]
    built = {}

    def fake_model(family, size, device="cpu", dtype=torch.float32):
        built["args"] = (family, size)
        return tiny.build(text_layers=4)

    monkeypatch.setattr(speed, "bench_model", fake_model)
    monkeypatch.setattr(speed, "bench_inputs", lambda model, batch, text, device, dtype: tiny.inputs(model))
    out = tmp_path / "bench.json"
    code = cli.main(
        [
            "bench-prefill",
            "--family",
            "qwen2_vl",
            "--repeats",
            "1",
            "--clock",
            "cpu",
            "--settings",
            "fastervlm:keep_ratio=0.5,0.25",
            "none",
            "fastv:layer=2:keep_ratio=0.25",
            "--json",
            str(out),
        ]
    )
    assert code == 0 and built["args"] == ("qwen2_vl", "mid")
    printed = capsys.readouterr().out
    assert "| fastervlm keep_ratio=0.25 |" in printed and "| fastv layer=2 keep_ratio=0.25 |" in printed
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["prefill"]]
    assert labels == [
        "unpruned",
        "fastervlm keep_ratio=0.5",
        "fastervlm keep_ratio=0.25",
        "fastv layer=2 keep_ratio=0.25",
    ]
    for row in report["prefill"]:
        assert math.isclose(row["realised_vs_ideal"], row["speedup"] / row["ideal"])


def test_layer_throughput_rows():
    model = TINY_FAMILIES["qwen2_vl"].build()
    rows = speed.layer_throughput(model, [4, 16], repeats=1, clock="cpu")
    assert [r["tokens"] for r in rows] == [4, 16]
    assert rows[1]["gflops"] > rows[0]["gflops"] > 0
    assert max(r["relative"] for r in rows) == 1.0
