"""vtprune eval's harness: settings grid, JSONL as it goes, resume after a kill, reports, data parallel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_stubs import StubAnswerer, StubBenchmark

from vtprune.eval.flops import layer_flops, prefill_flops
from vtprune.eval.harness import EvalRun, parse_settings, run_eval, setting_label
from vtprune.testing import tiny_llava

SETTINGS = ["none", "fastervlm:keep_ratio=0.5,0.25", "static_exit:layer=1"]


def make_run(out, answerer=None, n=10, batch_size=4):
    bench = StubBenchmark(n)
    return EvalRun(
        model=tiny_llava(),
        answer=answerer or StubAnswerer(),
        benchmarks={"stub": (bench, bench.samples)},
        settings=parse_settings(SETTINGS),
        out=Path(out),
        batch_size=batch_size,
        warmup=0,
    )


def test_parse_settings_grid_and_errors():
    s = parse_settings(
        ["none", "fastervlm:keep_ratio=0.5,0.25", "fastv:layer=2,3:keep_ratio=0.5", '{"method": "random"}']
    )
    assert s == [
        {"method": "none"},
        {"method": "fastervlm", "keep_ratio": 0.5},
        {"method": "fastervlm", "keep_ratio": 0.25},
        {"method": "fastv", "layer": 2, "keep_ratio": 0.5},
        {"method": "fastv", "layer": 3, "keep_ratio": 0.5},
        {"method": "random"},
    ]
    assert setting_label(s[1]) == "fastervlm-keep_ratio=0.5"
    with pytest.raises(ValueError, match="unknown pruning method"):
        parse_settings(["fastest:keep_ratio=0.5"])
    with pytest.raises(ValueError, match="keep_ratio"):
        parse_settings(["fastervlm:keep_ratio=2"])
    with pytest.raises(ValueError, match="key=value"):
        parse_settings(["fastervlm:0.5"])


def test_flops_convention():
    assert layer_flops(10, 4, 8, gated=False) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8
    assert layer_flops(10, 4, 8) == 4 * 10 * 16 + 2 * 100 * 4 + 3 * 10 * 4 * 8
    assert prefill_flops(5, [5, 0], 4, 8) == layer_flops(10, 4, 8) + layer_flops(5, 4, 8)


def test_run_writes_jsonl_summary_and_plot(tmp_path):
    rows = run_eval(make_run(tmp_path), progress=False)
    assert [r["setting"] for r in rows] == [
        "none",
        "fastervlm-keep_ratio=0.5",
        "fastervlm-keep_ratio=0.25",
        "static_exit-layer=1",
    ]
    recs = [
        json.loads(x)
        for x in (tmp_path / "stub" / "fastervlm-keep_ratio=0.25.jsonl").read_text().splitlines()
    ]
    assert len(recs) == 10 and {r["id"] for r in recs} == {f"q{i}" for i in range(10)}
    assert all(r["visual_per_layer"] == [4, 4] and r["visual_in"] == 16 for r in recs)
    exit_recs = [
        json.loads(x) for x in (tmp_path / "stub" / "static_exit-layer=1.jsonl").read_text().splitlines()
    ]
    assert all(r["visual_per_layer"] == [16, 0] for r in exit_recs)
    by = {r["setting"]: r for r in rows}
    assert by["none"]["flops_ratio"] == 1.0 and by["none"]["speedup"] == 1.0
    assert by["fastervlm-keep_ratio=0.25"]["flops_ratio"] < by["fastervlm-keep_ratio=0.5"]["flops_ratio"] < 1
    assert 0 <= by["none"]["accuracy"] <= 1
    for name in ("summary.md", "summary.csv", "pareto.png", "run.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "run.json").read_text())["flops_convention"].startswith("FastV")


def test_killed_run_resumes_without_redoing_or_losing_samples(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_eval(make_run(tmp_path, StubAnswerer(fail_after=2)), progress=False)
    first = (tmp_path / "stub" / "none.jsonl").read_text().splitlines()
    assert len(first) == 8  # two batches of four made it to disk
    answerer = StubAnswerer()
    run_eval(make_run(tmp_path, answerer), progress=False)
    assert answerer.calls == 1 + 3 * 3  # the remaining 'none' batch + three batches of each other setting
    lines = (tmp_path / "stub" / "none.jsonl").read_text().splitlines()
    assert lines[:8] == first and len({json.loads(x)["id"] for x in lines}) == len(lines) == 10
    reference = tmp_path / "ref"
    run_eval(make_run(reference), progress=False)
    preds = lambda p: {json.loads(x)["id"]: json.loads(x)["prediction"] for x in p.read_text().splitlines()}  # noqa: E731
    for label in ("none", "fastervlm-keep_ratio=0.25"):
        assert preds(tmp_path / "stub" / f"{label}.jsonl") == preds(reference / "stub" / f"{label}.jsonl")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    script = Path(__file__).parent / "eval_accelerate_script.py"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path / "two"),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True, timeout=600)
    for label in ("none", "fastervlm-keep_ratio=0.25"):
        two = sorted((tmp_path / "two" / "stub").glob(f"{label}.rank*.jsonl"))
        assert len(two) == 2
        get = lambda paths: {  # noqa: E731
            json.loads(x)["id"]: json.loads(x)["prediction"]
            for p in paths
            for x in p.read_text().splitlines()
        }
        assert get(two) == get([tmp_path / "one" / "stub" / f"{label}.jsonl"])
    s1 = (tmp_path / "one" / "summary.csv").read_text().splitlines()[0]
    assert s1 == (tmp_path / "two" / "summary.csv").read_text().splitlines()[0]
