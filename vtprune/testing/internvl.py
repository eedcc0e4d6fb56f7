"""Tiny InternVL (transformers' ``InternVLForConditionalGeneration``): InternViT tiles + Qwen2 text model,
a torchvision-free processor for it, and the mid-size random InternVL the prefill measurement uses."""

from __future__ import annotations

import torch

from . import BOS, IMAGE_TOKEN, PAD, TinyFamily, _left_pad, instantiate, register_tiny

__all__ = [
    "tiny_internvl",
    "internvl_inputs",
    "tiny_internvl_processor",
    "save_tiny_internvl",
    "mid_internvl",
    "IMG_START",
    "IMG_END",
]

IMG_START, IMG_END = 5, 6  # <img>, </img>; IMAGE_TOKEN (3) is <IMG_CONTEXT>
_SPECIAL = [
    "<pad>",
    "<s>",
    "</s>",
    "<IMG_CONTEXT>",
    "<unk>",
    "<img>",
    "</img>",
    "<video>",
    "<|im_start|>",
    "<|im_end|>",
]
# InternVL's own chat template, reduced: a system-less ChatML conversation, images as <IMG_CONTEXT>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<IMG_CONTEXT> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    " <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_internvl(
    *,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    vocab_size: int = 128,
    intermediate: int | None = None,
    vision_feature_layer: int = -1,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    device=None,
    dtype=None,
):
    """An ``InternVLForConditionalGeneration``: InternViT (``image_size`` tiles of ``patch_size`` patches,
    [CLS], pixel shuffle 0.5) and a Qwen2 text model. Defaults: 32px tiles of 8x8 patches = 16 tokens."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        use_mean_pooling=True,
    )
    text = dict(
        hidden_size=text_hidden,
        intermediate_size=intermediate or text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        vocab_size=vocab_size,
        max_position_embeddings=8192,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    tokens = (image_size // patch_size // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=tokens,
        downsample_ratio=0.5,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=PAD,
    )
    return instantiate(
        InternVLForConditionalGeneration,
        config,
        attn_implementation=attn_implementation,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def internvl_inputs(
    model, images=((3,), (5,)), text_lengths=(5, 9), seed: int = 0, pixel_values: bool = True
) -> dict:
    """Left-padded batch, one sample per entry of ``images`` (the tile count of each of its images: ``N``
    tiles + thumbnail, or 1): ``[bos, text..., (<img> <IMG_CONTEXT> * tokens * tiles </img>)..., text...]``.
    Default: one image each, of 3 and 5 tiles. With more (fewer) ``text_lengths`` than ``images`` entries, the
    entries are cycled (cut): one sample per text length."""
    cfg = model.config
    vision = cfg.vision_config
    size, patch = vision.image_size[0], vision.patch_size[0]
    per_tile = (size // patch // 2) ** 2
    g = torch.Generator().manual_seed(seed)
    images = [images[i % len(images)] for i in range(len(text_lengths))]
    rows = []
    for tiles, n_text in zip(images, text_lengths):
        text = torch.randint(10, cfg.text_config.vocab_size, (n_text,), generator=g)
        split = n_text // 2
        parts = [torch.tensor([BOS]), text[:split]]
        for count in tiles:
            parts += [
                torch.tensor([IMG_START]),
                torch.full((per_tile * count,), IMAGE_TOKEN),
                torch.tensor([IMG_END]),
            ]
        rows.append(torch.cat(parts + [text[split:]]))
    total = sum(sum(t) for t in images)
    out = _left_pad(rows)
    if pixel_values:
        out["pixel_values"] = torch.randn(total, 3, size, size, generator=g)
    return out


def tiny_internvl_processor(model, max_tiles: int = 4):
    """A torchvision-free processor matching :func:`tiny_internvl`: a word-level tokenizer whose special
    tokens sit at the model's ids, ``GotOcr2ImageProcessorPil`` cutting images into up to ``max_tiles``
    tiles (+ thumbnail), and InternVL's prompt layout and (reduced) chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..integrations.internvl import no_video_processor_class
    from ..toy.synthetic import vocabulary

    words = [w for w in vocabulary() if w not in _SPECIAL]
    vocab = {tok: i for i, tok in enumerate(_SPECIAL + words)}
    if len(vocab) > model.config.text_config.vocab_size:
        raise ValueError(f"the tokenizer needs {len(vocab)} ids; build the model with a larger vocab_size")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "context_image_token": "<IMG_CONTEXT>",
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "video_token": "<video>",
        },
        padding_side="left",
    )
    assert tokenizer.context_image_token_id == model.config.image_token_id
    size = model.config.vision_config.image_size[0]
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    return no_video_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=model.config.image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_internvl(folder, **kwargs):
    """Save a tiny InternVL checkpoint (model + processor, ``save_pretrained``) that ``vtprune eval --model
    <folder>`` loads; returns the folder."""
    model = tiny_internvl(**kwargs)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tiny_internvl_processor(model).save_pretrained(folder)
    return folder


def mid_internvl(device="cpu", dtype=torch.float32):
    """A mid-size random InternVL: 448px tiles of 14px patches (256 tokens a tile after pixel shuffle), a
    6-layer 256-d InternViT, a 16-layer 768-d Qwen2 text model (as ``vtprune.speed.mid_llava``)."""
    return tiny_internvl(
        image_size=448,
        patch_size=14,
        vision_hidden=256,
        vision_layers=6,
        vision_heads=8,
        text_hidden=768,
        text_layers=16,
        heads=8,
        vocab_size=4096,
        intermediate=2048,
        device=device,
        dtype=dtype,
    )


register_tiny(TinyFamily("internvl", tiny_internvl, internvl_inputs, contiguous=True))
