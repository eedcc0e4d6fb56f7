"""LLaVA-1.5 (``llava``): CLIP-style vision tower with a [CLS] token, features from ``vision_feature_layer``."""

from __future__ import annotations

from .base import Integration, register_integration

__all__ = ["LlavaIntegration"]


@register_integration
class LlavaIntegration(Integration):
    model_types = ("llava",)
    # FasterVLM (LLaVA code base) prunes the features before building the prompt: positions are contiguous.
    default_positions = "contiguous"

    def _encoder_layers(self):
        tower = self.inner.vision_tower
        tower = getattr(tower, "vision_model", tower)  # transformers < 5 nests the encoder one level down
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if layers is None:
            raise NotImplementedError(
                f"vision tower {type(self.inner.vision_tower).__name__} is not CLIP-like "
                "(.vision_model.encoder.layers); [CLS]-attention scoring needs a CLIP vision tower"
            )
        return layers

    def check(self, config) -> None:
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={strategy!r}: vtprune supports LLaVA's 'default' strategy "
                "(the [CLS] token is not a visual token)"
            )

    def probe_target(self, config, kind: str):
        layers = self._encoder_layers()
        layer = getattr(config, "vision_layer", None)
        if layer is None:
            feature_layer = self.model.config.vision_feature_layer
            if not isinstance(feature_layer, int):
                raise NotImplementedError(
                    f"vision_feature_layer={feature_layer!r} concatenates several layers; set "
                    "vision_layer=<encoder layer index> in the config to choose which [CLS] attention to use"
                )
            # hidden_states[f] is the output of encoder layer f - 1 (index 0 is the embeddings).
            layer = len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1
        elif layer < 0:
            layer = len(layers) + layer
        if not 0 <= layer < len(layers):
            raise ValueError(f"vision_layer {layer} is out of range for a {len(layers)}-layer vision tower")
        return layers[layer].self_attn, "cls"

    def image_scores(self, records, features, encode_args):
        if encode_args.get("image_sizes") is not None:
            raise NotImplementedError("LLaVA with image_sizes (variable-resolution towers) is not supported")
        if len(records) != 1:
            raise RuntimeError(f"expected one [CLS] attention record per encoder call, got {len(records)}")
        (scores,) = records  # (num_images, num_patches)
        if scores.shape[0] != len(features) or any(f.shape[0] != scores.shape[1] for f in features):
            raise RuntimeError(
                f"[CLS] attention has shape {tuple(scores.shape)} but the features are "
                f"{[tuple(f.shape) for f in features]}"
            )
        return list(scores.unbind(0))
