"""Video-MME on its hub schema (tests/fixtures/hub/lmms-lab__Video-MME: parquet + data/<videoID>.mp4 as
lmms-eval unpacks the videos), lmms-eval's uniform frame sampling and option-letter reading, the lazy PyAV
import, and ``vtprune eval`` end to end on it."""

import builtins
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vtprune.errors import UsageError
from vtprune.eval.benchmarks import BenchmarkLoadError, SchemaError, get_benchmark
from vtprune.eval.benchmarks.videomme import (
    VIDEOMME_OPTION_PROMPT,
    VIDEOMME_POST_PROMPT,
    extract_option_letter,
)
from vtprune.eval.video import VideoFrames, read_frames, uniform_indices

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_fixtures import frame_level  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hub" / "lmms-lab__Video-MME"


def _levels(frames):
    """The frame index each decoded frame shows (its grey level, to the nearest fixture level)."""
    levels = [frame_level(i) for i in range(20)]
    return [int(np.argmin([abs(np.asarray(f).mean() - v) for v in levels])) for f in frames]


def test_uniform_indices_are_lmms_evals_linspace():
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert (
        uniform_indices(100, 8)
        == np.linspace(0, 99, 8, dtype=int).tolist()
        == [0, 14, 28, 42, 56, 70, 84, 99]
    )
    assert uniform_indices(3, 8) == [0, 1, 2]  # a short video gives all its frames
    with pytest.raises(UsageError, match="num_frames"):
        uniform_indices(10, 0)


def test_read_frames_samples_the_right_frames():
    path = FIXTURE / "data" / "fix001.mp4"
    frames = read_frames(path, 4)
    assert _levels(frames) == [0, 3, 6, 9]
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    assert _levels(read_frames(path, 32)) == list(range(10))
    lazy = VideoFrames(path, 5)
    assert len(lazy) == 5 and _levels(lazy) == [0, 2, 4, 6, 9]
    assert _levels([lazy[1], lazy[-1]]) == [2, 9]


def test_containers_without_a_frame_count_are_decoded_whole(tmp_path):
    """lmms-eval decodes webm / mkv whole (their headers hold no frame count) and samples from the list."""
    av = pytest.importorskip("av")
    import make_fixtures

    mkv = tmp_path / "clip.mkv"
    make_fixtures.write_video(mkv, frames=7)
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0
    assert _levels(read_frames(mkv, 3)) == [0, 3, 6]
    assert len(VideoFrames(mkv, 3)) == 3


def test_missing_pyav_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(UsageError, match=r"vtprune\[video\]"):
        read_frames(FIXTURE / "data" / "fix001.mp4", 4)


def test_option_letter_as_lmms_eval():
    assert extract_option_letter("The best answer is B.") == "B"
    assert extract_option_letter("(C) Three.") == "C"
    assert extract_option_letter("  d") == ""  # lower case is not an option letter
    assert extract_option_letter("it is not possible to tell from these frames what they do at all") == ""
    # lmms-eval's prefix list joins two pairs (missing commas), so "Best option:" is not removed and the "B"
    # of "Best" is read: kept so that scores match lmms-eval's.
    assert extract_option_letter("Best option: C") == "B"
    assert extract_option_letter("The correct answer is D") == "D"


def test_videomme_loads_the_hub_mirror_with_lmms_eval_prompt():
    bench = get_benchmark("videomme", num_frames=4)
    samples = bench.load(source=FIXTURE)
    assert [s.id for s in samples] == ["001-1", "001-2", "002-1"]
    first = samples[0]
    assert first.prompt == (
        VIDEOMME_OPTION_PROMPT
        + "\nHow many planets are shown?\nA. One.\nB. Two.\nC. Three.\nD. Four.\n"
        + VIDEOMME_POST_PROMPT
    )
    assert first.prompt.endswith("D. Four.\n\nAnswer the question with A, B, C, or D.")
    assert _levels(first.images) == [0, 3, 6, 9] and _levels(samples[2].images) == [0, 1, 2]
    assert bench.protocol["num_frames"] == 4 and bench.protocol["config"] == "videomme"
    assert get_benchmark("videomme").num_frames == 32
    metrics = bench.evaluate(samples, ["The best answer is B.", "B", "C"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["by_duration"] == {"medium": 1.0, "short": 0.5}
    assert metrics["by_task_type"]["Temporal Reasoning"] == 0.0


def test_videomme_errors(tmp_path):
    copy = tmp_path / "mirror"
    shutil.copytree(FIXTURE, copy)
    (copy / "data" / "fix002.mp4").unlink()
    with pytest.raises(BenchmarkLoadError, match="no video 'fix002'.*videos_chunked"):
        get_benchmark("videomme").load(source=copy)
    # The videos can live elsewhere (video_dir), as with lmms-eval's cache.
    samples = get_benchmark("videomme", num_frames=2, video_dir=FIXTURE / "data").load(source=copy)
    assert len(samples) == 3
    with pytest.raises(BenchmarkLoadError, match="num_frames"):
        get_benchmark("videomme", num_frames=0)
    import datasets

    ds = datasets.load_dataset(str(FIXTURE), "videomme", split="test").remove_columns("task_type")
    with pytest.raises(SchemaError, match="task_type"):
        get_benchmark("videomme").validate(ds, get_benchmark("videomme").columns)


def test_eval_cli_on_videomme_fixture(tmp_path):
    from vtprune.cli import main

    out = tmp_path / "run"
    args = ["eval", "--model", "toy", "--benchmarks", f"videomme={FIXTURE}", "--out", str(out),
            "--methods", "none", "fastervlm:keep_ratio=0.25"]  # fmt: skip
    assert main(args) == 0
    with open(out / "summary.csv") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    # 32 frames asked, the fixture videos have 10 and 3: 36 tokens per frame, 9 kept per frame at 0.25.
    assert float(rows["none"]["visual_tokens_mean"]) == pytest.approx((10 + 10 + 3) * 36 / 3)
    assert float(rows["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == pytest.approx(
        (10 + 10 + 3) * 9 / 3
    )
    recs = [json.loads(x) for x in (out / "videomme" / "none.jsonl").read_text().splitlines()]
    assert {r["task_type"] for r in recs} == {"Counting Problem", "Temporal Reasoning", "Action Recognition"}
