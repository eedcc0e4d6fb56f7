"""MME (lmms-eval ``mme``): two yes/no questions per image; perception and cognition scores."""

from __future__ import annotations

from ..metrics import mme_scores, parse_mme_answer
from .base import LMMS_EVAL, SHORT_ANSWER_PROMPT, Benchmark, Sample

__all__ = ["MME"]

MME_YES_NO_SUFFIX = " Please answer yes or no."


class MME(Benchmark):
    """MME: two yes/no questions per image; perception and cognition scores (lmms-eval ``mme``)."""

    name = "mme"
    description = "MME (14 subtasks, 2 yes/no questions per image), perception and cognition scores"
    hub_ids = ("lmms-lab-encoder/MME", "lmms-lab/MME")
    split = "test"
    columns = ("question_id", "image", "question", "answer", "category")
    prompt_template = "{question.strip() without ' Please answer yes or no.'}" + SHORT_ANSWER_PROMPT
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = (
        "answer parsed as lmms-eval parse_pred_ans; per subtask acc and acc+ (both questions of an image "
        "right); perception / cognition = sum over subtasks of 100 * (acc + acc+)"
    )
    main_metric = "perception"
    reference = f"{LMMS_EVAL} tasks/mme (mme_doc_to_text, mme_process_results, mme_aggregate_results)"

    def make_samples(self, rows, images_of):
        """Number the questions of each image in dataset order (``<question_id>#0``, ``#1``): MME's
        ``question_id`` names the image, shared by its two questions. The count is local to the call."""
        seen: dict[str, int] = {}
        samples = []
        for i, row in enumerate(rows):
            image_id = str(row["question_id"])
            samples.append(self.make_sample(row, i, images_of(i), occurrence=seen.get(image_id, 0)))
            seen[image_id] = seen.get(image_id, 0) + 1
        return samples

    def make_sample(self, row, index, images, occurrence: int = 0):
        """The sample of one row; ``occurrence`` is how many earlier rows asked about the same image."""
        image_id = str(row["question_id"])
        question = row["question"].strip().replace(MME_YES_NO_SUFFIX, "")
        return Sample(
            id=f"{image_id}#{occurrence}",
            images=images,
            prompt=f"{question}{SHORT_ANSWER_PROMPT}",
            target=row["answer"].lower().strip().replace(".", ""),
            meta={"question": row["question"], "category": row["category"], "image_id": image_id},
        )

    def score_sample(self, sample, prediction):
        label = parse_mme_answer(prediction)
        return {
            "target": sample.target,
            "category": sample.meta["category"],
            "image_id": sample.meta["image_id"],
            "pred_label": label,
            "score": float(label == sample.target),
        }

    def aggregate(self, records):
        return mme_scores((r["category"], r["image_id"], r["score"]) for r in records)
