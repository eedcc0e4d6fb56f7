"""Benchmarks on their real hub schemas: loading, prompts, generation settings and scoring.

Each :class:`Benchmark` knows the dataset ids lmms-eval 0.7.3's task YAMLs use (``lmms-lab-encoder/...``; the
older ``lmms-lab/...`` ids are accepted too and tried next), the config and split, the columns it reads
(validated on load: a missing column is a :class:`SchemaError` naming the column and the benchmark), how
lmms-eval / LLaVA build the prompt, the generation settings, and which :mod:`vtprune.eval.metrics` function
scores it. Loading goes through ``datasets.load_dataset(source, name=config, split=split)``; ``source`` is a
hub id or a local folder mirroring the hub repository (README.md with ``configs:`` and parquet files), which
is how offline machines and the tests use it.

The harness calls ``get_benchmark(name)``, ``bench.load(source=..., limit=...)``, then per sample
``bench.score_sample(sample, prediction)`` (fields written to the JSONL record) and at the end
``bench.aggregate(records)`` on those records; ``bench.protocol`` and ``bench.generation_kwargs`` are
recorded / passed to ``generate``. Accuracies are fractions in [0, 1]; MME scores are MME points.

Layout: :mod:`.base` (``Sample``, ``LazyImages``, ``Benchmark`` and its loader, the errors, the registry) and
one module per benchmark. Adding one is a module with a :class:`Benchmark` subclass and one
``register_benchmark`` line below.
"""

from __future__ import annotations

from .base import (
    LMMS_EVAL,
    OPTION_LETTER_PROMPT,
    SHORT_ANSWER_PROMPT,
    Benchmark,
    BenchmarkLoadError,
    LazyImages,
    Sample,
    SchemaError,
    UnknownBenchmarkError,
    get_benchmark,
    list_benchmarks,
    register_benchmark,
)
from .gqa import GQA
from .mmbench import MMBENCH_OPTIONS_HEADER, MMBenchEN
from .mme import MME, MME_YES_NO_SUFFIX
from .pope import POPE
from .scienceqa import ScienceQAImg
from .synthetic import SYNTHETIC_DIR, Synthetic
from .synthetic_video import SYNTHETIC_VIDEO_DIR, SyntheticVideo
from .textvqa import TextVQA
from .videomme import VideoMME
from .vqav2 import VQAv2

__all__ = [
    "Sample",
    "LazyImages",
    "Benchmark",
    "SchemaError",
    "BenchmarkLoadError",
    "UnknownBenchmarkError",
    "get_benchmark",
    "list_benchmarks",
    "register_benchmark",
    "SHORT_ANSWER_PROMPT",
    "OPTION_LETTER_PROMPT",
    "SYNTHETIC_DIR",
    "SYNTHETIC_VIDEO_DIR",
    "LMMS_EVAL",
    "MME_YES_NO_SUFFIX",
    "MMBENCH_OPTIONS_HEADER",
    "VQAv2",
    "TextVQA",
    "GQA",
    "POPE",
    "MME",
    "ScienceQAImg",
    "MMBenchEN",
    "Synthetic",
    "SyntheticVideo",
    "VideoMME",
]

register_benchmark("vqav2", VQAv2)
register_benchmark("gqa", GQA)
register_benchmark("textvqa", TextVQA)
register_benchmark("textvqa_ocr", lambda: TextVQA(ocr_tokens=True))
register_benchmark("pope", POPE)
register_benchmark("mme", MME)
register_benchmark("scienceqa_img", ScienceQAImg)
register_benchmark("mmbench_en", MMBenchEN)
register_benchmark("synthetic", Synthetic)
register_benchmark("synthetic_video", SyntheticVideo)
register_benchmark("videomme", VideoMME)
