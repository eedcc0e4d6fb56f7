"""``vtprune eval`` user errors print one line and exit 2; anything else keeps its traceback (issue 17, items 5
and 6). Offline: the model and benchmark errors are raised before anything is computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from vtprune.cli import main
from vtprune.errors import UsageError
from vtprune.eval import harness
from vtprune.eval.harness import parse_settings

HUB = Path(__file__).parent / "fixtures" / "hub"


def one_line_error(argv, capsys) -> str:
    """Run the CLI expecting a user error: exit code 2 and exactly one line on stderr (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    progress = ("examples/s]", "ba/s]", "it/s]")  # datasets' and transformers' progress bars
    lines = [x for x in err.splitlines() if x.strip() and not any(p in x for p in progress)]
    assert len(lines) == 1 and lines[0].startswith("vtprune eval: error: "), err
    return lines[0]


def argparse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def eval_args(tmp_path, *extra):
    return ["eval", "--out", str(tmp_path / "out"), "--limit", "2", *extra]


# ------------------------------------------------------------------------------------------------------------
# only user errors are one line
# ------------------------------------------------------------------------------------------------------------


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    def buggy_run_eval(run, progress=True):
        raise ValueError("an internal bug")

    monkeypatch.setattr(harness, "run_eval", buggy_run_eval)
    with pytest.raises(ValueError, match="an internal bug"):  # not turned into "error: an internal bug"
        main(eval_args(tmp_path, "--methods", "none"))


def test_setting_errors_are_usage_errors(tmp_path, capsys):
    for spec, message in [
        ("fastervlm:keep_ratio=2", "keep_ratio"),
        ("fastervlm:bogus=1", "bogus"),  # an unknown option (a TypeError inside the config)
        ("fastest:keep_ratio=0.5", "unknown pruning method"),
        ('{"method": "fastervlm", "keep_ratio": }', "not valid JSON"),
        (str(tmp_path / "missing.json"), "no such JSON file"),
        ("none:keep_ratio=1", "takes no options"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_settings([spec])
        line = one_line_error(eval_args(tmp_path, "--methods", spec), capsys)
        assert message in line and repr(spec) in line or "takes no options" in line


# ------------------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--limit", "0", "expected a positive integer, got '0'"),
        ("--limit", "-3", "expected a non-negative integer"),
        ("--batch-size", "-1", "expected a non-negative integer, got '-1'"),
        ("--batch-size", "0", "expected a positive integer"),
        ("--batch-size", "two", "expected an integer"),
        ("--warmup", "-1", "expected a non-negative integer"),
        ("--dtype", "float33", "invalid choice: 'float33'"),
    ],
)
def test_bad_numbers_and_dtype_are_rejected_by_the_parser(tmp_path, capsys, option, value, message):
    line = argparse_error(["eval", "--out", str(tmp_path), option, value], capsys)
    assert option in line and message in line


def test_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "results.txt").write_text("not a folder")
    line = one_line_error(["eval", "--out", str(tmp_path / "results.txt")], capsys)
    assert "is a file; pass a folder" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys):
    assert "CUDA is not available" in one_line_error(eval_args(tmp_path, "--device", "cuda"), capsys)
    assert "is not a device" in one_line_error(eval_args(tmp_path, "--device", "gpu0"), capsys)


# ------------------------------------------------------------------------------------------------------------
# benchmarks
# ------------------------------------------------------------------------------------------------------------


def _pope_copy(tmp_path: Path, name: str, transform) -> Path:
    folder = tmp_path / name
    shutil.copytree(HUB / "lmms-lab__POPE", folder)
    readme = folder / "README.md"
    readme.write_text(readme.read_text().split("dataset_info:")[0] + "---\n")  # keep configs only
    transform(folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_benchmark_errors(tmp_path, capsys):
    line = one_line_error(eval_args(tmp_path, "--benchmarks", f"pope={tmp_path / 'nope'}"), capsys)
    assert "benchmark 'pope': no such folder" in line
    line = one_line_error(eval_args(tmp_path, "--benchmarks", "vqa3"), capsys)
    assert "unknown benchmark 'vqa3'" in line
    # the folder of another benchmark: no 'test' split
    line = one_line_error(eval_args(tmp_path, "--benchmarks", f"mme={HUB / 'lmms-lab__VQAv2'}"), capsys)
    assert "could not load split 'test'" in line and "Unknown split" in line
    # a missing column
    line = one_line_error(eval_args(tmp_path, "--benchmarks", f"synthetic={HUB / 'lmms-lab__POPE'}"), capsys)
    assert "benchmark 'synthetic': column 'question_type' is missing" in line

    def no_rows(path):
        datasets.Dataset.from_parquet(str(path)).select([]).to_parquet(str(path))

    folder = _pope_copy(tmp_path, "empty", no_rows)
    line = one_line_error(eval_args(tmp_path, "--benchmarks", f"pope={folder}"), capsys)
    assert "benchmark 'pope'" in line and "'test'" in line and ("has no rows" in line or "no data" in line)
    folder = _pope_copy(tmp_path, "zero_bytes", lambda path: path.write_bytes(b""))
    line = one_line_error(eval_args(tmp_path, "--benchmarks", f"pope={folder}"), capsys)
    assert "could not load split 'test'" in line and "0 bytes" in line
    line = one_line_error(
        eval_args(tmp_path, "--benchmarks", "synthetic", f"synthetic={HUB / 'vtprune__synthetic_vqa'}"),
        capsys,
    )
    assert "'synthetic' is given twice" in line


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------


def test_model_errors(tmp_path, capsys, monkeypatch):
    line = one_line_error(eval_args(tmp_path, "--model", str(tmp_path / "no_model")), capsys)
    assert "no such folder" in line
    line = one_line_error(eval_args(tmp_path, "--model", "./relative/missing"), capsys)
    assert "no such folder" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(eval_args(tmp_path, "--model", str(tmp_path / "empty")), capsys)
    assert f"folder '{tmp_path / 'empty'}'" in line and "config.json" in line
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
        )
    )
    line = one_line_error(eval_args(tmp_path, "--model", str(text_only)), capsys)
    assert "holds a 'llama' model, not a vision-language model" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"hidden_size": -1}})
    )
    line = one_line_error(eval_args(tmp_path, "--model", str(broken)), capsys)
    assert f"folder '{broken}'" in line
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    line = one_line_error(eval_args(tmp_path, "--model", "some-org/some-vlm-not-cached"), capsys)
    assert "cannot load the config of hub id 'some-org/some-vlm-not-cached'" in line and "offline?" in line
