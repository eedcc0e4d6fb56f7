"""scripts/device_check.py on a CPU (``--dry-run``: tiny models, no timing claims): the sections that run
fast enough for CI; the whole ``DRY_RUN=1 scripts/device_check.sh`` takes minutes and is run by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _section(tmp_path, *args):
    out = tmp_path / f"{args[0]}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "device_check.py"),
            args[0],
            str(out),
            *args[1:],
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_syncs_section_replays_a_decoding_step_of_every_case(tmp_path):
    report = _section(tmp_path, "syncs")
    assert len(report["steps"]) == 4
    assert report["ok"], [s for s in report["steps"] if not s["ok"]]
    assert all(s["graph_breaks"] == 0 for s in report["steps"])


def test_bandwidth_section_writes_its_report(tmp_path):
    report = _section(tmp_path, "bandwidth")
    assert report  # shapes and GB/s of every gather (no share of peak without a GPU)
