"""Validated, JSON-serialisable pruning configs.

Every method has one config dataclass, registered under the method's name. ``PruneConfig.from_dict``
dispatches on the ``"method"`` key, so a config written by ``to_json`` reads back as the same type.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["PruneConfig", "VisualTokenConfig", "register_config", "config_class", "available_methods"]

_CONFIGS: dict[str, type[PruneConfig]] = {}

POSITION_MODES = ("auto", "contiguous", "original")


def register_config(name: str):
    """Class decorator: register a config dataclass under a method name (``"fastervlm"``, ...)."""

    def deco(cls: type[PruneConfig]) -> type[PruneConfig]:
        if name in _CONFIGS:
            raise ValueError(f"method {name!r} is already registered by {_CONFIGS[name].__name__}")
        cls.method = name
        _CONFIGS[name] = cls
        return cls

    return deco


def _load_methods() -> None:
    from .methods import _ensure_loaded  # methods import this module: load them lazily

    _ensure_loaded()


def available_methods() -> list[str]:
    _load_methods()
    return sorted(_CONFIGS)


def config_class(method: str) -> type[PruneConfig]:
    _load_methods()
    try:
        return _CONFIGS[method]
    except KeyError:
        raise ValueError(
            f"unknown pruning method {method!r}; available methods: {', '.join(available_methods())}"
        ) from None


@dataclasses.dataclass
class PruneConfig:
    """Base of all method configs. Subclasses are dataclasses registered with :func:`register_config`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a message that says what to change."""

    def replace(self, **overrides: Any) -> PruneConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

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
                raise ValueError("config dict needs a 'method' key, e.g. {'method': 'fastervlm', ...}")
            method = cls.method
        target = config_class(method)
        if cls is not PruneConfig and target is not cls:
            raise ValueError(f"config dict is for method {method!r}, not {cls.method!r}")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for method {method!r}; valid fields: {sorted(names)}"
            )
        return target(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PruneConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass
class VisualTokenConfig(PruneConfig):
    """Shared fields of methods that keep a fraction of each image's visual tokens before the LLM.

    Args:
        keep_ratio: fraction of each image's visual tokens kept, in (0, 1]; ``k = max(1, round(ratio * n))``.
        positions: position ids of the kept tokens. ``"contiguous"`` renumbers them as if only the kept
            tokens had been in the prompt (what FasterVLM does in the LLaVA code base); ``"original"`` keeps
            each token's original position (needed for M-RoPE); ``"auto"`` takes the model family's default
            (contiguous for 1-D RoPE families, original for Qwen-VL's M-RoPE).
    """

    keep_ratio: float = 0.25
    positions: str = "auto"

    def validate(self) -> None:
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(
                f"keep_ratio must be in (0, 1] (fraction of visual tokens kept), got {self.keep_ratio}"
            )
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
