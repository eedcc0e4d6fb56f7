"""Tiny Qwen2-VL and Qwen2.5-VL (window attention, one full-attention block)."""

from __future__ import annotations

import torch

from . import BOS, PAD, TinyFamily, _left_pad, register_tiny

__all__ = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "qwen_vl_inputs"]

QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 5, 6, 7


def _tiny_qwen_vl(
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


def tiny_qwen2_vl(**kwargs):
    return _tiny_qwen_vl("2", **kwargs)


def tiny_qwen2_5_vl(**kwargs):
    return _tiny_qwen_vl("2.5", **kwargs)


register_tiny(TinyFamily("qwen2_vl", tiny_qwen2_vl, qwen_vl_inputs, contiguous=False))
register_tiny(TinyFamily("qwen2_5_vl", tiny_qwen2_5_vl, qwen_vl_inputs, contiguous=False))
