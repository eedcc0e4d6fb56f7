"""Load a VLM and its processor for evaluation, and answer batches of benchmark samples with it.

User mistakes are :class:`~vtprune.errors.UsageError` (one line from the CLI), raised before anything heavy is
loaded: a device this machine lacks (``--device cuda`` without CUDA), an unknown dtype, a model path that does
not exist, a folder without a (valid) ``config.json`` or holding a model that is not a vision-language model,
and a hub id that cannot be fetched (offline and not cached). Other exceptions are bugs and keep their
traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UsageError
from ..integrations import load_processor
from ..registry import get_family
from .harness import timed_generate

__all__ = ["load_model", "Answerer", "chat_prompt", "resolve_device", "resolve_dtype", "DTYPES"]


def chat_prompt(processor, prompt: str, num_images: int) -> str:
    """The model's own chat template with ``num_images`` image slots before the text (LLaVA / lmms-eval
    style); processors without a template get LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    return "USER: " + "<image>\n" * num_images + prompt + " ASSISTANT:"


DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def resolve_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``; :class:`~vtprune.errors.UsageError` when it is not a device name or
    names an accelerator this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps...)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device!r}: MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype | None:
    """``None`` for ``"auto"`` (the checkpoint's), else the torch dtype of that name."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return None if dtype == "auto" else getattr(torch, dtype)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(err: BaseException) -> str:
    """The error's whole message on one line (config validation errors put the useful part on line 2)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def load_model(name: str, device: str = "cpu", dtype: str = "auto"):
    """``"toy"`` (the shipped toy LLaVA), ``"toy-video"`` (its video fine-tune) or a local folder / hub id
    loaded with ``from_pretrained``.

    Returns ``(model, processor, prompt_fn)`` with ``prompt_fn(processor, prompt, num_images) -> str``.
    A missing folder, a folder that holds no vision-language model, an unknown or unreachable hub id, a bad
    device or dtype raise :class:`~vtprune.errors.UsageError` saying what to pass instead.
    """
    resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if name in ("toy", "toy-video"):
        from ..toy import build_prompt, load_toy_model, load_toy_video_model

        load = load_toy_model if name == "toy" else load_toy_video_model
        try:
            model, processor = load(device=device, dtype=torch_dtype or torch.float32)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        return model, processor, lambda proc, prompt, n: build_prompt(prompt, n)
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(name).expanduser()
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "~"))
    if not path.exists() and not hub_id:
        raise UsageError(f"--model {name!r}: no such folder (and not a hub id 'org/name')")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--model {name!r} is a file; pass the model's folder (with config.json)")
    where = f"folder {name!r}" if path.exists() else f"hub id {name!r}"
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as err:  # no config.json, unknown repository, offline and not cached
        hint = "" if path.exists() else " (offline? download it first, or pass a local folder)"
        raise UsageError(f"--model: cannot load the config of {where}: {_first_line(err)}{hint}") from err
    except (ValueError, TypeError, StrictDataclassError) as err:  # unknown model type, invalid config.json
        raise UsageError(f"--model: {where}: {_describe(err)}") from err
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UsageError(
            f"--model: {where} holds a {config.model_type!r} model, not a vision-language model "
            "(AutoModelForImageTextToText cannot load it)"
        )
    try:
        processor = load_processor(name, config.model_type)  # AutoProcessor, or the family's own loader
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype or "auto")
    except OSError as err:  # processor or weight files missing
        raise UsageError(f"--model: cannot load {where}: {_first_line(err)}") from err
    return model.to(device).eval(), processor, chat_prompt


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
        image_token = get_family(model).image_token_id
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        visual = ((inputs["input_ids"] == image_token) & mask.bool()).sum(-1).tolist()
        real = mask.sum(-1).tolist()
        stats["prompt"] = [{"text": r - v, "visual": v} for r, v in zip(real, visual)]
        return predictions, stats
