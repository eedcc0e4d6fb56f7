"""vtprune eval's comparison columns (issue 15): answer loyalty to the unpruned model, visual tokens at the LLM
input and averaged over layers, per-setting selection overhead, and composed settings in --methods (parsing,
labels, wrap, resume fingerprints, refusal before computing)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from eval_stubs import StubAnswerer, StubBenchmark

import vtprune
from vtprune.errors import UsageError
from vtprune.eval import harness
from vtprune.eval.harness import EvalRun, parse_settings, run_eval, setting_labels
from vtprune.runtime.timing import Stopwatch
from vtprune.testing import TINY_FAMILIES, tiny_llava

COMPOSED = "fastervlm:keep_ratio=0.5+static_exit:layer=1"
COMPOSED_LABEL = "fastervlm-keep_ratio=0.5+static_exit-layer=1"


def make_run(out, settings, *, answerer=None, n=10, model=None):
    bench = StubBenchmark(n)
    return EvalRun(
        model=model or tiny_llava(),
        answer=answerer or StubAnswerer(),
        benchmarks={"stub": (bench, bench.samples)},
        settings=parse_settings(settings),
        out=Path(out),
        batch_size=4,
        warmup=0,
    )


def records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


# ------------------------------------------------------------------------------------------------ parsing
def test_composed_specs_parse_to_lists_with_a_grid_and_labels():
    settings = parse_settings(
        [
            "fastervlm:keep_ratio=0.5,0.25+fastv:layer=1",
            '[{"method": "pool", "tokens": 4}, {"method": "static_exit", "layer": 1}]',
            "dyvte:gates=/tmp/a+b:threshold=0.5",  # a '+' inside a value is not a composition
            "pdrop:layers=[1,2],[0.5]:ratio=0.5",  # commas inside a JSON list do not split values
        ]
    )
    assert settings == [
        [{"method": "fastervlm", "keep_ratio": 0.5}, {"method": "fastv", "layer": 1}],
        [{"method": "fastervlm", "keep_ratio": 0.25}, {"method": "fastv", "layer": 1}],
        [{"method": "pool", "tokens": 4}, {"method": "static_exit", "layer": 1}],
        {"method": "dyvte", "gates": "/tmp/a+b", "threshold": 0.5},
        {"method": "pdrop", "layers": [1, 2], "ratio": 0.5},
        {"method": "pdrop", "layers": [0.5], "ratio": 0.5},
    ]
    assert setting_labels(settings[:3]) == [
        "fastervlm-keep_ratio=0.5+fastv-layer=1",
        "fastervlm-keep_ratio=0.25+fastv-layer=1",
        "pool-tokens=4+static_exit-layer=1",
    ]
    with pytest.raises(UsageError, match="'none' cannot be composed"):
        parse_settings(["none+fastv:layer=1"])
    with pytest.raises(UsageError, match="keep_ratio"):
        parse_settings(["fastervlm:keep_ratio=2+fastv:layer=1"])
    with pytest.raises(UsageError, match="two or more"):
        parse_settings(['[{"method": "fastv"}]'])


# ------------------------------------------------------------------------------------ a run with every column
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    settings = ["none", "fastervlm:keep_ratio=0.25", COMPOSED, "dart:layer=1:keep_ratio=0.5"]
    rows = run_eval(make_run(out, settings), progress=False)
    return out, {r["setting"]: r for r in rows}


def test_loyalty_is_the_share_of_answers_equal_to_the_unpruned_ones(compared):
    out, rows = compared
    base = records(out / "stub" / "none.jsonl")
    assert rows["none"]["loyalty"] == 1.0
    for label in ("fastervlm-keep_ratio=0.25", COMPOSED_LABEL, "dart-layer=1-keep_ratio=0.5"):
        recs = records(out / "stub" / f"{label}.jsonl")
        same = [recs[i]["prediction"] == base[i]["prediction"] for i in base]
        assert rows[label]["loyalty"] == pytest.approx(sum(same) / len(same))
    assert 0 < rows["fastervlm-keep_ratio=0.25"]["loyalty"] < 1  # the stub's answers do change
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"loyalty", "visual_tokens_input", "visual_tokens_mean", "selection_ms"} <= set(header)


def test_tokens_at_the_llm_input_and_over_layers(compared):
    _, rows = compared
    # 16 visual tokens, 2 decoder layers
    assert (rows["none"]["visual_tokens_input"], rows["none"]["visual_tokens_mean"]) == (16, 16)
    assert (rows["fastervlm-keep_ratio=0.25"]["visual_tokens_input"], rows["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == (4, 4)  # fmt: skip
    assert (rows[COMPOSED_LABEL]["visual_tokens_input"], rows[COMPOSED_LABEL]["visual_tokens_mean"]) == (8, 4)
    assert (rows["dart-layer=1-keep_ratio=0.5"]["visual_tokens_input"], rows["dart-layer=1-keep_ratio=0.5"]["visual_tokens_mean"]) == (16, 12)  # fmt: skip


def test_selection_overhead_is_measured_per_pruned_setting(compared):
    out, rows = compared
    assert rows["none"]["selection_ms"] is None
    for label in ("fastervlm-keep_ratio=0.25", COMPOSED_LABEL, "dart-layer=1-keep_ratio=0.5"):
        assert 0 < rows[label]["selection_ms"] < rows[label]["ttft_ms"]
        assert all(r["selection_s"] > 0 for r in records(out / "stub" / f"{label}.jsonl").values())
    assert "selection_ms: per batch (median)" in (out / "summary.md").read_text()


def test_a_composed_setting_runs_the_composed_wrap_and_resumes_by_fingerprint(compared, tmp_path):
    out, _ = compared
    recs = records(out / "stub" / f"{COMPOSED_LABEL}.jsonl")
    assert all(r["visual_per_layer"] == [8, 0] for r in recs.values())
    # the same answers as the library call the composed setting stands for
    model, bench = tiny_llava(), StubBenchmark(10)
    vtprune.wrap(model, [{"method": "fastervlm", "keep_ratio": 0.5}, {"method": "static_exit", "layer": 1}])
    for i in range(0, 10, 4):
        predictions, _ = StubAnswerer()(bench.samples[i : i + 4], model, bench.generation_kwargs)
        for sample, pred in zip(bench.samples[i : i + 4], predictions):
            assert recs[sample.id]["prediction"] == pred
    vtprune.unwrap(model)
    stream = json.loads((out / "run.json").read_text())["streams"][f"stub/{COMPOSED_LABEL}"]
    assert stream["setting"] == [
        {"method": "fastervlm", "keep_ratio": 0.5},
        {"method": "static_exit", "layer": 1},
    ]
    answerer = StubAnswerer()  # a rerun of the same run resumes: nothing to compute
    rows = run_eval(make_run(out, ["none", COMPOSED], answerer=answerer), progress=False)
    assert answerer.calls == 0 and {r["setting"] for r in rows} == {"none", COMPOSED_LABEL}


def test_without_none_loyalty_is_blank_and_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "plot_pareto", lambda *args, **kwargs: [])
    rows = run_eval(make_run(tmp_path, ["fastervlm:keep_ratio=0.5"], n=4), progress=False)
    assert rows[0]["loyalty"] is None
    assert (
        "loyalty (share of samples whose answer equals the unpruned `none` answer"
        in (tmp_path / "summary.md").read_text()
    )
    with open(tmp_path / "summary.csv") as f:
        assert next(csv.DictReader(f))["loyalty"] == ""


@pytest.mark.parametrize(
    "spec,message",
    [
        ("fastervlm:keep_ratio=0.5+random:keep_ratio=0.5", "cannot compose fastervlm and random"),
        ("pdrop:layers=[1,5]", r"within 1\.\.1"),
    ],
)
def test_what_only_the_model_can_refuse_stops_the_run_before_computing(tmp_path, spec, message):
    answerer = StubAnswerer()
    with pytest.raises(UsageError, match=message):
        run_eval(make_run(tmp_path, ["none", spec], answerer=answerer), progress=False)
    assert answerer.calls == 0


# ------------------------------------------------------------------------------------------------ stopwatch
def test_the_stopwatch_times_outermost_regions_and_the_pruner_times_its_selection():
    watch = Stopwatch()
    with watch:
        with watch:  # nested: counted once
            pass
    assert watch.calls == 1 and watch.seconds > 0
    watch.reset()
    assert (watch.calls, watch.seconds) == (0, 0.0)
    tiny = TINY_FAMILIES["llava"]
    model = tiny.build(text_layers=4)
    inputs = tiny.inputs(model)
    for config, regions in (({"method": "fastervlm", "keep_ratio": 0.5}, 2), ({"method": "dart"}, 2)):
        vtprune.wrap(model, config)
        watch = vtprune.get_pruner(model).stopwatch
        with torch.no_grad():
            model(**inputs)
        # fastervlm: the [CLS] probe, then token scores + scorer + keep rule; dart: the key probe, the plan
        assert watch.calls >= regions and watch.seconds > 0, config
        vtprune.unwrap(model)
