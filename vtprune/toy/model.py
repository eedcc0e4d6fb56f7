"""The toy LLaVA: real transformers classes (CLIP vision tower with [CLS], Llama text model, LlavaProcessor)
at a size that trains on a laptop CPU, with a word-level tokenizer over the synthetic benchmark's words."""

from __future__ import annotations

import torch

from .synthetic import IMAGE_SIZE, PATCH_SIZE, vocabulary

__all__ = ["PROMPT_TEMPLATE", "build_prompt", "build_tokenizer", "build_processor", "build_model"]

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def build_prompt(question: str, num_images: int = 1) -> str:
    """The toy model's prompt for one question (LLaVA-1.5 style): one ``<image>`` line per image (a video's
    frames are one image each, as LLaVA-OneVision feeds them)."""
    if num_images < 1:
        raise ValueError(f"the toy model reads at least one image, got num_images={num_images}")
    return PROMPT_TEMPLATE.replace("<image>\n", "<image>\n" * num_images).format(
        question=question.strip().lower()
    )


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, split on whitespace)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


def build_processor(tokenizer=None):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def build_model(tokenizer, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=128,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,  # the default, 576, is LLaVA-1.5's
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
