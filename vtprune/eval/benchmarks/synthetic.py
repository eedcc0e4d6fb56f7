"""vtprune's shipped synthetic shapes VQA (the toy model's benchmark): first-word exact match."""

from __future__ import annotations

from pathlib import Path

from ..metrics import first_word_match
from .base import Benchmark, BenchmarkLoadError, Sample, _mean, _mean_by

__all__ = ["Synthetic", "SYNTHETIC_DIR"]

SYNTHETIC_DIR = Path(__file__).resolve().parents[2] / "toy" / "assets" / "synthetic_vqa"


class Synthetic(Benchmark):
    """vtprune's shipped synthetic VQA: the question as-is, first-word exact match."""

    name = "synthetic"
    description = "vtprune's synthetic shapes VQA (test split shipped in vtprune/toy/assets/synthetic_vqa)"
    hub_ids = ()
    split = "test"
    columns = ("question_id", "image", "question", "answer", "question_type")
    prompt_template = "{question}"
    generation_kwargs = {"max_new_tokens": 8, "do_sample": False}
    metric = (
        "exact match of the prediction's first word (lower-cased, outer punctuation stripped) with the answer"
    )
    main_metric = "exact_match"
    reference = "vtprune.toy (normalize_answer); answers are single words"

    def _default_sources(self):
        if not (SYNTHETIC_DIR / "README.md").is_file():
            raise BenchmarkLoadError(
                f"benchmark 'synthetic': no data at {SYNTHETIC_DIR}; generate it with "
                f"`python -m vtprune.toy.synthetic --out {SYNTHETIC_DIR}`"
            )
        return (str(SYNTHETIC_DIR),)

    def make_sample(self, row, index, images):
        return Sample(
            id=str(row["question_id"]),
            images=images,
            prompt=row["question"],
            target=row["answer"],
            meta={"question": row["question"], "question_type": row["question_type"]},
        )

    def score_sample(self, sample, prediction):
        return {
            "target": sample.target,
            "question_type": sample.meta["question_type"],
            "score": first_word_match(prediction, sample.target),
        }

    def aggregate(self, records):
        return {
            "exact_match": _mean(r["score"] for r in records),
            "by_type": _mean_by(records, "question_type"),
        }
