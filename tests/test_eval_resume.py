"""Resuming an output folder safely (issue 17, item 6): results are reused only by the same run, a cut last
line is repaired, a folder is written by one run at a time, mixed timings are marked, labels never collide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from eval_stubs import StubAnswerer, StubBenchmark

from vtprune.errors import UsageError
from vtprune.eval import harness
from vtprune.eval.harness import EvalRun, FolderLock, ResumeWarning, parse_settings, run_eval, setting_labels
from vtprune.testing import tiny_llava

SETTINGS = ["none", "fastervlm:keep_ratio=0.25"]


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch):
    """The plot is tested in test_eval_reports; here it only costs time."""
    monkeypatch.setattr(harness, "plot_pareto", lambda *args, **kwargs: [])


def make_run(out, *, n=10, model=None, answerer=None, bench=None, settings=SETTINGS, meta=None):
    bench = bench or StubBenchmark(n)
    return EvalRun(
        model=model or tiny_llava(),
        answer=answerer or StubAnswerer(),
        benchmarks={"stub": (bench, bench.samples)},
        settings=parse_settings(settings) if isinstance(settings[0], str) else settings,
        out=Path(out),
        batch_size=4,
        warmup=0,
        meta=meta or {},
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ------------------------------------------------------------------------------------------------------------
# results are reused only by the same run
# ------------------------------------------------------------------------------------------------------------


def test_resume_refuses_another_model(tmp_path):
    run_eval(make_run(tmp_path, meta={"model": "toy"}), progress=False)
    answerer = StubAnswerer()
    with pytest.raises(UsageError, match=r"different run \(model.weights_checksum.*another --out"):
        run_eval(make_run(tmp_path, model=tiny_llava(seed=1), answerer=answerer, meta={"model": "toy"}))
    with pytest.raises(UsageError, match=r"model.name: 'toy' -> 'other'"):
        run_eval(make_run(tmp_path, answerer=answerer, meta={"model": "other"}))
    assert answerer.calls == 0  # refused before computing anything
    assert len(lines(tmp_path / "stub" / "none.jsonl")) == 10


class SourcedBenchmark(StubBenchmark):
    """The stub with a recorded data source and generation settings, as a loaded Benchmark has."""

    def __init__(self, n=10, source="/data/A", max_new_tokens=2):
        super().__init__(n)
        self.generation_kwargs = {"max_new_tokens": max_new_tokens}
        self.protocol = StubBenchmark.protocol | {
            "split": "test",
            "generation_kwargs": self.generation_kwargs,
            "loaded": {"source": source, "split": "test", "limit": n, "samples": n},
        }


def test_resume_refuses_another_source_or_generation_settings(tmp_path):
    run_eval(make_run(tmp_path, bench=SourcedBenchmark()), progress=False)
    with pytest.raises(UsageError, match=r"benchmark.loaded.source: '/data/A' -> '/data/B'"):
        run_eval(make_run(tmp_path, bench=SourcedBenchmark(source="/data/B")), progress=False)
    with pytest.raises(UsageError, match=r"benchmark.generation_kwargs.max_new_tokens: 2 -> 3"):
        run_eval(make_run(tmp_path, bench=SourcedBenchmark(max_new_tokens=3)), progress=False)
    # Same source, another --limit: reused by sample id (the limit is not part of the fingerprint).
    answerer = StubAnswerer()
    rows = run_eval(make_run(tmp_path, bench=SourcedBenchmark(n=4), answerer=answerer), progress=False)
    assert answerer.calls == 0 and {r["samples"] for r in rows} == {4}


def test_smaller_limit_reports_only_the_requested_samples(tmp_path):
    run_eval(make_run(tmp_path, n=10), progress=False)
    answerer = StubAnswerer()
    rows = run_eval(make_run(tmp_path, n=4, answerer=answerer), progress=False)
    assert answerer.calls == 0  # every requested sample is on disk
    assert [r["samples"] for r in rows] == [4, 4]
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert {r["samples"] for r in summary} == {"4"}
    rows = run_eval(make_run(tmp_path, n=12, answerer=answerer), progress=False)
    assert answerer.calls == 2  # the 2 missing samples of each setting, one batch each
    assert [r["samples"] for r in rows] == [12, 12]


def test_rows_without_a_fingerprint_are_refused(tmp_path):
    run_eval(make_run(tmp_path), progress=False)
    (tmp_path / "run.json").unlink()
    with pytest.raises(UsageError, match="no fingerprint for"):
        run_eval(make_run(tmp_path), progress=False)


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        run_eval(make_run(tmp_path / "file"), progress=False)


# ------------------------------------------------------------------------------------------------------------
# a cut last line, two runs at once
# ------------------------------------------------------------------------------------------------------------


def test_cut_last_line_is_dropped_and_its_sample_recomputed(tmp_path):
    run_eval(make_run(tmp_path), progress=False)
    path = tmp_path / "stub" / "none.jsonl"
    full = lines(path)
    path.write_text("\n".join(full[:-1]) + "\n" + full[-1][:40])  # killed in the middle of the last record
    answerer = StubAnswerer()
    with pytest.warns(ResumeWarning, match="last line was cut"):
        run_eval(make_run(tmp_path, answerer=answerer), progress=False)
    assert answerer.calls == 1  # the batch of the lost sample, for that sample only
    after = lines(path)
    records = [json.loads(x) for x in after]  # every line is a record again
    assert len(records) == 10 and {r["id"] for r in records} == {f"q{i}" for i in range(10)}
    assert after[:9] == full[:9] and path.read_text().endswith("\n")


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    answerer = StubAnswerer()
    with FolderLock(tmp_path):  # another run holds the folder
        with pytest.raises(UsageError, match=r"in use by another vtprune eval \(pid \d+"):
            run_eval(make_run(tmp_path, answerer=answerer), progress=False)
    assert answerer.calls == 0 and not (tmp_path / "stub").exists()
    (tmp_path / ".lock").write_text("pid 999999999 on somewhere since long ago\n")  # its process is gone
    run_eval(make_run(tmp_path, answerer=answerer), progress=False)
    assert len(lines(tmp_path / "stub" / "none.jsonl")) == 10
    with FolderLock(tmp_path):  # released after the run
        pass


# ------------------------------------------------------------------------------------------------------------
# timings, labels, memory
# ------------------------------------------------------------------------------------------------------------


def test_resumed_timings_are_marked(tmp_path):
    fresh = run_eval(make_run(tmp_path / "fresh"), progress=False)
    assert [r["timing_sessions"] for r in fresh] == [1, 1]
    assert "timing_sessions > 1" not in (tmp_path / "fresh" / "summary.md").read_text()
    with pytest.raises(KeyboardInterrupt):
        run_eval(make_run(tmp_path, answerer=StubAnswerer(fail_after=2)), progress=False)
    rows = run_eval(make_run(tmp_path), progress=False)
    by = {r["setting"]: r for r in rows}
    assert by["none"]["timing_sessions"] == 2  # two batches timed by the killed run, one by this one
    assert by["fastervlm-keep_ratio=0.25"]["timing_sessions"] == 2  # its speed-up divides by none's
    summary = (tmp_path / "summary.md").read_text()
    assert "timing_sessions > 1 (stub none, stub fastervlm-keep_ratio=0.25)" in summary
    sessions = {json.loads(x)["session"] for x in lines(tmp_path / "stub" / "none.jsonl")}
    assert len(sessions) == 2


def test_settings_whose_labels_collide_do_not_overwrite_each_other(tmp_path, monkeypatch):
    a, b = {"method": "x", "name": "a b"}, {"method": "x", "name": "a/b"}
    labels = setting_labels([a, b, a])
    assert labels[0] != labels[1] and labels[0] == labels[2] and labels[0].startswith("x-name=a_b-")
    assert setting_labels([{"method": "none"}, {"method": "x", "k": 1}]) == ["none", "x-k=1"]  # no hash
    monkeypatch.setattr(harness, "setting_label", lambda setting: "same")  # force a collision
    settings = parse_settings(["fastervlm:keep_ratio=0.5,0.25", "fastervlm:keep_ratio=0.25"])  # + a duplicate
    rows = run_eval(make_run(tmp_path, settings=settings), progress=False)
    assert len(rows) == 2 and len({r["setting"] for r in rows}) == 2
    assert sorted(r["visual_tokens_mean"] for r in rows) == [4, 8]  # keep 0.25 and 0.5 of 16 tokens
    assert len(list((tmp_path / "stub").glob("*.jsonl"))) == 2


def test_peak_memory_is_not_reported_on_cpu(tmp_path):
    rows = run_eval(make_run(tmp_path), progress=False)
    assert all(r["peak_mem_mb"] is None for r in rows)
    assert all(json.loads(x)["peak_mem_mb"] is None for x in lines(tmp_path / "stub" / "none.jsonl"))
    assert {r["peak_mem_mb"] for r in csv.DictReader(open(tmp_path / "summary.csv"))} == {""}
    assert "peak_mem_mb is blank where not measured" in (tmp_path / "summary.md").read_text()


def test_internal_errors_on_rank_zero_are_not_swallowed(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(harness, "_model_fingerprint", broken)
    with pytest.raises(KeyError, match="a bug"):
        run_eval(make_run(tmp_path), progress=False)
    with FolderLock(tmp_path):  # the lock was released
        pass
