"""A deterministic synthetic VQA benchmark: small coloured shapes on a 3x3 grid, single-word answers.

Each question depends on one or a few small regions of the image (a shape occupies about a ninth of a cell's
area), so pruning the wrong visual tokens costs accuracy. Question types::

    color     what color is the circle ?            (the shape appears once)        -> red
    shape     what shape is in the top-left ?       (an occupied cell)              -> square
    count     how many triangles are there ?                                        -> 0 .. 4
    exists    is there a blue square ?              (balanced yes / no)             -> yes
    position  where is the green circle ?           (the colour-shape pair is unique) -> bottom-right

``python -m vtprune.toy.synthetic --out vtprune/toy/assets/synthetic_vqa`` regenerates the shipped test split
as a folder mirroring a hub dataset repo (``datasets.load_dataset(folder, split="test")``).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "POSITIONS",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "Scene",
    "make_scene",
    "render",
    "questions_for",
    "generate",
    "write_hub_folder",
    "SPLIT_SEEDS",
]

IMAGE_SIZE = 96
PATCH_SIZE = 16  # 6 x 6 = 36 visual tokens per image: 2 x 2 per grid cell
GRID = 3
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)  # fmt: skip
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
QUESTION_TYPES = ("color", "shape", "count", "exists", "position")
SPLIT_SEEDS = {"train": 1_000_003, "test": 7}  # disjoint streams; test scenes are also checked against train


@dataclass(frozen=True)
class Item:
    shape: str
    color: str
    cell: int  # 0..8, row-major


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    jitter: tuple[tuple[int, int, int], ...]  # per item: dx, dy, radius

    def key(self) -> tuple:
        return tuple((i.shape, i.color, i.cell) for i in self.items)


def make_scene(rng: random.Random) -> Scene:
    n = rng.randint(2, 4)
    cells = rng.sample(range(GRID * GRID), n)
    items = tuple(Item(rng.choice(SHAPES), rng.choice(list(COLORS)), c) for c in sorted(cells))
    jitter = tuple((rng.randint(-3, 3), rng.randint(-3, 3), rng.randint(7, 10)) for _ in items)
    return Scene(items, jitter)


def render(scene: Scene) -> Image.Image:
    cell = IMAGE_SIZE // GRID
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for item, (dx, dy, r) in zip(scene.items, scene.jitter):
        cx = (item.cell % GRID) * cell + cell // 2 + dx
        cy = (item.cell // GRID) * cell + cell // 2 + dy
        fill = COLORS[item.color]
        if item.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif item.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def questions_for(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """``(question_type, question, answer)`` triples, one per type when the scene allows it."""
    out = []
    shape_counts = {s: sum(i.shape == s for i in scene.items) for s in SHAPES}
    unique_shapes = [s for s, c in shape_counts.items() if c == 1]
    if unique_shapes:
        s = rng.choice(unique_shapes)
        out.append(("color", f"what color is the {s} ?", next(i.color for i in scene.items if i.shape == s)))
    item = rng.choice(scene.items)
    out.append(("shape", f"what shape is in the {POSITIONS[item.cell]} ?", item.shape))
    s = rng.choice(SHAPES)
    out.append(("count", f"how many {PLURAL[s]} are there ?", str(shape_counts[s])))
    pairs = {(i.color, i.shape) for i in scene.items}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(pairs))
        answer = "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
        color, shape = rng.choice(absent)
        answer = "no"
    out.append(("exists", f"is there a {color} {shape} ?", answer))
    unique_pairs = [p for p in pairs if sum((i.color, i.shape) == p for i in scene.items) == 1]
    if unique_pairs:
        color, shape = rng.choice(sorted(unique_pairs))
        cell = next(i.cell for i in scene.items if (i.color, i.shape) == (color, shape))
        out.append(("position", f"where is the {color} {shape} ?", POSITIONS[cell]))
    return out


def generate(split: str, num_images: int, seed: int | None = None, exclude: set | None = None):
    """Yield ``(scene, image, [(type, question, answer), ...])`` for ``num_images`` scenes of ``split``."""
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    made = 0
    while made < num_images:
        scene = make_scene(rng)
        if exclude is not None and scene.key() in exclude:
            continue
        yield scene, render(scene), questions_for(scene, rng)
        made += 1


def vocabulary() -> list[str]:
    """Every word a prompt or an answer can contain (for the toy tokenizer)."""
    words = {"user:", "assistant:", "what", "color", "is", "the", "shape", "in", "how", "many", "are", "there",
             "a", "where", "?", "yes", "no"}  # fmt: skip
    words |= set(COLORS) | set(SHAPES) | set(PLURAL.values()) | set(POSITIONS) | {str(i) for i in range(5)}
    return sorted(words)


def write_hub_folder(out: str | Path, num_images: int = 160, train_images_checked: int = 4000) -> Path:
    """Write the test split as a hub-mirror folder: ``README.md`` (dataset card with ``configs``) and
    ``data/test-00000-of-00001.parquet`` with columns question_id, image, question, answer, question_type."""
    import datasets

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_keys = {scene.key() for scene, _, _ in generate("train", train_images_checked)}
    rows = {"question_id": [], "image": [], "question": [], "answer": [], "question_type": []}
    for n, (_, image, qas) in enumerate(generate("test", num_images, exclude=train_keys)):
        for j, (qtype, question, answer) in enumerate(qas):
            rows["question_id"].append(f"test-{n:04d}-{j}")
            rows["image"].append(image)
            rows["question"].append(question)
            rows["answer"].append(answer)
            rows["question_type"].append(qtype)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(out / "data" / "test-00000-of-00001.parquet"))
    (out / "README.md").write_text(_CARD.format(n_questions=len(ds), n_images=num_images))
    return out


_CARD = """---
license: apache-2.0
task_categories:
- visual-question-answering
configs:
- config_name: default
  data_files:
  - split: test
    path: data/test-*.parquet
dataset_info:
  features:
  - name: question_id
    dtype: string
  - name: image
    dtype: image
  - name: question
    dtype: string
  - name: answer
    dtype: string
  - name: question_type
    dtype: string
---

# vtprune synthetic VQA (test split)

{n_questions} questions on {n_images} 96x96 images of 2-4 coloured shapes (circle, square, triangle; red, green,
blue, yellow, purple) on a 3x3 grid. Question types: color, shape, count, exists, position; single-word answers.
Generated deterministically by `python -m vtprune.toy.synthetic --out <folder>`; the train split is regenerated
from its seed by the training command and shares no scene with this one.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "synthetic_vqa"))
    parser.add_argument("--images", type=int, default=160)
    args = parser.parse_args(argv)
    path = write_hub_folder(args.out, args.images)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
