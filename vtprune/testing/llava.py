"""Tiny LLaVA-1.5: CLIP vision tower + Llama text model."""

from __future__ import annotations

import torch

from . import BOS, IMAGE_TOKEN, PAD, TinyFamily, _left_pad, instantiate, register_tiny

__all__ = ["tiny_llava", "llava_inputs"]


def tiny_llava(
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
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vision_heads: int | None = None,
    kv_heads: int | None = None,
    projection_dim: int | None = None,
    device=None,
    dtype=None,
):
    """A ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama text model.

    ``device`` / ``dtype`` build the weights there directly (no CPU copy of a large model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim or vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=intermediate or text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD,
    )
    return instantiate(
        LlavaForConditionalGeneration,
        config,
        attn_implementation=attn_implementation,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def llava_inputs(model, text_lengths=(5, 9), seed: int = 0) -> dict:
    """Left-padded batch: ``[bos, <image> * n, text...]`` per sample, one image each."""
    cfg = model.config
    vision = cfg.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_text in text_lengths:
        text = torch.randint(4, cfg.text_config.vocab_size, (n_text,), generator=g)
        split = n_text // 2
        rows.append(
            torch.cat(
                [torch.tensor([BOS]), text[:split], torch.full((num_patches,), IMAGE_TOKEN), text[split:]]
            )
        )
    return _left_pad(rows) | {
        "pixel_values": torch.randn(len(rows), 3, vision.image_size, vision.image_size, generator=g)
    }


register_tiny(TinyFamily("llava", tiny_llava, llava_inputs, contiguous=True))
