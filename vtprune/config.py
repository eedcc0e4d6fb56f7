"""Validated, JSON-serialisable pruning configs.

Every method has one config dataclass that names the method in its ``method`` class attribute; defining
the class registers the name. ``PruneConfig.from_dict`` dispatches on the ``"method"`` key, so a config
written by ``to_json`` reads back as the same type. ``to_dict`` carries a ``version``: a config written by a
different config version is refused rather than silently misread.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from .errors import UsageError, UsageTypeError

__all__ = [
    "PruneConfig",
    "VisualTokenConfig",
    "config_class",
    "available_methods",
    "check_int",
    "check_ratio",
    "check_number",
]

_CONFIGS: dict[str, type[PruneConfig]] = {}

POSITION_MODES = ("auto", "contiguous", "original")


def available_methods() -> list[str]:
    return sorted(_CONFIGS)


def config_class(method: str) -> type[PruneConfig]:
    try:
        return _CONFIGS[method]
    except KeyError:
        raise UsageError(
            f"unknown pruning method {method!r}; available methods: {', '.join(available_methods())}"
        ) from None


# ----------------------------------------------------------------------------- field checks (one idiom)
def check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise UsageError(f"{name} must be an int{bound}{' or None' if optional else ''}, got {value!r}")


def check_number(
    name: str, value: Any, low: float, high: float, *, closed_low: bool, closed_high: bool
) -> None:
    """``value`` must be a real number (not a bool or a string) in the interval."""
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number in {interval}, got {value!r}")
    ok_low = value >= low if closed_low else value > low
    ok_high = value <= high if closed_high else value < high
    if not (ok_low and ok_high):
        raise UsageError(f"{name} must be in {interval}, got {value}")


def check_ratio(name: str, value: Any) -> None:
    """A fraction of tokens kept, in (0, 1]."""
    check_number(name, value, 0.0, 1.0, closed_low=False, closed_high=True)


@dataclasses.dataclass
class PruneConfig:
    """Base of all method configs. A subclass sets ``method = "<name>"`` and is a dataclass.

    Args:
        pad_to_multiple_of: keyword-only, every method: left-pad the language model's shortened input (and
            the shorter sequence after an in-LLM drop) to a multiple of this many tokens (at most the unpruned
            length), so that a compiled model meets few distinct shapes across prompts and reuses its graphs.
            The padding is masked: outputs equal the unpadded run's up to floating-point reordering. None
            (default): no padding.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    pad_to_multiple_of: int | None = dataclasses.field(default=None, kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("method")
        if name:
            if name in _CONFIGS and _CONFIGS[name].__qualname__ != cls.__qualname__:
                raise ValueError(f"method {name!r} is already registered by {_CONFIGS[name].__name__}")
            _CONFIGS[name] = cls

    def __post_init__(self) -> None:
        check_int("pad_to_multiple_of", self.pad_to_multiple_of, minimum=1, optional=True)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~vtprune.errors.UsageError` with a message that says what to change."""

    def replace(self, **overrides: Any) -> PruneConfig:
        _check_fields(type(self), overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if fields["pad_to_multiple_of"] is None:  # an execution option: absent unless set
            del fields["pad_to_multiple_of"]
        return {"method": self.method, "version": self.version, **fields}

    def to_json(self, path: str | Path | None = None, **json_kwargs: Any) -> str:
        text = json.dumps(self.to_dict(), **({"indent": 2} | json_kwargs))
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        data = dict(data)
        method = data.pop("method", None)
        if method is None:
            if cls is PruneConfig:
                raise UsageError("config dict needs a 'method' key, e.g. {'method': 'fastervlm', ...}")
            method = cls.method
        target = config_class(method)
        if cls is not PruneConfig and target is not cls:
            raise UsageError(f"config dict is for method {method!r}, not {cls.method!r}")
        version = data.pop("version", target.version)
        if version != target.version:
            raise UsageError(
                f"this {method!r} config was written by config version {version}; this vtprune reads version "
                f"{target.version}: rewrite it with the current fields"
            )
        _check_fields(target, data)
        return target(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PruneConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def _check_fields(cls: type[PruneConfig], data: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageTypeError(
            f"unknown field(s) {unknown}: method {cls.method!r} has no option(s) by that name; "
            f"valid: {sorted(names)}"
        )


@dataclasses.dataclass
class VisualTokenConfig(PruneConfig):
    """Shared fields of methods that keep a fraction of each image's visual tokens before the LLM.

    Args:
        keep_ratio: fraction of each image's visual tokens kept, in (0, 1]; ``k = max(1, round(ratio * n))``.
        positions: position ids of the kept tokens. ``"contiguous"`` renumbers them as if only the kept
            tokens had been in the prompt (what FasterVLM does in the LLaVA code base); ``"original"`` keeps
            each token's original position (needed for M-RoPE); ``"auto"`` takes the model family's default
            (contiguous for 1-D RoPE families, original for Qwen-VL's M-RoPE).
        budget: what one keep budget covers: ``"image"`` (every family), or a finer unit a family offers
            (tiles, crops); ``"auto"`` takes the family's default.
    """

    keep_ratio: float = 0.25
    positions: str = "auto"
    budget: str = "auto"

    def validate(self) -> None:
        check_ratio("keep_ratio", self.keep_ratio)
        if self.positions not in POSITION_MODES:
            raise UsageError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if not isinstance(self.budget, str) or not self.budget:
            raise UsageError(f"budget must be 'auto' or a budget mode name, got {self.budget!r}")
