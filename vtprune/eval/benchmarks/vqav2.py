"""VQAv2 val (lmms-eval ``vqav2_val``): short-answer prompt, VQA accuracy."""

from __future__ import annotations

from ..metrics import vqa_accuracy
from .base import LMMS_EVAL, SHORT_ANSWER_PROMPT, Benchmark, Sample, _mean, _mean_by

__all__ = ["VQAv2"]


class VQAv2(Benchmark):
    """VQAv2 val: "{question}" + short-answer instruction, VQA accuracy (lmms-eval ``vqav2_val``)."""

    name = "vqav2"
    description = "VQAv2 val (214k questions on COCO val2014), VQA accuracy"
    hub_ids = ("lmms-lab-encoder/VQAv2", "lmms-lab/VQAv2")
    split = "validation"
    columns = ("question_id", "question", "image", "answers")
    nested = {"answers": ("answer",)}
    prompt_template = "{question}" + SHORT_ANSWER_PROMPT
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = "VQA accuracy (official VQAv2 normalisation, 10 leave-one-out subsets, min(1, matches/3))"
    main_metric = "vqa_accuracy"
    reference = f"{LMMS_EVAL} tasks/vqav2 (vqav2_val: doc_to_text, vqav2_process_results); LLaVA-1.5 prompt"
    vqa_style = "vqav2"

    def make_sample(self, row, index, images):
        answers = [a["answer"] for a in row["answers"] or []]
        meta = {
            k: row[k]
            for k in ("image_id", "answer_type", "question_type", "multiple_choice_answer")
            if k in row
        }
        return Sample(
            id=str(row["question_id"]),
            images=images,
            prompt=f"{row['question']}{SHORT_ANSWER_PROMPT}",
            target=answers,
            meta={"question": row["question"], **meta},
        )

    def score_sample(self, sample, prediction):
        rec = {
            "target": sample.target,
            "score": vqa_accuracy(prediction, sample.target, style=self.vqa_style),
        }
        if "answer_type" in sample.meta:
            rec["answer_type"] = sample.meta["answer_type"]
        return rec

    def aggregate(self, records):
        out = {"vqa_accuracy": _mean(r["score"] for r in records)}
        if any("answer_type" in r for r in records):
            out["by_answer_type"] = _mean_by(records, "answer_type")
        return out
