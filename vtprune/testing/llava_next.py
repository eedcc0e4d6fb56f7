"""Tiny LLaVA-NeXT (anyres): CLIP vision tower + Llama text model, base view + crops per image; a
torchvision-free processor and a saved checkpoint for it; the mid-size random LLaVA-NeXT the prefill
measurement uses."""

from __future__ import annotations

import torch

from . import BOS, IMAGE_TOKEN, PAD, TinyFamily, _left_pad, instantiate, register_tiny

__all__ = [
    "tiny_llava_next",
    "anyres_inputs",
    "anyres_token_count",
    "tiny_pinpoints",
    "word_tokenizer",
    "tiny_llava_next_processor",
    "save_tiny_llava_next",
    "mid_llava_next",
    "NEXT_CHAT_TEMPLATE",
]

# llava-hf/llava-v1.6-vicuna-7b-hf's template, reduced: USER: <image> ... ASSISTANT:
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's grid resolutions in units of the tower's input size (1x1 added: one-crop images)."""
    return [[image_size * h, image_size * w] for h, w in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))]


def tiny_llava_next(
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
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vision_heads: int | None = None,
    kv_heads: int | None = None,
    device=None,
    dtype=None,
):
    """A ``LlavaNextForConditionalGeneration``: CLIP tower (feature layer -2, ``"default"`` strategy, as the
    llava-hf checkpoints) and a Llama text model; ``grid_pinpoints`` default to :func:`tiny_pinpoints`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
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
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=grid_pinpoints or tiny_pinpoints(image_size),
        pad_token_id=PAD,
    )
    return instantiate(
        LlavaNextForConditionalGeneration,
        config,
        attn_implementation=attn_implementation,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def _views(model, size, cropped: bool) -> int:
    import sys

    if not cropped:
        return 1
    cfg = model.config
    hf = sys.modules[type(model.model).__module__]
    return hf.image_size_to_num_patches(
        image_size=list(size),
        grid_pinpoints=cfg.image_grid_pinpoints,
        patch_size=cfg.vision_config.image_size,
    )


def anyres_token_count(model, size, cropped: bool = True) -> int:
    """Visual tokens of one image of ``size`` (h, w): transformers' own ``pack_image_features`` run on a
    zero feature tensor of the right shape (independent of vtprune). ``cropped=False``: a OneVision image
    of a multi-image sample (base view only)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    strategy = model.config.vision_feature_select_strategy
    has_cls = vision.model_type == "clip_vision_model"
    positions = side * side + (1 if has_cls and strategy == "full" else 0)
    fake = [torch.zeros(_views(model, size, cropped), positions, 1)]
    kwargs = {"image_newline": torch.zeros(1)}
    if model.config.model_type == "llava_next":
        kwargs["vision_feature_select_strategy"] = strategy
    else:
        kwargs["vision_aspect_ratio"] = model.config.vision_aspect_ratio
    with torch.no_grad():
        packed, _ = model.model.pack_image_features(fake, torch.tensor([list(size)]), **kwargs)
    return int(packed[0].shape[0])


def anyres_inputs(
    model,
    image_sizes=((40, 70), (20, 70)),
    text_lengths=(5, 9),
    images_per_sample=None,
    seed: int = 0,
) -> dict:
    """A left-padded batch for LLaVA-NeXT / OneVision: ``[bos, text, <image> * n, (text, <image> * n)..., text]``
    per sample. ``image_sizes``: (h, w) of every image in prompt order; ``images_per_sample``: how many of
    them each sample holds (default one each). The defaults give two samples with 5 and 4 views (base +
    2x2 and 1x3 crops), the first unpadded. OneVision crops only single-image samples
    (``batch_num_images`` is returned for it)."""
    cfg = model.config
    vision = cfg.vision_config
    per_sample = list(images_per_sample or [1] * len(image_sizes))
    if sum(per_sample) != len(image_sizes) or len(per_sample) != len(text_lengths):
        raise ValueError("images_per_sample must split image_sizes into one group per text length")
    onevision = cfg.model_type == "llava_onevision"
    g = torch.Generator().manual_seed(seed)
    rows, views, image = [], [], 0
    for n_images, n_text in zip(per_sample, text_lengths):
        text = torch.randint(5, cfg.text_config.vocab_size, (n_text,), generator=g)
        parts = [torch.tensor([BOS]), text[: n_text // 2]]
        cropped = not onevision or n_images == 1
        for i in range(n_images):
            size = image_sizes[image + i]
            if i:
                parts.append(text[i - 1 : i])  # one text token between two images
            parts.append(torch.full((anyres_token_count(model, size, cropped),), IMAGE_TOKEN))
            views.append(_views(model, size, cropped))
        parts.append(text[n_text // 2 :])
        rows.append(torch.cat(parts))
        image += n_images
    pixel_values = torch.zeros(len(image_sizes), max(views), 3, vision.image_size, vision.image_size)
    for i, count in enumerate(views):  # the processor's layout: crops beyond an image's count are padding
        pixel_values[i, :count] = torch.randn(count, 3, vision.image_size, vision.image_size, generator=g)
    out = _left_pad(rows) | {"pixel_values": pixel_values, "image_sizes": torch.tensor(image_sizes)}
    if onevision:
        out["batch_num_images"] = torch.tensor(per_sample)
    return out


def word_tokenizer(model, special: list[str], extra_special: dict[str, str]):
    """A word-level tokenizer (lower-cased, whitespace split) over the synthetic benchmark's words, whose
    first ids are ``special`` (``<pad>``, ``<s>``, ``</s>`` at the tiny models' ids, then the image token...)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..toy.synthetic import vocabulary

    vocab = {tok: i for i, tok in enumerate(special + [w for w in vocabulary() if w not in special])}
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
        extra_special_tokens=extra_special,
        padding_side="left",
    )
    assert tokenizer.pad_token_id == PAD and tokenizer.bos_token_id == BOS
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    return tokenizer


def tiny_llava_next_processor(model):
    """A torchvision-free ``LlavaNextProcessor`` matching :func:`tiny_llava_next`: the word tokenizer,
    ``LlavaNextImageProcessorPil`` at the tower's resolution with the model's grid pinpoints, and a
    (reduced) Vicuna chat template."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vision = model.config.vision_config
    size = vision.image_size
    tokenizer = word_tokenizer(
        model, ["<pad>", "<s>", "</s>", "<image>", "<unk>"], {"image_token": "<image>"}
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=NEXT_CHAT_TEMPLATE,
    )


def save_tiny_llava_next(folder, **kwargs):
    """Save a tiny LLaVA-NeXT checkpoint (model + processor, ``save_pretrained``) that ``vtprune eval
    --model <folder>`` loads; returns the folder."""
    model = tiny_llava_next(**kwargs)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    tiny_llava_next_processor(model).save_pretrained(folder)
    return folder


def mid_llava_next(device="cpu", dtype=torch.float32):
    """A mid-size random LLaVA-NeXT: 336px CLIP/14 views (576 patches each), a 6-layer 256-d tower, a
    16-layer 768-d Llama (as ``vtprune.speed.mid_llava``), LLaVA-NeXT's grid pinpoints. A 672x672 image is
    the base view + 2x2 crops: 576 + 48 x (48 + 1) = 2928 visual tokens."""
    return tiny_llava_next(
        image_size=336,
        patch_size=14,
        vision_hidden=256,
        vision_layers=6,
        text_hidden=768,
        text_layers=16,
        heads=8,
        vocab_size=4096,
        intermediate=2048,
        grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        device=device,
        dtype=dtype,
    )


register_tiny(TinyFamily("llava_next", tiny_llava_next, anyres_inputs, contiguous=True))
