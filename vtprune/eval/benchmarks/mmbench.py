"""MMBench-EN dev (lmms-eval ``mmbench_en_dev_static``): circular variants, offline option extraction,
CircularEval."""

from __future__ import annotations

import math

from ..metrics import CIRCULAR_OFFSET, circular_eval, mmbench_choices, mmbench_extract
from .base import LMMS_EVAL, OPTION_LETTER_PROMPT, Benchmark, Sample, _mean

__all__ = ["MMBenchEN"]

MMBENCH_OPTIONS_HEADER = "There are several options:"  # lmms-eval mmbench.yaml metadata.sys_prompt


def _notna(value) -> bool:
    """A present option or hint: not None, not a float NaN, not the string "nan" (pandas round trips)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != "nan"


class MMBenchEN(Benchmark):
    """MMBench-EN dev with its circular variants; lmms-eval's prompt, offline option extraction and
    CircularEval (lmms-eval ``mmbench_en_dev_static``)."""

    name = "mmbench_en"
    description = "MMBench-EN dev (with circular variants), CircularEval accuracy without a GPT judge"
    hub_ids = ("lmms-lab-encoder/MMBench", "lmms-lab/MMBench")
    config = "en"
    split = "dev"
    columns = ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image", "source",
               "L2-category", "split")  # fmt: skip
    prompt_template = (
        "[{hint} ]{question} " + MMBENCH_OPTIONS_HEADER + "\\nA. {A}\\nB. {B}...\\n" + OPTION_LETTER_PROMPT
    )
    generation_kwargs = {"max_new_tokens": 1024, "do_sample": False}
    metric = (
        "option read offline as lmms-eval mmbench_en_dev_static (can_infer, then extract_mcq_answer); "
        "accuracy = CircularEval (a question counts only if all its circular variants are right); "
        "vanilla_accuracy per row"
    )
    main_metric = "accuracy"
    reference = f"{LMMS_EVAL} tasks/mmbench (en_utils.mmbench_doc_to_text, MMBench_Evaluator static eval)"

    def _select(self, ds, limit):
        """The first ``limit`` questions with all their circular variants (rows with index = i + k * 1e6)."""
        groups: dict[int, list[int]] = {}
        for i, index in enumerate(ds["index"]):
            group = int(index) % CIRCULAR_OFFSET
            if group in groups or len(groups) < limit:
                groups.setdefault(group, []).append(i)
        return sorted(i for rows in groups.values() for i in rows)

    def make_sample(self, row, index, images):
        options = {k: row[k] for k in "ABCDE" if k in row and row[k]}
        lines = [f"{k}. {v}" for k, v in sorted(options.items()) if _notna(v)]
        options_prompt = "\n".join([MMBENCH_OPTIONS_HEADER, *lines])
        hint = row["hint"]
        query = (
            f"{hint} {row['question']} {options_prompt}"
            if _notna(hint)
            else f"{row['question']} {options_prompt}"
        )
        return Sample(
            id=str(int(row["index"])),
            images=images,
            prompt=f"{query}\n{OPTION_LETTER_PROMPT}",
            target=row["answer"],
            meta={
                "index": int(row["index"]),
                "question": row["question"],
                "choices": mmbench_choices(row),
                "category": row["category"],
                "l2_category": row["L2-category"],
            },
        )

    def score_sample(self, sample, prediction):
        letter = mmbench_extract(prediction, sample.meta["choices"])
        return {
            "target": sample.target,
            "pred_letter": letter,
            "index": sample.meta["index"],
            "category": sample.meta["category"],
            "l2_category": sample.meta["l2_category"],
            "score": float(letter == sample.target),
        }

    def aggregate(self, records):
        circ = circular_eval((r["index"], r["score"] == 1.0) for r in records)
        category = {int(r["index"]): r["category"] for r in records}
        by_cat: dict[str, list[int]] = {}
        for index, hit in circ["hits"].items():
            by_cat.setdefault(category[index], []).append(hit)
        return {
            "accuracy": circ["accuracy"],
            "vanilla_accuracy": _mean(r["score"] for r in records),
            "by_category": {k: _mean(v) for k, v in sorted(by_cat.items())},
            "circular": {"questions": circ["questions"], "rows": len(records)},
        }
