"""Tiny random-weight models of the real transformers classes, and matching inputs, for tests and benchmarks.

Nothing here touches a hub: models are built from configs (``from_config`` semantics) with fixed seeds.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_llava", "llava_inputs", "tiny_qwen_vl", "qwen_vl_inputs"]

IMAGE_TOKEN = 3
PAD, BOS = 0, 1


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
):
    """A ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama text model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=intermediate or text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
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
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # fixed-length greedy runs in tests
    return model


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


def _left_pad(rows: list[torch.Tensor]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 5, 6, 7


def tiny_qwen_vl(
    version: str = "2", *, attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 2
):
    """A ``Qwen2VLForConditionalGeneration`` (``version="2"``) or Qwen2.5-VL (``"2.5"``) with tiny sizes."""
    import transformers as tf

    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    ids = dict(image_token_id=QWEN_IMAGE, vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND)
    if version == "2":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            mlp_ratio=2,
        )
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def qwen_vl_inputs(model, grids=((1, 8, 8), (1, 8, 12)), text_lengths=(4, 7), seed: int = 0) -> dict:
    """One image per sample with the given ``(t, h, w)`` patch grids; left-padded."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size**2
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    g = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for (t, h, w), n_text in zip(grids, text_lengths):
        n_img = t * h * w // merge
        text = torch.randint(10, model.config.text_config.vocab_size, (n_text,), generator=g)
        split = n_text // 2
        row = torch.cat(
            [
                torch.tensor([BOS]),
                text[:split],
                torch.tensor([QWEN_VSTART]),
                torch.full((n_img,), QWEN_IMAGE),
                torch.tensor([QWEN_VEND]),
                text[split:],
            ]
        )
        rows.append(row)
        types.append((row == QWEN_IMAGE).int())
    batch = _left_pad(rows)
    width = batch["input_ids"].shape[1]
    mm_types = torch.zeros((len(rows), width), dtype=torch.int)
    for i, t in enumerate(types):
        mm_types[i, width - len(t) :] = t
    total = sum(t * h * w for t, h, w in grids)
    return batch | {
        "pixel_values": torch.randn(total, patch_dim, generator=g),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": mm_types,
    }
