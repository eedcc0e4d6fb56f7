"""TextVQA val (lmms-eval ``textvqa_val``), with or without the reference OCR tokens in the prompt."""

from __future__ import annotations

from .base import LMMS_EVAL, SHORT_ANSWER_PROMPT, Sample
from .vqav2 import VQAv2

__all__ = ["TextVQA"]


class TextVQA(VQAv2):
    """TextVQA val: capitalized question (+ reference OCR tokens with ``ocr_tokens=True``) + short-answer
    instruction, VQA accuracy with the EvalAI processor (lmms-eval ``textvqa_val``)."""

    name = "textvqa"
    description = "TextVQA val (5k questions needing OCR), VQA accuracy"
    hub_ids = ("lmms-lab-encoder/textvqa", "lmms-lab/textvqa")
    split = "validation"
    columns = ("question_id", "question", "image", "answers")
    nested = {}
    prompt_template = "{question.capitalize()}" + SHORT_ANSWER_PROMPT
    # lmms-eval leaves max_new_tokens to the model (1024 for llava_hf) and stops at "ASSISTANT:"; a single
    # word or phrase fits in 16 tokens, as for VQAv2 / GQA.
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = "VQA accuracy with the EvalAI answer processor on prediction and answers"
    reference = f"{LMMS_EVAL} tasks/textvqa (textvqa_val: textvqa_doc_to_text, textvqa_process_results)"
    vqa_style = "textvqa"

    def __init__(self, ocr_tokens: bool = False):
        super().__init__()
        self.ocr_tokens = ocr_tokens
        if ocr_tokens:
            self.name = "textvqa_ocr"
            self.columns = (*type(self).columns, "ocr_tokens")
            self.prompt_template = (
                "{question.capitalize()}\nReference OCR token: {', '.join(ocr_tokens)}" + SHORT_ANSWER_PROMPT
            )
            self.description += "; prompt with the reference OCR tokens (LLaVA-1.5 / lmms-eval ocr=True)"

    def make_sample(self, row, index, images):
        ocr = f"\nReference OCR token: {', '.join(row['ocr_tokens'])}" if self.ocr_tokens else ""
        return Sample(
            id=str(row["question_id"]),
            images=images,
            prompt=f"{row['question'].capitalize()}{ocr}{SHORT_ANSWER_PROMPT}",
            target=list(row["answers"] or []),
            meta={
                "question": row["question"],
                **({"image_id": row["image_id"]} if "image_id" in row else {}),
            },
        )
