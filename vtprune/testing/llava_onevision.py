"""Tiny LLaVA-OneVision: SigLIP vision tower (no [CLS]) + Qwen2 text model, anyres_max packing; a
torchvision-free processor and a saved checkpoint for it."""

from __future__ import annotations

import json
from pathlib import Path

from . import BOS, IMAGE_TOKEN, PAD, TinyFamily, instantiate, register_tiny
from .llava_next import anyres_inputs, tiny_pinpoints, word_tokenizer

__all__ = [
    "tiny_llava_onevision",
    "onevision_inputs",
    "tiny_llava_onevision_processor",
    "save_tiny_llava_onevision",
    "VIDEO_TOKEN",
    "ONEVISION_CHAT_TEMPLATE",
]

VIDEO_TOKEN = 4
# llava-hf/llava-onevision-qwen2-*-hf's ChatML template, reduced (no system turn)
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_llava_onevision(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    vocab_size: int = 128,
    intermediate: int | None = None,
    grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_1",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    kv_heads: int | None = None,
    device=None,
    dtype=None,
):
    """A ``LlavaOnevisionForConditionalGeneration``: SigLIP tower (feature layer -1, ``"full"`` strategy, as
    the llava-hf checkpoints), Qwen2 text model. ``vision_aspect_ratio="anyres_max_1"`` (checkpoints: 9)
    makes the tiny crop grids large enough to be interpolated down."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=text_hidden,
        intermediate_size=intermediate or text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        vocab_size=vocab_size,
        max_position_embeddings=8192,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=grid_pinpoints or tiny_pinpoints(image_size),
        pad_token_id=PAD,
    )
    return instantiate(
        LlavaOnevisionForConditionalGeneration,
        config,
        attn_implementation=attn_implementation,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def onevision_inputs(
    model, image_sizes=((40, 70), (30, 30)), text_lengths=(5, 9), images_per_sample=None, seed=0
):
    """Left-padded batch of two single-image samples: the first (40 x 70) has a 2x2 crop grid that
    ``anyres_max_1`` interpolates down, the second (30 x 30) a single crop left as is. See
    :func:`~vtprune.testing.llava_next.anyres_inputs` for multi-image samples."""
    return anyres_inputs(model, image_sizes, text_lengths, images_per_sample, seed)


def tiny_llava_onevision_processor(model):
    """A torchvision-free LLaVA-OneVision processor matching :func:`tiny_llava_onevision`
    (:func:`~vtprune.integrations.llava_onevision.image_only_processor_class`: no video processor): the word
    tokenizer, ``LlavaOnevisionImageProcessorPil`` with the model's pinpoints, its ``anyres_max`` and
    ``"full"`` strategy, and a (reduced) ChatML template."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..integrations.llava_onevision import image_only_processor_class

    vision = model.config.vision_config
    special = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tokenizer = word_tokenizer(model, special, {"image_token": "<image>", "video_token": "<video>"})
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    return image_only_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        vision_aspect_ratio=model.config.vision_aspect_ratio,
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


def save_tiny_llava_onevision(folder, **kwargs):
    """Save a tiny LLaVA-OneVision checkpoint (model + processor, ``save_pretrained``, plus the video
    processor's config a transformers checkpoint carries) that ``vtprune eval --model <folder>`` loads with
    or without torchvision; returns the folder."""
    model = tiny_llava_onevision(**kwargs)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tiny_llava_onevision_processor(model).save_pretrained(folder)
    size = model.config.vision_config.image_size
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": size, "width": size}}
    (Path(folder) / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return folder


register_tiny(TinyFamily("llava_onevision", tiny_llava_onevision, onevision_inputs, contiguous=True))
