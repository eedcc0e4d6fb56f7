"""``vtprune eval`` end to end on the shipped toy model: the synthetic benchmark and a hub-mirror fixture."""

import json
from pathlib import Path

import pytest

from vtprune.cli import main
from vtprune.runtime.selection import keep_count
from vtprune.toy.synthetic import IMAGE_SIZE, PATCH_SIZE

FIXTURES = Path(__file__).parent / "fixtures" / "hub"


@pytest.mark.slow
def test_eval_cli_on_toy_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "eval", "--model", "toy", "--limit", "16", "--batch-size", "8", "--out", str(out),
        "--benchmarks", "synthetic", f"pope={FIXTURES / 'lmms-lab__POPE'}",
        "--methods", "none", "fastervlm:keep_ratio=0.25", "static_exit:layer=2",
    ]  # fmt: skip
    assert main(args) == 0
    rows = list(csv_rows(out / "summary.csv"))
    assert {(r["benchmark"], r["setting"]) for r in rows} == {
        (b, s)
        for b in ("synthetic", "pope")
        for s in ("none", "fastervlm-keep_ratio=0.25", "static_exit-layer=2")
    }
    synthetic = {r["setting"]: r for r in rows if r["benchmark"] == "synthetic"}
    assert float(synthetic["none"]["exact_match"]) > 0.5
    n_visual = (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert float(synthetic["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == keep_count(n_visual, 0.25)
    assert float(synthetic["none"]["visual_tokens_mean"]) == n_visual
    assert float(synthetic["static_exit-layer=2"]["flops_ratio"]) < 1
    recs = [json.loads(x) for x in (out / "synthetic" / "none.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and all("prediction" in r and "ttft_s" in r for r in recs)
    assert (out / "pareto.png").stat().st_size > 0
    # A second run finds everything on disk and recomputes nothing.
    assert main(args) == 0
    assert len((out / "synthetic" / "none.jsonl").read_text().splitlines()) == 16
    assert "summary.md" in capsys.readouterr().out


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_bad_setting_is_a_clear_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["eval", "--benchmarks", "synthetic", "--methods", "static_exit:layer=0", "--out", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "static_exit:layer=0" in err and "layer" in err and "must be an int >= 1" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_demo_on_the_shipped_toy_model(capsys, monkeypatch):
    from vtprune import speed
    from vtprune.testing import tiny_llava

    # the speed table's mid-size model, shrunk for the test (the table's shape is what is tested here)
    monkeypatch.setattr(speed, "mid_llava", lambda: tiny_llava())
    argv = ["demo", "--samples", "8", "--ratios", "0.25", "--repeats", "1", "--speed-ratios", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| fastervlm | 0.25 | 9 |" in out
    lines = out.splitlines()
    assert lines[0].startswith("Accuracy:") and any(line.startswith("Speed: prefill time") for line in lines)
    rows = [line.split(" | ") for line in lines if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert [(r[0], r[1]) for r in rows] == [
        ("| 1", "unpruned"),
        ("| 1", "fastervlm keep_ratio=0.5"),
        ("| 4", "unpruned"),
        ("| 4", "fastervlm keep_ratio=0.5"),
    ]
    for r in rows:  # realised and FLOPs-ideal speed-up side by side, both measured
        assert r[4].endswith("x") and r[5].endswith("x")
    assert (
        rows[1][5] == rows[3][5] and float(rows[1][5][:-1]) > 1.0
    )  # FLOPs ratios do not depend on the batch
