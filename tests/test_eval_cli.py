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


def test_demo_on_the_shipped_toy_model(capsys):
    assert main(["demo", "--samples", "8", "--ratios", "0.25", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fastervlm | 0.25 | 9 |" in out and "prefill" in out
