"""LLaVA-OneVision (``llava_onevision``): a SigLIP tower (see
:class:`~vtprune.integrations.towers.SiglipTower`: **no** [CLS]), LLaVA-NeXT's anyres packing with
``anyres_max_N`` and multi-image prompts, and a Qwen2 text model (1-D RoPE).

Everything in :mod:`vtprune.integrations.llava_next` holds (scores packed by the model's own
``pack_image_features``, newline tokens never pruned, budgets ``"crop"`` (default) and ``"image"``,
contiguous positions by default), with three differences:

* **Score**: SigLIP has no [CLS], so FasterVLM's score is the CLS-free *received attention*
  (statistic ``"received"``): the attention a patch receives, averaged over every patch of its own view
  (query) and over heads, at the tower layer that produces the features (``vision_feature_layer``,
  OneVision: -1, the last encoder layer). It is the stand-in FasterVLM's authors give for towers
  without [CLS] (VisPruner#1, as for Qwen-VL).
* **anyres_max_N**: when the unpadded crop grid holds more than about ``N`` views' worth of patches,
  the model shrinks it by bilinear interpolation; the score channel is interpolated with the features
  (a token's score is the same bilinear blend of its patches' scores as its feature), and an
  interpolated token belongs, for ``budget="crop"``, to the crop with the largest share of its weight.
* **Multi-image prompts**: a sample with several images encodes each as its base view only (no crops,
  one newline token after it), as ``get_image_features`` does with ``batch_num_images``; each image is
  still its own budget unit.

Videos (``pixel_values_videos``) are not pruned: their tokens are not image placeholders and reach the
LLM whole.

**Processor without torchvision.** ``AutoProcessor`` builds OneVision's video processor, which needs
torchvision, even for images. :meth:`LlavaOnevisionIntegration.load_processor` (what ``vtprune eval`` uses)
loads ``AutoProcessor`` when torchvision is installed and otherwise
:func:`image_only_processor_class` from the same folder: the same processor (image processor
``LlavaOnevisionImageProcessorPil``, token counts, chat template) without the video processor, refusing
videos. In your own code: ``LlavaOnevisionIntegration.load_processor(folder)``, or
``pip install torchvision``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..registry import register_family
from .base import NoVideoProcessorMixin
from .llava_next import LlavaNextIntegration

__all__ = ["LlavaOnevisionIntegration", "image_only_processor_class"]


@register_family
class LlavaOnevisionIntegration(LlavaNextIntegration):
    model_types = ("llava_onevision",)

    def _views(self, sizes, encode_args):
        views = super()._views(sizes, encode_args)
        per_sample = encode_args.get("batch_num_images")
        if per_sample is None:  # transformers treats every image as a single-image sample then
            return views
        # as LlavaOnevisionModel.get_image_features: images of multi-image samples are not cropped
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        if len(single) != len(views):
            raise RuntimeError(f"batch_num_images counts {len(single)} images, image_sizes {len(views)}")
        return [v if s else 1 for v, s in zip(views, single)]

    def _pack(self, maps, sizes, newline, encode_args):
        ratio = encode_args.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.base_model.pack_image_features(
            maps, torch.tensor(sizes), image_newline=newline, vision_aspect_ratio=ratio
        )
        return packed

    @classmethod
    def load_processor(cls, name, **kwargs):
        """``AutoProcessor`` with torchvision installed, else :func:`image_only_processor_class` from the
        same files (images and text; videos refused)."""
        from transformers import AutoProcessor

        if importlib.util.find_spec("torchvision") is not None:
            return AutoProcessor.from_pretrained(name, **kwargs)
        return image_only_processor_class().from_pretrained(name, **kwargs)


@functools.cache
def image_only_processor_class():
    """``LlavaOnevisionProcessor`` without its video processor (which needs torchvision): construct it as
    ``LlavaOnevisionProcessor`` minus ``video_processor``, or ``from_pretrained(folder)`` on a OneVision
    processor folder; ``save_pretrained`` writes a folder ``AutoProcessor`` loads as the full processor
    where torchvision is installed. Built on first use (transformers is imported lazily)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class LlavaOnevisionProcessorNoVideo(NoVideoProcessorMixin, LlavaOnevisionProcessor):
        no_video_model_name = "LLaVA-OneVision"
        full_processor_class = "LlavaOnevisionProcessor"

        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            chat_template=None,
            image_token="<image>",
            video_token="<video>",
            vision_aspect_ratio="anyres_max_9",
            **kwargs,
        ):
            # LlavaOnevisionProcessor.__init__'s attributes, then the mixin without a video processor
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token = getattr(tokenizer, "image_token", image_token)
            self.video_token = getattr(tokenizer, "video_token", video_token)
            ids = tokenizer.convert_tokens_to_ids
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or ids(self.image_token)
            self.video_token_id = getattr(tokenizer, "video_token_id", None) or ids(self.video_token)
            self.vision_aspect_ratio = vision_aspect_ratio
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return LlavaOnevisionProcessorNoVideo
