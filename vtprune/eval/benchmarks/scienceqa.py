"""ScienceQA-IMG test (lmms-eval ``scienceqa_img``): lettered choices, option-letter accuracy."""

from __future__ import annotations

from ..metrics import OPTION_LETTERS, scienceqa_option
from .base import LMMS_EVAL, OPTION_LETTER_PROMPT, Benchmark, Sample, _mean, _mean_by

__all__ = ["ScienceQAImg"]


class ScienceQAImg(Benchmark):
    """ScienceQA-IMG test: context, question, lettered choices, option-letter instruction; accuracy
    (lmms-eval ``scienceqa_img``)."""

    name = "scienceqa_img"
    description = "ScienceQA-IMG test (2017 questions with an image), option-letter accuracy"
    hub_ids = ("lmms-lab-encoder/ScienceQA", "lmms-lab/ScienceQA")
    config = "ScienceQA-IMG"
    split = "test"
    columns = ("image", "question", "choices", "answer", "hint")
    prompt_template = (
        "[Context: {hint}\\n]{question}\\nA. {choice_0}\\nB. {choice_1}..." + OPTION_LETTER_PROMPT
    )
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = (
        "accuracy of the option letter read as lmms-eval sqa_process_results (a lone letter, or 'X.' first)"
    )
    main_metric = "accuracy"
    reference = (
        f"{LMMS_EVAL} tasks/scienceqa (scienceqa_img: sqa_doc_to_text format=default, sqa_process_results)"
    )

    def make_sample(self, row, index, images):
        choices = list(row["choices"])
        options = "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))
        context = f"Context: {row['hint']}\n" if row["hint"] else ""
        meta = {k: row[k] for k in ("subject", "grade", "category", "skill", "topic", "task") if k in row}
        return Sample(
            id=str(index),
            images=images,
            prompt=f"{context}{row['question']}\n{options}{OPTION_LETTER_PROMPT}",
            target=OPTION_LETTERS[int(row["answer"])],
            meta={"question": row["question"], "choices": choices, "answer": int(row["answer"]), **meta},
        )

    def score_sample(self, sample, prediction):
        letter = scienceqa_option(prediction, len(sample.meta["choices"]))
        rec = {"target": sample.target, "pred_letter": letter, "score": float(letter == sample.target)}
        if "subject" in sample.meta:
            rec["subject"] = sample.meta["subject"]
        return rec

    def aggregate(self, records):
        out = {"accuracy": _mean(r["score"] for r in records)}
        if any("subject" in r for r in records):
            out["by_subject"] = _mean_by(records, "subject")
        return out
