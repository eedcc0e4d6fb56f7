"""What a model family tells the runtime: layout facts only, never method policy.

A family answers neutral questions: where the multimodal base model, language model and decoder layers
are; which token id marks visual positions; which feature rows form one budget unit; which vision tower it
has (:mod:`vtprune.integrations.towers`, shared by vision ``model_type``); the text model's dimensions for
FLOPs; and which position-id modes its rotary embedding admits. Methods ask; families never read a method's
fields.

To add a family, write one module in this package with an ``Integration`` subclass decorated by
:func:`vtprune.registry.register_family`; the package imports every module in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedError, UsageError, UsageTypeError
from ..runtime.visual_inputs import Modality, VisualSideInputs
from .towers import VisionTower, get_tower

__all__ = ["Integration", "NoVideoProcessorMixin", "TextDims", "grid_boxes", "load_processor"]


class NoVideoProcessorMixin:
    """Before a transformers processor class: the processor without its video processor (which needs
    torchvision), for images and text. Loading ignores a saved ``video_processor``, a ``videos=`` call is refused
    clearly, and ``save_pretrained`` records the full processor's class so that ``AutoProcessor`` loads it where
    torchvision is installed."""

    no_video_model_name: ClassVar[str] = ""  # in the refusal, e.g. "InternVL"
    full_processor_class: ClassVar[str] = ""  # the full processor's class name, e.g. "InternVLProcessor"

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        processor_dict = {k: v for k, v in processor_dict.items() if k != "video_processor"}
        return super().from_args_and_dict(args, processor_dict, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise UsageError(
                f"this {self.no_video_model_name} processor has no video processor (torchvision is not "
                "installed): pass images only, or pip install torchvision and use AutoProcessor"
            )
        return super().__call__(images=images, text=text, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["processor_class"] = self.full_processor_class
        return out


@dataclass(frozen=True)
class TextDims:
    """The language model's sizes, for FLOPs: hidden size, MLP width, gated (SwiGLU) MLP, layer count."""

    hidden: int
    intermediate: int
    gated: bool
    num_layers: int


class Integration:
    """Family facts. Subclasses set ``model_types`` and, where they differ, the class attributes below.

    Attributes:
        model_types: the ``config.model_type`` values this family runs.
        position_modes: position-id modes the family's rotary embedding admits for kept tokens.
        default_positions: the mode ``positions="auto"`` means.
        budget_modes: what one keep budget may cover; the first is the default (``budget="auto"``).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    position_modes: ClassVar[tuple[str, ...]] = ("contiguous", "original")
    default_positions: ClassVar[str] = "contiguous"
    budget_modes: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, model: nn.Module):
        self.model = model
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "language_model") or not hasattr(inner, "get_image_features"):
            raise UsageTypeError(
                f"{type(model).__name__} does not look like a transformers *ForConditionalGeneration model "
                "(expected .model.language_model and .model.get_image_features); wrap the full VLM"
            )
        self._tower: VisionTower | None = None

    # ----------------------------------------------------------------------------------- where things are
    @property
    def base_model(self) -> nn.Module:
        """The multimodal base model (``LlavaModel``, ``Qwen2VLModel``...): ``get_image_features``, ``forward``."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.base_model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        """The language model's norm after its last decoder layer (maps a hidden state ``(..., hidden)`` to
        the space the LM head reads; DART compares tokens there)."""
        return self.language_model.norm

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def vision_tower(self) -> VisionTower:
        """The tower's layout facts (attention modules, [CLS] or not, token map), by vision model type."""
        if self._tower is None:
            self._tower = get_tower(self.model)
        return self._tower

    # --------------------------------------------------------------------------------------- layout facts
    def budget_units(self, image_features: Any) -> list[torch.Tensor]:
        """The ``(n, hidden)`` feature tensors of each budget unit, in placeholder order, from the
        ``pooler_output`` of ``get_image_features``. Default: one unit per image feature tensor."""
        units = list(image_features)
        if units and units[0].ndim == 3:  # a (num_images, tokens, dim) tensor per entry
            units = [f for batch in units for f in batch]
        return units

    def unit_rows(self, units: list[torch.Tensor], image_mask: torch.Tensor) -> list[int]:
        """How many consecutive :meth:`budget_units` rows form one budget unit, per unit in placeholder order,
        read from the prompt (``image_mask``: ``(batch, seq)`` bool, True at image placeholders). For
        families whose encoder output cannot tell where an image ends (InternVL's tiles: the processor's
        per-image tile counts never reach the model, only the placeholder runs in the prompt do). The rows
        are scored (and grouped, by :meth:`token_groups`) one by one at encoding, then joined: the keep
        rule applies to a joined unit as a whole, or per group when its rows have groups. Default: every
        row is a unit."""
        return [1] * len(units)

    def token_groups(
        self, units: list[torch.Tensor], encode_args: dict[str, Any], budget: str
    ) -> list[torch.Tensor | None]:
        """Per unit, None (one budget over the unit) or ``(n,)`` long budget groups, -1 for tokens that are
        always kept (see :class:`~vtprune.runtime.parts.VisualUnit`). ``budget`` is a resolved budget mode.
        Default: one group per unit.

        Also asked with the multimodal forward's arguments for features that never passed the vision hook
        (encoded before ``wrap``): a family whose layout needs arguments the call lacks raises
        :class:`~vtprune.errors.UsageError` rather than let layout tokens be pruned."""
        return [None] * len(units)

    def token_frames(
        self, units: list[torch.Tensor], encode_args: dict[str, Any]
    ) -> list[torch.Tensor | None]:
        """Per unit, None (one frame: an image) or ``(n,)`` long frame index of each token (a video). A budget
        that spans several frames keeps at least the best-scored token of each (the per-frame floor).
        Default: every unit is one frame."""
        return [None] * len(units)

    def token_scores(
        self, records: list[torch.Tensor], units: list[torch.Tensor], encode_args: dict[str, Any]
    ) -> list[torch.Tensor]:
        """One ``(n_i,)`` value per visual token of each unit from a vision probe's records. Default: the
        tower's own map (:meth:`~vtprune.integrations.towers.VisionTower.to_tokens`); families that
        rearrange the tower's rows (anyres crops packed with row separators) override it and pack the
        tower's :meth:`~vtprune.integrations.towers.VisionTower.feature_values` as they pack features."""
        return self.vision_tower().to_tokens(records, units, encode_args)

    def token_grids(
        self, units: list[torch.Tensor], encode_args: dict[str, Any]
    ) -> list[tuple[int, int] | None]:
        """Per unit, ``(rows, cols)`` when its tokens are a row-major 2-D grid of the image (``rows * cols``
        equal to its token count), else None. ``encode_args``: the arguments of the image encoding or of the
        multimodal forward (``pixel_values``, ``image_grid_thw``...). Default: a square grid when the token
        count is a perfect square (fixed-resolution square towers), else None; families with other
        layouts (non-square images, layout tokens) override it."""
        grids = []
        for unit in units:
            n = int(unit.shape[0])
            side = math.isqrt(n)
            grids.append((side, side) if side * side == n and n > 0 else None)
        return grids

    def token_boxes(
        self,
        image_tokens: list[int],
        encode_args: dict[str, Any],
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> list[torch.Tensor | None]:
        """Where each visual token of each image lies on that image, for pictures (:mod:`vtprune.viz`).

        Args:
            image_tokens: visual tokens per image (one budget unit each, after joining), placeholder order.
            encode_args: the model's image arguments of the call (``pixel_values``, ``image_grid_thw``,
                ``image_sizes``...).
            original_sizes: ``(height, width)`` of each image as the user gave it, or None.

        Returns:
            per image, ``(n, 5)`` float: ``view, top, left, bottom, right`` of each token, the box as
            fractions of the image the processor's views cover (view 0: a view of the whole image; 1: the
            higher-resolution crops or tiles, where a family has them); NaN boxes for layout tokens that
            cover no patch (row separators). None when the layout is not known. Default: the
            :meth:`token_grids` grid over the whole image, view 0.
        """
        grids = self.token_grids([torch.empty(n, 0) for n in image_tokens], encode_args)
        return [None if g is None else grid_boxes(*g) for g in grids]

    def modalities(self) -> list[Modality]:
        """The visual inputs the engine prunes, each with its placeholder token and encoder. Default: images.
        Families that also prune videos add a :class:`~vtprune.runtime.visual_inputs.Modality` for them
        (their layout questions then see a video's arguments under the image names)."""
        return [Modality("image", self.image_token_id, "get_image_features", "pixel_values")]

    def visual_side_inputs(self) -> VisualSideInputs | None:
        """Language-model inputs indexed by visual position (Qwen3-VL's deepstack features), which the
        engine slices with the visual tokens at compaction and between decoder layers; None (default): the
        language model takes embeddings, mask and positions only."""
        return None

    def text_dims(self) -> TextDims:
        text = self.model.config.get_text_config()
        mlp = self.decoder_layers[0].mlp
        gated = hasattr(mlp, "gate_proj") or getattr(text, "hidden_act", "silu") in ("silu", "swiglu")
        return TextDims(text.hidden_size, text.intermediate_size, gated, len(self.decoder_layers))

    def resolve_positions(self, mode: str) -> str:
        mode = self.default_positions if mode == "auto" else mode
        if mode not in self.position_modes:
            raise UnsupportedError(
                f"positions={mode!r} is undefined for {self.model.config.model_type} (its rotary positions "
                f"admit {self.position_modes}); use 'auto'"
            )
        return mode

    def resolve_budget(self, mode: str) -> str:
        mode = self.budget_modes[0] if mode == "auto" else mode
        if mode not in self.budget_modes:
            raise UsageError(
                f"budget={mode!r} is not offered for {self.model.config.model_type} (it offers "
                f"{self.budget_modes}); use 'auto'"
            )
        return mode

    @classmethod
    def load_processor(cls, name: str, **kwargs):
        """The processor of a checkpoint folder or hub id (``vtprune eval``). Default: ``AutoProcessor``;
        families whose transformers processor needs optional packages (torchvision for a video processor)
        override it."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name, **kwargs)


def load_processor(name: str, model_type: str, **kwargs):
    """The processor of a checkpoint of ``model_type``: its family's :meth:`Integration.load_processor`
    (``AutoProcessor`` for model types vtprune does not know)."""
    from ..registry import family_class

    return (family_class(model_type) or Integration).load_processor(name, **kwargs)


def grid_boxes(rows: int, cols: int, view: int = 0, region=(0.0, 0.0, 1.0, 1.0)) -> torch.Tensor:
    """``(rows * cols, 5)`` boxes (``view, top, left, bottom, right``) of a row-major token grid laid over
    ``region`` (``top, left, bottom, right`` fractions of the image)."""
    top, left, bottom, right = region
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)
    h, w = (bottom - top) / rows, (right - left) / cols
    return torch.stack(
        [torch.full_like(r, view), top + r * h, left + c * w, top + (r + 1) * h, left + (c + 1) * w], -1
    )
