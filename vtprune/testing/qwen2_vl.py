"""Tiny Qwen2-VL and Qwen2.5-VL (window attention, one full-attention block)."""

from __future__ import annotations

import torch

from . import BOS, PAD, TinyFamily, _left_pad, instantiate, register_tiny

__all__ = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "qwen_vl_inputs", "qwen_vl_media_inputs", "QWEN_VIDEO"]

QWEN_IMAGE, QWEN_VSTART, QWEN_VEND = 5, 6, 7
QWEN_VIDEO = 8  # the tiny configs' video placeholder (the configs' default is outside the vocabulary)


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
    ids = dict(
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VSTART,
        vision_end_token_id=QWEN_VEND,
    )
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
    return instantiate(cls, config, attn_implementation=attn_implementation, seed=seed)


def qwen_vl_inputs(model, grids=((1, 8, 8), (1, 8, 12)), text_lengths=(4, 7), seed: int = 0) -> dict:
    """One image per sample with the given ``(t, h, w)`` patch grids; left-padded. As many samples as
    ``text_lengths`` (the first grids are used; more samples than grids is a ValueError)."""
    if len(text_lengths) > len(grids):
        raise ValueError(f"{len(text_lengths)} text lengths for {len(grids)} image grids")
    grids = tuple(grids)[: len(text_lengths)]
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


def qwen_vl_media_inputs(
    model,
    samples=((("video", (4, 8, 8)),), (("image", (1, 8, 12)), ("video", (2, 8, 8)))),
    text_lengths=(4, 7),
    seed: int = 0,
) -> dict:
    """A left-padded batch whose samples hold images and videos: ``samples[b]`` lists ``(kind, (t, h, w))``
    patch grids in prompt order (``kind``: ``"image"`` or ``"video"``; a video of ``t`` temporal patch
    groups). Qwen3-VL prompts separate a video's frames by a timestamp token and vision start/end tokens
    (its processor's layout, which its M-RoPE index expects); Qwen2-VL / 2.5-VL wrap the whole video once."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size**2
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    per_frame = model.config.model_type.startswith("qwen3")
    video_token = model.config.video_token_id
    g = torch.Generator().manual_seed(seed)
    rows, types, pixels, grids = [], [], {"image": [], "video": []}, {"image": [], "video": []}
    for items, n_text in zip(samples, text_lengths):
        text = torch.randint(10, model.config.text_config.vocab_size, (n_text,), generator=g)
        parts = [torch.tensor([BOS]), text[: n_text // 2]]
        for kind, (t, h, w) in items:
            token = QWEN_IMAGE if kind == "image" else video_token
            frame = torch.full((h * w // merge,), token)
            if kind == "video" and per_frame:
                for i in range(t):  # "<t seconds> <vision_start> frame <vision_end>"
                    parts += [torch.tensor([20 + i, QWEN_VSTART]), frame, torch.tensor([QWEN_VEND])]
            else:
                parts += [torch.tensor([QWEN_VSTART]), frame.repeat(t), torch.tensor([QWEN_VEND])]
            pixels[kind].append(torch.randn(t * h * w, patch_dim, generator=g))
            grids[kind].append((t, h, w))
        parts.append(text[n_text // 2 :])
        row = torch.cat(parts)
        rows.append(row)
        types.append((row == QWEN_IMAGE).int() + 2 * (row == video_token).int())
    batch = _left_pad(rows)
    width = batch["input_ids"].shape[1]
    mm_types = torch.zeros((len(rows), width), dtype=torch.int)
    for i, t in enumerate(types):
        mm_types[i, width - len(t) :] = t
    out = batch | {"mm_token_type_ids": mm_types}
    if pixels["image"]:
        out |= {"pixel_values": torch.cat(pixels["image"]), "image_grid_thw": torch.tensor(grids["image"])}
    if pixels["video"]:
        out |= {
            "pixel_values_videos": torch.cat(pixels["video"]),
            "video_grid_thw": torch.tensor(grids["video"]),
        }
    return out
