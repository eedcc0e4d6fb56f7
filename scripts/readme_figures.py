"""Regenerate the README's pictures from the shipped toy model (offline, CPU):

* ``docs/overlay.png``: which patches each method keeps on one test image (``vtprune.viz.compare``);
* ``docs/layers.png``: visual tokens per decoder layer over a batch (in-LLM methods, DyVTE's exits);
* ``docs/pareto.png``: accuracy against realised prefill speed-up and FLOPs reduction from a
  ``vtprune eval`` run of the synthetic test split (``vtprune.viz.pareto``), with its ``summary.md``
  copied beside it (``docs/pareto_summary.md``) so the numbers behind the picture are at hand.

    python scripts/readme_figures.py                 # full test split (756 questions), ~10 CPU minutes
    python scripts/readme_figures.py --limit 64      # a quick look
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import vtprune  # noqa: E402
from vtprune import viz  # noqa: E402
from vtprune.cli import main as cli  # noqa: E402
from vtprune.toy import build_prompt, load_toy_benchmark, load_toy_model  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
METHODS = [
    "none",
    "fastervlm:keep_ratio=0.5,0.25,0.1",
    "random:keep_ratio=0.5,0.25,0.1",
    "pool:tokens=9,4",
    "crosslmm:tokens=9,4",
    "static_exit:layer=2,3",
    "dyvte:threshold=0.5",
]


def overlay(model, processor, data, index: int) -> None:
    row = data[index]
    settings = [
        None,
        {"method": "fastervlm", "keep_ratio": 0.25},
        {"method": "random", "keep_ratio": 0.25},
        {"method": "pool", "tokens": 9},
        {"method": "fastv", "layer": 1, "keep_ratio": 0.25},
    ]
    fig, _ = viz.compare(
        model, processor, row["image"], settings, text=build_prompt(row["question"]), answer_tokens=3
    )
    fig.suptitle(f"toy LLaVA, question: {row['question']!r} (answer {row['answer']!r})", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "overlay.png", dpi=100)


def layers(model, processor, data) -> None:
    batch = data.select(range(64))
    inputs = processor(
        images=list(batch["image"]),
        text=[build_prompt(q) for q in batch["question"]],
        return_tensors="pt",
        padding=True,
    )
    runs = {}
    for label, setting in {
        "all tokens": None,
        "FastV K=1, keep 25%": {"method": "fastv", "layer": 1, "keep_ratio": 0.25},
        "static exit before layer 2": {"method": "static_exit", "layer": 2},
        "DyVTE (shipped gates)": {"method": "dyvte", "threshold": 0.5},
        "schedule 36, 22, 11, 4": {"method": "schedule", "keep": [36, 22, 11, 4], "unit": "count"},
    }.items():
        if setting is None:
            runs[label] = [36] * len(model.model.language_model.layers)
            continue
        vtprune.wrap(model, setting)
        try:
            with torch.no_grad():
                model(**inputs)
            runs[label] = vtprune.get_pruner(model).last
        finally:
            vtprune.unwrap(model)
    ax = viz.layer_counts(runs, title="toy LLaVA, 64 questions: mean (range shaded)")
    ax.figure.tight_layout()
    ax.figure.savefig(DOCS / "layers.png", dpi=100)


def pareto(run: Path, limit: int | None) -> None:
    args = ["eval", "--model", "toy", "--benchmarks", "synthetic", "--batch-size", "64", "--out", str(run)]
    if limit:
        args += ["--limit", str(limit)]
    cli(args + ["--methods", *METHODS])
    viz.pareto(run, path=DOCS / "pareto.png")
    shutil.copyfile(run / "summary.md", DOCS / "pareto_summary.md")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=None, help="questions of the test split (default: all)")
    parser.add_argument("--run", default="runs/readme-figures", help="eval run folder (resumed if present)")
    parser.add_argument("--image", type=int, default=3, help="test-split row drawn in overlay.png")
    parser.add_argument("--skip-eval", action="store_true", help="only the overlay and layer pictures")
    args = parser.parse_args()
    DOCS.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model, processor = load_toy_model()
    data = load_toy_benchmark("test")
    overlay(model, processor, data, args.image)
    layers(model, processor, data)
    if not args.skip_eval:
        pareto(Path(args.run), args.limit)
    print(f"wrote {', '.join(sorted(p.name for p in DOCS.iterdir()))} under {DOCS}")


if __name__ == "__main__":
    main()
