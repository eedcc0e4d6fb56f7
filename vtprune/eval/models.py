"""Load a VLM and its processor for evaluation, and answer batches of benchmark samples with it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .harness import timed_generate

__all__ = ["load_model", "Answerer", "chat_prompt"]


def chat_prompt(processor, prompt: str, num_images: int) -> str:
    """The model's own chat template with ``num_images`` image slots before the text (LLaVA / lmms-eval
    style); processors without a template get LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    return "USER: " + "<image>\n" * num_images + prompt + " ASSISTANT:"


def load_model(name: str, device: str = "cpu", dtype: str = "auto"):
    """``"toy"`` (the shipped toy LLaVA) or a local folder / hub id loaded with ``from_pretrained``.

    Returns ``(model, processor, prompt_fn)`` with ``prompt_fn(processor, prompt, num_images) -> str``.
    """
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    if name == "toy":
        from ..toy import build_prompt, load_toy_model

        model, processor = load_toy_model(device=device, dtype=torch_dtype or torch.float32)
        return model, processor, lambda proc, prompt, n: build_prompt(prompt)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name)
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype or "auto").to(device).eval()
    return model, processor, chat_prompt


class Answerer:
    """Callable ``(samples, model, generation_kwargs) -> (predictions, stats)`` for the harness.

    Builds one left-padded processor batch, generates greedily, and reports timing plus the per-sample
    prompt token counts (text and visual) used for FLOPs.
    """

    def __init__(self, processor, prompt_fn: Callable, device="cpu"):
        self.processor, self.prompt_fn, self.device = processor, prompt_fn, torch.device(device)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

    def __call__(self, samples, model, generation_kwargs=None):
        texts = [self.prompt_fn(self.processor, s.prompt, len(s.images)) for s in samples]
        images = [img for s in samples for img in s.images]
        inputs = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        kwargs = {"do_sample": False, "max_new_tokens": 16} | dict(generation_kwargs or {})
        new, stats = timed_generate(model, inputs, **kwargs)
        predictions = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        image_token = model.config.image_token_id
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        visual = ((inputs["input_ids"] == image_token) & mask.bool()).sum(-1).tolist()
        real = mask.sum(-1).tolist()
        stats["prompt"] = [{"text": r - v, "visual": v} for r, v in zip(real, visual)]
        return predictions, stats
