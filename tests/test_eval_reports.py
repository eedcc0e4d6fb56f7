"""What ``vtprune eval`` writes and says it wrote (issue 17, item 6): breakdowns per question type / POPE split /
MME subtask, a Pareto plot with one metric per axis and labelled points, and no claim of a plot that is not
there."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from eval_stubs import StubAnswerer, StubSample

from vtprune.cli import main
from vtprune.eval import harness
from vtprune.eval.benchmarks import get_benchmark
from vtprune.eval.harness import EvalRun, parse_settings, plot_pareto, run_eval, write_reports
from vtprune.testing import tiny_llava

HUB = Path(__file__).parent / "fixtures" / "hub"
SOURCES = {"mme": "lmms-lab__MME", "pope": "lmms-lab__POPE", "synthetic": "vtprune__synthetic_vqa"}


class TruthAnswerer:
    """Ground truth as the answers; timing and token counts from the stub."""

    def __init__(self):
        self.stub = StubAnswerer()

    def __call__(self, samples, model, generation_kwargs=None):
        stubs = [StubSample(id=s.id, prompt="", target="", seed=i) for i, s in enumerate(samples)]
        _, stats = self.stub(stubs, model, {"max_new_tokens": 1})
        return [s.target[0] if isinstance(s.target, list) else s.target.capitalize() for s in samples], stats


def test_breakdowns_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "plot_pareto", lambda *args, **kwargs: [])
    benches = {}
    for name, folder in SOURCES.items():
        bench = get_benchmark(name)
        benches[name] = (bench, bench.load(source=HUB / folder))
    run = EvalRun(
        model=tiny_llava(),
        answer=TruthAnswerer(),
        benchmarks=benches,
        settings=parse_settings(["none"]),
        out=tmp_path,
        batch_size=8,
        warmup=0,
    )
    summary = run_eval(run, progress=False)
    assert {"breakdown.md", "breakdown.csv"} <= set(summary.files)
    rows = {
        (r["benchmark"], r["setting"], r["group"], r["key"], r["metric"]): float(r["value"])
        for r in csv.DictReader(open(tmp_path / "breakdown.csv"))
    }
    assert rows[("mme", "none", "subtasks", "existence", "score")] == 200.0
    assert rows[("mme", "none", "subtasks", "code_reasoning", "acc_plus")] == 1.0
    assert rows[("pope", "none", "splits", "adversarial", "f1")] == 1.0
    assert rows[("pope", "none", "splits", "random", "accuracy")] == 1.0
    assert rows[("synthetic", "none", "by_type", "count", "")] == 1.0
    md = (tmp_path / "breakdown.md").read_text()
    for heading in ("## mme: subtasks", "## pope: splits", "## synthetic: by_type"):
        assert heading in md
    assert "| setting | color | count | position | shape |" in md
    assert "| none | existence | 200 |" in md


def _rows():
    def row(bench, setting, metric, value, speedup, flops):
        return {
            "benchmark": bench,
            "setting": setting,
            metric: value,
            "speedup": speedup,
            "flops_ratio": flops,
        }

    return [
        row("synthetic", "none", "exact_match", 0.9, 1.0, 1.0),
        row("synthetic", "fastervlm-keep_ratio=0.5", "exact_match", 0.8, 1.5, 0.6),
        row("synthetic", "fastervlm-keep_ratio=0.25", "exact_match", 0.7, 2.0, 0.4),
        row("pope", "fastervlm-keep_ratio=0.25", "f1", 0.85, None, 0.4),  # no `none` run for POPE
        row("mme", "none", "perception", 1500.0, 1.0, 1.0),
        row("mme", "static_exit-layer=2", "perception", 1400.0, 1.2, 0.7),
    ]


def test_pareto_has_one_metric_per_axis_labelled_points_and_says_when_none_is_missing(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    main_metrics = {"synthetic": "exact_match", "pope": "f1", "mme": "perception"}
    notes = plot_pareto(tmp_path / "pareto.png", _rows(), main_metrics=main_metrics)
    assert (tmp_path / "pareto.png").stat().st_size > 0
    axes = figures[0].axes
    assert [ax.get_ylabel() for ax in axes] == [f"{b}: {m}" for b, m in main_metrics.items() for _ in (0, 1)]
    labels = {t.get_text() for ax in axes[:2] for t in ax.texts}
    assert labels == {"none", "keep_ratio=0.5", "keep_ratio=0.25"}
    pope_speed, pope_flops = axes[2], axes[3]
    assert not pope_speed.lines and "`none`" in pope_speed.texts[0].get_text()  # said, not silently empty
    assert len(pope_flops.lines) == 1
    assert {t.get_text() for t in axes[5].texts} == {"none", "layer=2"}
    assert notes == ["pareto.png: pope has no speed-up plot (no `none` setting)"]
    files, notes = write_reports(tmp_path, _rows(), main_metrics=main_metrics)
    assert files == ["summary.md", "summary.csv", "pareto.png"]
    summary = (tmp_path / "summary.md").read_text()
    assert "pope: speedup is blank: the unpruned baseline `none` is not among the settings" in summary


def test_cli_says_which_files_it_wrote_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "run"
    args = ["eval", "--model", "toy", "--limit", "2", "--batch-size", "2", "--warmup", "0", "--out", str(out)]
    assert main([*args, "--methods", "none"]) == 0
    printed = capsys.readouterr().out
    wrote = next(line for line in printed.splitlines() if line.startswith("wrote "))
    assert f"{out / 'pareto.txt'}" in wrote and "pareto.png" not in wrote
    assert f"{out / 'breakdown.md'}" in wrote and f"{out / 'summary.csv'}" in wrote
    assert not (out / "pareto.png").exists()
    assert "matplotlib" in (out / "pareto.txt").read_text()
    assert "pareto.png not drawn: the Pareto plot needs matplotlib" in (out / "summary.md").read_text()


@pytest.mark.parametrize("metric", ["exact_match"])
def test_plot_pareto_keeps_an_explicit_metric(tmp_path, monkeypatch, metric):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_pareto(tmp_path / "p.png", _rows()[:3], metric=metric)
    assert figures[0].axes[0].get_ylabel() == f"synthetic: {metric}"
