"""Tiny Qwen3-VL (deepstack after the first 3 decoder layers) and Qwen3-VL-MoE."""

from __future__ import annotations

from . import BOS, PAD, TinyFamily, instantiate, register_tiny
from .qwen2_vl import QWEN_IMAGE, QWEN_VEND, QWEN_VIDEO, QWEN_VSTART, qwen_vl_inputs

__all__ = ["tiny_qwen3_vl", "tiny_qwen3_vl_moe", "mid_qwen3_vl", "QWEN_VIDEO"]


def _tiny_qwen3_vl(
    moe: bool = False,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    text_layers: int = 2,
    vision_depth: int = 3,
    deepstack: tuple[int, ...] = (0, 1, 2),
    hidden: int = 64,
    vision_hidden: int = 32,
    heads: int = 4,
    patch_size: int = 4,
    intermediate: int | None = None,
    kv_heads: int | None = None,
    vocab_size: int = 128,
    position_grid: int = 8,
    device=None,
):
    """A ``Qwen3VLForConditionalGeneration`` (or the MoE class) with tiny sizes. ``deepstack``: the ViT
    blocks whose merged features are added after decoder layers ``0, 1, ...`` (all 3 blocks by default,
    so that in-LLM drops after layers 0-2 meet them)."""
    import transformers as tf

    head_dim = hidden // heads
    text = dict(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        # interleaved M-RoPE over head_dim / 2 frequencies: T gets the rest, H and W every third
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * (head_dim // 8), head_dim // 8, head_dim // 8],
            "mrope_interleaved": True,
        },
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    if moe:
        text |= dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1
        )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        out_hidden_size=hidden,
        num_heads=heads,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=position_grid**2,
        deepstack_visual_indexes=list(deepstack),
    )
    ids = dict(
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VSTART,
        vision_end_token_id=QWEN_VEND,
    )
    if moe:
        config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen3VLMoeForConditionalGeneration
    else:
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen3VLForConditionalGeneration
    return instantiate(cls, config, attn_implementation=attn_implementation, seed=seed, device=device)


def mid_qwen3_vl(device="cpu", moe: bool = False):
    """A mid-size random Qwen3-VL for speed figures, shaped like :func:`vtprune.speed.mid_qwen2_vl`: a 6-block
    256-d ViT (8 heads, 16-px patches, deepstack from blocks 1, 3, 5) and a 16-layer 768-d text model (8
    heads, 4 KV heads, MLP 2048). A 224x224 frame is 14x14 patches = 49 merged tokens."""
    return _tiny_qwen3_vl(
        moe,
        text_layers=16,
        vision_depth=6,
        deepstack=(1, 3, 5),
        hidden=768,
        vision_hidden=256,
        heads=8,
        kv_heads=4,
        patch_size=16,
        intermediate=2048,
        vocab_size=4096,
        position_grid=16,
        device=device,
    )


def tiny_qwen3_vl(**kwargs):
    return _tiny_qwen3_vl(False, **kwargs)


def tiny_qwen3_vl_moe(**kwargs):
    return _tiny_qwen3_vl(True, **kwargs)


register_tiny(TinyFamily("qwen3_vl", tiny_qwen3_vl, qwen_vl_inputs, contiguous=False))
register_tiny(TinyFamily("qwen3_vl_moe", tiny_qwen3_vl_moe, qwen_vl_inputs, contiguous=False))
