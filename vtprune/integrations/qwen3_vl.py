"""Qwen3-VL (``qwen3_vl``) and Qwen3-VL-MoE (``qwen3_vl_moe``): the Qwen ViT layout of Qwen2-VL (no [CLS],
2x2 merged patches, M-RoPE positions kept original; every ViT block attends fully within a frame), plus
*deepstack*: features merged from intermediate ViT blocks are added to the hidden states at the visual
positions after each of the first decoder layers (``Qwen3VLTextModel._deepstack_process``).

The language model takes them as ``visual_pos_masks`` ``(batch, seq)`` and ``deepstack_visual_embeds`` (one
``(visual tokens, hidden)`` tensor per deepstack layer, rows in the mask's row-major order). The family
declares them as side inputs: the engine slices them with the kept visual tokens before the LLM and with
the tokens an in-LLM method leaves between layers, so each remaining visual token keeps its own deepstack
rows. A transform (pooling) keeps the deepstack rows of the placeholder its new token is written at (the
anchor cell); the deepstack rows are not pooled.

The MoE variant differs in the text MLP only (same vision tower, deepstack and positions): FLOPs count the
routed experts each token runs.
"""

from __future__ import annotations

from ..registry import register_family
from ..runtime.visual_inputs import VisualSideInputs
from .base import TextDims
from .qwen2_vl import QwenVLIntegration

__all__ = ["Qwen3VLIntegration"]


@register_family
class Qwen3VLIntegration(QwenVLIntegration):
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def visual_side_inputs(self) -> VisualSideInputs:
        return VisualSideInputs(
            mask="visual_pos_masks",
            rows=("deepstack_visual_embeds",),
            consumer="_deepstack_process",
            consumer_args=("visual_pos_masks", "visual_embeds"),
        )

    def text_dims(self) -> TextDims:
        text = self.model.config.get_text_config()
        experts = getattr(text, "num_experts_per_tok", None)
        if experts is None:
            return super().text_dims()
        # MoE: each token runs num_experts_per_tok gated experts of moe_intermediate_size (the router's
        # matmul is negligible); layers listed in mlp_only_layers run the dense MLP instead, ignored here.
        return TextDims(
            text.hidden_size, experts * text.moe_intermediate_size, True, len(self.decoder_layers)
        )
