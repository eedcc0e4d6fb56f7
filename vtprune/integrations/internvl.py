"""InternVL (``internvl``: transformers' own ``InternVLForConditionalGeneration``, InternVL2.5 / InternVL3 shapes):
the InternViT tower (see :class:`~vtprune.integrations.towers.InternViTTower`) and a 1-D RoPE text model
(Qwen2 / Qwen2.5 as transformers ships it).

Layout, as transformers builds it: the processor cuts each image into ``N`` tiles plus a thumbnail (``N = 1``:
the image alone), and the prompt holds ``<img>`` + ``image_seq_length`` placeholders per tile + ``</img>``.
Every tile is one row of the tower's batch, with its own [CLS]; ``get_image_features`` drops [CLS], folds
2x2 patches into one token (``pixel_shuffle``, ``downsample_ratio`` 0.5) and returns one ``(tiles, tokens,
hidden)`` tensor for the whole batch. The per-image tile counts stop at the processor (it pops
``num_patches``): the model only sees them as the runs of placeholders in the prompt, which is where
vtprune reads them (:meth:`InternVLIntegration.unit_rows`).

What vtprune does on it:

* **Score** (FasterVLM): a token's score is the [CLS] attention mass its 4 patches receive at
  ``vision_feature_layer`` (-1 on InternVL2.5/3: the last layer), averaged over heads, summed over the 4
  patches, from its own tile's [CLS].
* **Budget** (``budget=`` on pre-LLM configs): ``"image"`` (default) is one top-``keep(n)`` over all tiles
  of an image, thumbnail included (``n`` = tiles x tokens per tile): a tile whose [CLS] attention sits on
  a few patches gives those tokens first. Each tile's scores come from its own softmax, so this ranks
  shares of different tiles against each other; ``"tile"`` keeps ``keep(n)`` of every tile (and of the
  thumbnail) separately, which gives every tile the same number of tokens.
* **In-LLM methods** (FastV, static exit, DyVTE) run on the Qwen2 text model unchanged: every
  ``<IMG_CONTEXT>`` placeholder is a visual token, ``<img>`` / ``</img>`` are text.
* **Transforms** (pooling) see a one-tile image as its token grid (16 x 16 on a 448px tile) and an image of
  several tiles as one strip of tokens (tiles are not one grid; their layout on the image never reaches the
  model).
* **Positions**: contiguous by default (kept tokens renumbered, as FasterVLM's LLaVA code prunes the
  features before the prompt is built); ``positions="original"`` keeps the original 1-D positions (gaps
  where tokens were pruned). The text model's RoPE is 1-D, so both are well defined.
* **Processor without torchvision**: transformers' ``InternVLProcessor`` needs a video processor, which
  needs torchvision. :func:`load_processor` (what ``vtprune eval`` calls) loads ``AutoProcessor`` when
  torchvision is installed, else :class:`InternVLProcessorNoVideo` (images and text, PIL image processor
  ``GotOcr2ImageProcessorPil``) from the same folder; it saves as a plain ``InternVLProcessor`` folder.
"""

from __future__ import annotations

import importlib.util
import math
import re
from functools import cache

import torch

from ..errors import UsageError
from ..registry import register_family
from .base import Integration, NoVideoProcessorMixin, grid_boxes

# also InternVLProcessorNoVideo, built lazily (module __getattr__)
__all__ = ["InternVLIntegration", "load_processor", "no_video_processor_class"]


@register_family
class InternVLIntegration(Integration):
    model_types = ("internvl",)
    default_positions = "contiguous"
    budget_modes = ("image", "tile")

    @property
    def tile_tokens(self) -> int:
        """LLM tokens per tile: ``(image_size / patch_size)**2 * downsample_ratio**2``."""
        vision = self.model.config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        return round((size // patch * self.model.config.downsample_ratio) ** 2)

    def unit_rows(self, units, image_mask):
        """Tiles per image: each maximal run of image placeholders in a sample is one image (the processor
        wraps every image in ``<img>...</img>``; a video frame is one run too), ``run / tile_tokens`` tiles.
        Placeholders of two images written back to back with nothing between them read as one image."""
        if not units:
            return []
        per_tile = int(units[0].shape[0])
        mask = torch.nn.functional.pad(image_mask.to(torch.int8), (1, 1))
        edges = mask[:, 1:] - mask[:, :-1]
        starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
        runs = (ends - starts).tolist()
        if any(n % per_tile for n in runs) or any(int(u.shape[0]) != per_tile for u in units):
            raise UsageError(
                f"InternVL prompt: image placeholder runs of {runs} tokens are not whole tiles of {per_tile} "
                "tokens; build prompts with the model's processor"
            )
        return [n // per_tile for n in runs]

    def token_groups(self, units, encode_args, budget):
        """Per tile (a row; rows are joined into images by :meth:`unit_rows`): one group under
        ``budget="tile"`` (joined: one group per tile), None under ``"image"`` (joined: one budget)."""
        if budget == "tile":
            return [torch.zeros(int(u.shape[0]), dtype=torch.long) for u in units]
        return [None] * len(units)

    def token_boxes(self, image_tokens, encode_args, original_sizes=None):
        """A one-tile image: its token grid over the whole image (view 0). ``N`` tiles + thumbnail: each
        tile's grid over its cell of the tile canvas (view 1), the thumbnail's over the whole image (view
        0). The canvas (columns x rows) never reaches the model; it is recomputed with the processor's own
        rule (transformers' ``get_optimal_tiled_canvas``, closest aspect ratio) among the canvases of
        ``N`` tiles, from ``original_sizes`` (None without them)."""
        per_tile = self.tile_tokens
        side = math.isqrt(per_tile)
        tile = self.model.config.vision_config.image_size
        tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        out = []
        for i, n in enumerate(image_tokens):
            tiles = n // per_tile
            if tiles * per_tile != n or side * side != per_tile or tiles < 1:
                out.append(None)
            elif tiles == 1:
                out.append(grid_boxes(side, side, 0))
            elif original_sizes is None or tiles == 2:  # no canvas of one tile gets a thumbnail
                out.append(None)
            else:
                cols, rows = _tile_canvas(original_sizes[i], tile, tiles - 1)
                cells = [
                    grid_boxes(side, side, 1, (r / rows, c / cols, (r + 1) / rows, (c + 1) / cols))
                    for r, c in (divmod(t, cols) for t in range(tiles - 1))
                ]
                out.append(torch.cat(cells + [grid_boxes(side, side, 0)]))
        return out

    @classmethod
    def load_processor(cls, name, **kwargs):
        """:func:`load_processor`: ``AutoProcessor``, or without torchvision the image-and-text processor."""
        return load_processor(name, **kwargs)


def _tile_canvas(size: tuple[int, int], tile: tuple[int, int], count: int) -> tuple[int, int]:
    """``(columns, rows)`` of the canvas of ``count`` tiles the processor chose for an image of ``size``
    ``(height, width)``: its own rule restricted to canvases of that many tiles."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    return get_optimal_tiled_canvas(tuple(size), tile, count, count)


# ------------------------------------------------------------------------------------------ processors
def _has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


@cache
def no_video_processor_class():
    """:class:`InternVLProcessorNoVideo`: transformers' ``InternVLProcessor`` without its video processor
    (images and text only), for machines without torchvision. Built on first use (transformers is imported
    lazily)."""
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class InternVLProcessorNoVideo(NoVideoProcessorMixin, InternVLProcessor):
        """``InternVLProcessor`` for images and text, with no video processor (which needs torchvision).

        Load a saved InternVL folder with ``InternVLProcessorNoVideo.from_pretrained(folder)`` (the image
        processor resolves to ``GotOcr2ImageProcessorPil`` without torchvision); ``save_pretrained`` writes a
        plain ``InternVLProcessor`` folder."""

        no_video_model_name = "InternVL"
        full_processor_class = "InternVLProcessor"

        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            image_seq_length: int = 256,
            chat_template=None,
            **kwargs,
        ):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.image_seq_length = image_seq_length
            self.start_image_token = tokenizer.start_image_token
            self.end_image_token = tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token = tokenizer.context_image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
            )

    InternVLProcessorNoVideo.__module__ = __name__  # importable (and picklable) as this module's attribute
    InternVLProcessorNoVideo.__qualname__ = "InternVLProcessorNoVideo"
    return InternVLProcessorNoVideo


def __getattr__(name: str):
    # ``from vtprune.integrations.internvl import InternVLProcessorNoVideo`` builds the class on first use
    if name == "InternVLProcessorNoVideo":
        return no_video_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_processor(name: str, **kwargs):
    """The processor of an InternVL checkpoint folder or hub id: ``AutoProcessor`` when torchvision is
    installed (it builds InternVL's video processor), else :class:`InternVLProcessorNoVideo` from the same
    files. A folder that cannot be read either way raises the loader's own error, with a hint."""
    from transformers import AutoProcessor

    if _has_torchvision():
        return AutoProcessor.from_pretrained(name, **kwargs)
    try:
        return no_video_processor_class().from_pretrained(name, **kwargs)
    except (ValueError, TypeError, AttributeError) as err:
        raise UsageError(
            f"cannot build InternVL's processor for {name!r} without torchvision ({err}); "
            "pip install torchvision, or load the image processor and tokenizer yourself"
        ) from err
