"""Pictures of what pruning did: kept / dropped patches on the image, methods side by side, visual tokens
per decoder layer (DyVTE exits, schedules), and the accuracy-vs-speed Pareto plots of an eval run.

Needs matplotlib (``pip install 'vtprune[viz]'``), imported on first use. Every function draws on a
matplotlib axes or figure and returns it; nothing is shown or saved unless asked (``path=``).

Where a token lies on the image is a family fact (:meth:`vtprune.integrations.Integration.token_boxes`):
a square grid (LLaVA), Qwen-VL's merged grid, the base view and the stitched crops of anyres models,
InternVL's tiles and thumbnail. Families with several views of an image get one panel per view.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import get_pruner, unwrap, wrap
from .errors import UsageError
from .registry import get_family

__all__ = [
    "TokenMap",
    "token_map",
    "overlay",
    "show",
    "compare",
    "layer_counts",
    "exit_layers",
    "read_summary",
    "pareto",
    "schedule_counts",
]

VIEW_TITLES = {0: "whole image", 1: "high-resolution crops / tiles"}
_KEPT, _DROPPED = "#1f9e3a", "#101010"


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("vtprune.viz needs matplotlib: pip install 'vtprune[viz]'") from err
    return plt


@dataclass
class TokenMap:
    """Which visual tokens of one image a pruned prefill kept, and where they lie on the image.

    Attributes:
        boxes: ``(n, 4)`` float, ``top, left, bottom, right`` of each visual token as fractions of the
            image (NaN for layout tokens that cover no patch, e.g. row separators).
        views: ``(n,)`` int, the view a token belongs to (0: the whole image; 1: crops or tiles).
        kept: ``(n,)`` bool, the token reached the stage drawn (see :func:`token_map`).
        label: what was run (the setting), for titles.
        stage: ``"input"`` (tokens the language model received) or ``"last"`` (tokens that reached its
            last decoder layer).
        layer_visual: visual tokens each decoder layer processed.
        answer: the generated answer, when asked for.
        pooled: the method replaced the tokens (pooling): a kept cell is a pooled token's anchor, whose
            features average its window.
    """

    boxes: np.ndarray
    views: np.ndarray
    kept: np.ndarray
    label: str = ""
    stage: str = "input"
    layer_visual: list[int] | None = None
    answer: str | None = None
    pooled: bool = False

    @property
    def counted(self) -> np.ndarray:
        """``(n,)`` bool: tokens that cover a patch (layout tokens excluded)."""
        return ~np.isnan(self.boxes).any(-1)

    def summary(self) -> str:
        """``"kept 9 / 36"``: kept tokens over patch tokens (layout tokens not counted)."""
        c = self.counted
        return f"kept {int(self.kept[c].sum())} / {int(c.sum())}"


def _setting_label(setting) -> str:
    if setting is None:
        return "all tokens"
    if isinstance(setting, str):
        return setting
    if isinstance(setting, Mapping):
        rest = [f"{k}={v}" for k, v in setting.items() if k != "method"]
        return " ".join([str(setting.get("method", "?")), *rest])
    if isinstance(setting, (list, tuple)):
        return " + ".join(_setting_label(s) for s in setting)
    return type(setting).__name__.removesuffix("Config").lower()


def token_map(
    model,
    inputs: Mapping[str, Any],
    image_size: tuple[int, int] | None = None,
    stage: str = "auto",
    answer_tokens: int = 0,
    tokenizer=None,
    label: str = "",
) -> TokenMap:
    """Run one prefill of ``model`` (wrapped, or not: then every token is kept) on ``inputs`` and map its
    kept visual tokens onto the image.

    Args:
        model: a transformers VLM, wrapped with :func:`vtprune.wrap` or not.
        inputs: processor output for **one** sample holding **one** image (``input_ids`` ``(1, seq)``...).
        image_size: ``(height, width)`` of the image as given to the processor (families whose layout
            depends on it, e.g. InternVL's tile canvas, need it).
        stage: ``"input"``: the tokens the language model received (pre-LLM selection; pooling methods
            mark each pooled token's anchor cell); ``"last"``: the tokens that reached the last decoder
            layer (in-LLM methods: FastV, exits, schedules); ``"auto"``: ``"last"`` when an in-LLM method
            dropped visual tokens, else ``"input"``.
        answer_tokens: also greedy-generate this many tokens (0: a forward only) and decode them with
            ``tokenizer``.
    """
    if stage not in ("auto", "input", "last"):
        raise UsageError(f"stage={stage!r}; use 'auto', 'input' or 'last'")
    ids = inputs.get("input_ids")
    if ids is None or ids.ndim != 2 or ids.shape[0] != 1:
        raise UsageError("token_map needs the processor output of one sample (input_ids of shape (1, seq))")
    family = get_family(model)
    image_cols = (ids[0] == family.image_token_id).nonzero().squeeze(-1)
    n = int(image_cols.numel())
    if n == 0:
        raise UsageError("the prompt has no image placeholder tokens; pass the processor output of an image")
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    answer = None
    with torch.no_grad():
        if answer_tokens:
            out = model.generate(**inputs, max_new_tokens=answer_tokens, do_sample=False)
            if tokenizer is not None:
                answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        else:
            model(**inputs, use_cache=True, logits_to_keep=1)
    pruner = _pruner_of(model)
    sel = pruner.last[0] if pruner is not None and pruner.last else None
    if sel is not None and sel.visual_in != n:
        raise UsageError(f"the selection covers {sel.visual_in} visual tokens but the prompt has {n}")
    layers = len(family.decoder_layers)
    if sel is None:
        kept_input = np.ones(n, dtype=bool)
        kept_last = kept_input
        layer_visual = [n] * layers
    else:
        kept_input = np.zeros(n, dtype=bool)
        kept_input[sel.kept_visual.numpy()] = True
        out_cols = sel.output_columns if sel.output_columns is not None else sel.kept_columns
        kept_last = np.isin(image_cols.cpu().numpy(), out_cols.numpy())
        layer_visual = list(sel.layer_visual)
    if stage == "auto":
        stage = "last" if kept_last.sum() < kept_input.sum() else "input"
    encode_args = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    boxes = family.token_boxes([n], encode_args, None if image_size is None else [tuple(image_size)])[0]
    if boxes is None:
        raise UsageError(
            f"{model.config.model_type}: where these {n} visual tokens lie on the image is not known "
            "(pass image_size=(height, width) for tiled images; multi-image prompts are not drawn)"
        )
    boxes = boxes.double().numpy()
    return TokenMap(
        boxes=boxes[:, 1:],
        views=np.nan_to_num(boxes[:, 0]).astype(int),
        kept=kept_last if stage == "last" else kept_input,
        label=label,
        stage=stage,
        layer_visual=layer_visual,
        answer=answer,
        pooled=pruner is not None and pruner.parts.transform is not None,
    )


def _center_crop_region(processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Fractions (top, left, bottom, right) of an image of ``size`` that a resize-shortest-edge +
    center-crop image processor (CLIP's, LLaVA-1.5's) keeps; the whole image for processors without
    a center crop or with anyres crops (whose base view is the whole image resized)."""
    ip = getattr(processor, "image_processor", processor)
    if not getattr(ip, "do_center_crop", False) or getattr(ip, "image_grid_pinpoints", None):
        return (0.0, 0.0, 1.0, 1.0)
    shortest = getattr(getattr(ip, "size", None), "shortest_edge", None)
    crop = getattr(ip, "crop_size", None)
    ch, cw = getattr(crop, "height", None), getattr(crop, "width", None)
    if not shortest or not ch or not cw:
        return (0.0, 0.0, 1.0, 1.0)
    h, w = size
    scale = shortest / min(h, w)
    rh, rw = h * scale, w * scale
    fh, fw = min(1.0, ch / rh), min(1.0, cw / rw)
    return ((1 - fh) / 2, (1 - fw) / 2, (1 + fh) / 2, (1 + fw) / 2)


def overlay(
    image,
    tokens: TokenMap,
    axes=None,
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
    alpha: float = 0.65,
    title: bool = True,
):
    """Draw ``image`` (PIL image or ``(h, w, 3)`` array) once per view of ``tokens`` with the dropped
    patches darkened and the kept ones outlined. ``axes``: one axes per view (None: a new figure).
    ``region``: the part of the image the views cover (a center crop). Returns the axes."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    h, w = pixels.shape[:2]
    views = sorted(set(tokens.views[tokens.counted].tolist()))
    if axes is None:
        _, axes = plt.subplots(1, len(views), figsize=(3.2 * len(views), 3.4), squeeze=False)
        axes = axes[0]
    axes = list(np.atleast_1d(axes))
    if len(axes) < len(views):
        raise UsageError(f"these tokens have {len(views)} views; pass {len(views)} axes")
    top, left, bottom, right = region
    for ax, view in zip(axes, views):
        ax.imshow(pixels, extent=(0, w, h, 0))
        sel = tokens.counted & (tokens.views == view)
        for (t, lft, b, r), kept in zip(tokens.boxes[sel], tokens.kept[sel]):
            y0, y1 = (top + t * (bottom - top)) * h, (top + b * (bottom - top)) * h
            x0, x1 = (left + lft * (right - left)) * w, (left + r * (right - left)) * w
            if kept:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=_KEPT, lw=0.8))
            else:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color=_DROPPED, alpha=alpha, lw=0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            n_kept, n_all = int(tokens.kept[sel].sum()), int(sel.sum())
            lines = [tokens.label] if tokens.label else []
            if len(views) > 1:
                lines.append(VIEW_TITLES.get(view, f"view {view}"))
            where = " at the last layer" if tokens.stage == "last" else ""
            lines.append(f"kept {n_kept} / {n_all}{where}" + (" (pooled: anchors)" if tokens.pooled else ""))
            if tokens.answer is not None:
                lines.append(f"answer: {tokens.answer!r}")
            ax.set_title("\n".join(lines), fontsize=8)
    return axes


def _process(processor, image, text):
    if text is None:
        if not getattr(processor, "chat_template", None):
            raise UsageError(
                "this processor has no chat template; pass text= (a prompt with the image token)"
            )
        text = processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}],
                }
            ],
            add_generation_prompt=True,
        )
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def show(
    model,
    processor,
    image,
    setting=None,
    text: str | None = None,
    stage: str = "auto",
    answer_tokens: int = 0,
    axes=None,
):
    """Wrap ``model`` with ``setting`` (a method name, dict, config, or list of them; None: unpruned), run
    it on ``image`` + ``text`` (default: the processor's chat template), draw the overlay, unwrap.
    Returns ``(axes, TokenMap)``. The model must not be wrapped already."""
    if _pruner_of(model) is not None:
        raise UsageError("show() wraps the model itself; vtprune.unwrap(model) first")
    inputs = _process(processor, image, text)
    if setting is not None:
        wrap(model, setting)
    try:
        tokens = token_map(
            model,
            inputs,
            image_size=(image.height, image.width),
            stage=stage,
            answer_tokens=answer_tokens,
            tokenizer=getattr(processor, "tokenizer", None),
            label=_setting_label(setting),
        )
    finally:
        if setting is not None:
            unwrap(model)
    region = _center_crop_region(processor, (image.height, image.width))
    return overlay(image, tokens, axes=axes, region=region), tokens


def _pruner_of(model):
    """The model's pruner, or None when it is not wrapped."""
    try:
        return get_pruner(model)
    except UsageError:
        return None


def compare(
    model,
    processor,
    image,
    settings: Sequence,
    text: str | None = None,
    stage: str = "auto",
    answer_tokens: int = 0,
    path: str | Path | None = None,
):
    """Methods side by side on one image: one column per setting (``None`` for all tokens), one row per
    view of the image. Returns ``(figure, [TokenMap...])``; ``path`` also saves the figure."""
    plt = _pyplot()
    results = []
    for setting in settings:
        inputs = _process(processor, image, text)
        if setting is not None:
            wrap(model, setting)
        try:
            results.append(
                token_map(
                    model,
                    inputs,
                    image_size=(image.height, image.width),
                    stage=stage,
                    answer_tokens=answer_tokens,
                    tokenizer=getattr(processor, "tokenizer", None),
                    label=_setting_label(setting),
                )
            )
        finally:
            if setting is not None:
                unwrap(model)
    n_views = max(len(set(t.views[t.counted].tolist())) for t in results)
    fig, axes = plt.subplots(
        n_views, len(results), figsize=(2.9 * len(results), 3.3 * n_views + 0.3), squeeze=False
    )
    region = _center_crop_region(processor, (image.height, image.width))
    for col, tokens in enumerate(results):
        overlay(image, tokens, axes=axes[:, col], region=region)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig, results


def _counts(value) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(mean, low, high) per layer from a list of ints, a SampleSelection / TokenMap, or a list of those."""
    if hasattr(value, "layer_visual"):
        value = [value]
    value = list(value)
    if value and hasattr(value[0], "layer_visual"):
        per = np.array([v.layer_visual for v in value], dtype=float)
        return per.mean(0), per.min(0), per.max(0)
    return np.asarray(value, dtype=float), None, None


def layer_counts(data: Mapping[str, Any], ax=None, title: str | None = None, path=None):
    """Visual tokens each decoder layer processed, one line per entry of ``data``: label -> a list of
    counts per layer (a schedule's ``keep``), a :class:`~vtprune.runtime.selection.SampleSelection` (or
    :class:`TokenMap`), or a list of selections (a batch: the mean, with the range across samples shaded).
    Returns the axes; ``path`` saves the figure."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, value in data.items():
        mean, low, high = _counts(value)
        layers = np.arange(len(mean))
        (line,) = ax.step(layers, mean, where="mid", marker="o", ms=3, label=label)
        if low is not None and (low != high).any():
            ax.fill_between(layers, low, high, step="mid", alpha=0.12, color=line.get_color(), lw=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens processed")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax


def exit_layers(selections: Sequence, num_layers: int | None = None, ax=None, title: str | None = None):
    """Histogram of the layer after which all visual tokens left (``SampleSelection.exit_layer``; DyVTE,
    static exit), over a batch of selections; samples whose visual tokens never left are their own bar
    ("none"). Returns the axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.0))
    selections = list(selections)
    if not selections:
        raise UsageError("exit_layers needs at least one selection (vtprune.get_pruner(model).last)")
    num_layers = num_layers or len(selections[0].layer_visual)
    exits = [s.exit_layer for s in selections]
    bars = [sum(e == layer for e in exits) for layer in range(num_layers)]
    ax.bar([str(i) for i in range(num_layers)] + ["none"], bars + [sum(e is None for e in exits)])
    ax.set_xlabel("last decoder layer that saw visual tokens")
    ax.set_ylabel("samples")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _number(text: str):
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def read_summary(run: str | Path) -> list[dict]:
    """The rows of an eval run folder's ``summary.csv`` (``vtprune eval --out``), numbers parsed."""
    path = Path(run) / "summary.csv"
    if not path.is_file():
        raise UsageError(f"{run}: no summary.csv; pass a folder `vtprune eval --out` wrote")
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def pareto(run: str | Path, path: str | Path | None = None, metric: str | None = None) -> Path:
    """Accuracy against realised prefill speed-up (TTFT) and against FLOPs reduction, per benchmark, from
    an eval run folder: the harness's own plot (:func:`vtprune.eval.harness.plot_pareto`) redrawn from
    ``summary.csv`` (e.g. for another ``metric``). Writes ``path`` (default ``<run>/pareto.png``) and
    returns it; display it with ``IPython.display.Image(path)``."""
    from .eval.benchmarks import get_benchmark
    from .eval.harness import plot_pareto

    _pyplot()
    rows = read_summary(run)
    main = {}
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        try:
            main[name] = getattr(get_benchmark(name), "main_metric", "")
        except Exception:  # a benchmark registered only in the process that ran the eval
            main[name] = ""
    if metric is not None and not any(metric in r for r in rows):
        columns = sorted({k for r in rows for k in r})
        raise UsageError(f"metric {metric!r} is not a column of summary.csv ({', '.join(columns)})")
    path = Path(path) if path is not None else Path(run) / "pareto.png"
    plot_pareto(path, rows, metric=metric, main_metrics=main)
    return path


def schedule_counts(path: str | Path) -> list[float]:
    """A schedule file's per-layer ``keep`` (``vtprune search`` writes ``schedule.json``), for
    :func:`layer_counts`."""
    data = json.loads(Path(path).read_text())
    keep = data.get("keep")
    if not isinstance(keep, list):
        raise UsageError(f"{path}: no 'keep' list; pass a schedule.json written by `vtprune search`")
    return [float(k) for k in keep]
