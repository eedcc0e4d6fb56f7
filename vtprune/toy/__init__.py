"""The shipped toy VLM and synthetic VQA benchmark: the embedded default of ``vtprune demo`` / ``eval``.

No pretrained VLM or benchmark data can be downloaded offline, so accuracy-versus-speed claims are shown on a
model of our own that is actually trained (:mod:`vtprune.toy.train`) from the real transformers classes,
and a benchmark published in the same shape as the hub ones (:mod:`vtprune.toy.synthetic`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import PROMPT_TEMPLATE, build_prompt

__all__ = [
    "TOY_MODEL_DIR",
    "TOY_DATASET_DIR",
    "TOY_VIDEO_MODEL_DIR",
    "TOY_VIDEO_DATASET_DIR",
    "PROMPT_TEMPLATE",
    "build_prompt",
    "load_toy_model",
    "load_toy_video_model",
    "load_toy_benchmark",
    "answer_questions",
    "normalize_answer",
]

ASSETS = Path(__file__).parent / "assets"
TOY_MODEL_DIR = ASSETS / "toy-llava"
TOY_DATASET_DIR = ASSETS / "synthetic_vqa"
TOY_VIDEO_MODEL_DIR = ASSETS / "toy-llava-video"
TOY_VIDEO_DATASET_DIR = ASSETS / "synthetic_video_qa"


def _load(folder: Path, command: str, device, dtype):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy model at {folder}; train it with `python -m {command} --out {folder}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_toy_model(device="cpu", dtype=torch.float32):
    """``(model, processor)`` loaded with ``from_pretrained`` from the package folder (offline)."""
    return _load(TOY_MODEL_DIR, "vtprune.toy.train", device, dtype)


def load_toy_video_model(device="cpu", dtype=torch.float32):
    """The toy fine-tuned on the synthetic video clips (:mod:`vtprune.toy.train_video`; stored in float16,
    loaded as ``dtype``): ``(model, processor)``; prompts hold one ``<image>`` per frame."""
    return _load(TOY_VIDEO_MODEL_DIR, "vtprune.toy.train_video", device, dtype)


def load_toy_benchmark(split: str = "test"):
    """The synthetic benchmark through ``datasets.load_dataset`` on its hub-mirror folder."""
    import datasets

    return datasets.load_dataset(str(TOY_DATASET_DIR), split=split)


def normalize_answer(text: str) -> str:
    """First word, lower-cased, without surrounding punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


@torch.no_grad()
def answer_questions(model, processor, images, questions, batch_size: int = 32, max_new_tokens: int = 3):
    """Greedy single-word answers, batched with left padding."""
    answers = []
    for start in range(0, len(questions), batch_size):
        imgs = list(images[start : start + batch_size])
        texts = [build_prompt(q) for q in questions[start : start + batch_size]]
        inputs = processor(images=imgs, text=texts, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        decoded = processor.tokenizer.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        answers.extend(normalize_answer(t) for t in decoded)
    return answers
