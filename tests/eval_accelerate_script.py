"""Run the stub evaluation; launched under ``accelerate launch`` by test_harness (2 CPU processes)."""

import sys
from pathlib import Path

import torch
from eval_stubs import StubAnswerer, StubBenchmark

from vtprune.eval.harness import EvalRun, parse_settings, run_eval
from vtprune.testing import tiny_llava

if __name__ == "__main__":
    torch.set_num_threads(1)
    bench = StubBenchmark(10)
    run = EvalRun(
        model=tiny_llava(),
        answer=StubAnswerer(),
        benchmarks={"stub": (bench, bench.samples)},
        settings=parse_settings(["none", "fastervlm:keep_ratio=0.25"]),
        out=Path(sys.argv[1]),
        batch_size=3,
        warmup=0,
    )
    run_eval(run, progress=False)
