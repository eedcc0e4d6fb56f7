"""A deterministic synthetic *video* QA benchmark: short clips (4 frames) of the image benchmark's shapes in
which one shape slides one grid cell and another appears part-way, with questions about what changes.

A clip is fed as a multi-image prompt, one frame = one image (as LLaVA-OneVision feeds video frames), so the
toy LLaVA sees ``FRAMES x 36`` visual tokens and pruning "per frame" is its per-image budget. Each clip has::

    static     1-2 shapes that stay where they are
    mover      a shape that slides one cell up / down / left / right, a third of a cell per frame
    newcomer   a shape absent from the first frame(s) that appears in an empty cell at frame 1, 2 or 3

Question types (one of each per clip, single-word answers)::

    moved_shape     which shape moved ?                         -> circle | square | triangle
    moved_color     which color moved ?                         -> red ... purple
    direction       where did the <color> <shape> move ?        -> up | down | left | right
    appeared_shape  which shape appeared ?                      -> circle | square | triangle
    appeared_where  where did a shape appear ?                  -> top-left ... bottom-right

Every answer needs more than one frame: what moved or appeared is only visible by comparing frames.

``python -m vtprune.toy.synthetic_video --out vtprune/toy/assets/synthetic_video_qa`` regenerates the shipped
test split as a hub-mirror folder (``datasets.load_dataset(folder, split="test")``; one image column per frame).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .synthetic import COLORS, GRID, IMAGE_SIZE, POSITIONS, SHAPES, Item, Scene, render

__all__ = [
    "FRAMES",
    "DIRECTIONS",
    "QUESTION_TYPES",
    "SPLIT_SEEDS",
    "Clip",
    "make_clip",
    "render_clip",
    "questions_for",
    "generate",
    "clip_keys",
    "video_words",
    "write_hub_folder",
]

FRAMES = 4
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}  # (dcol, drow)
QUESTION_TYPES = ("moved_shape", "moved_color", "direction", "appeared_shape", "appeared_where")
SPLIT_SEEDS = {"train": 2_000_003, "test": 17}  # disjoint streams; test clips are also checked against train


@dataclass(frozen=True)
class Clip:
    static: tuple[Item, ...]
    mover: Item  # at its starting cell
    direction: str
    newcomer: Item
    appears_at: int  # first frame (1..FRAMES-1) showing the newcomer
    jitter: tuple[tuple[int, int, int], ...]  # per item (static..., mover, newcomer): dx, dy, radius

    def key(self) -> tuple:
        return (
            tuple((i.shape, i.color, i.cell) for i in self.static),
            (self.mover.shape, self.mover.color, self.mover.cell, self.direction),
            (self.newcomer.shape, self.newcomer.color, self.newcomer.cell, self.appears_at),
        )


def _step(cell: int, direction: str) -> int | None:
    dc, dr = DIRECTIONS[direction]
    r, c = divmod(cell, GRID)
    r, c = r + dr, c + dc
    return r * GRID + c if 0 <= r < GRID and 0 <= c < GRID else None


def make_clip(rng: random.Random) -> Clip:
    """A random clip whose mover's colour-shape pair is unique (the direction question names it)."""
    while True:
        start = rng.randrange(GRID * GRID)
        direction = rng.choice(sorted(DIRECTIONS))
        end = _step(start, direction)
        if end is None:
            continue
        free = [c for c in range(GRID * GRID) if c not in (start, end)]
        cells = rng.sample(free, rng.randint(1, 2) + 1)
        static_cells, new_cell = sorted(cells[:-1]), cells[-1]
        pick = lambda cell: Item(rng.choice(SHAPES), rng.choice(list(COLORS)), cell)  # noqa: E731
        static = tuple(pick(c) for c in static_cells)
        mover, newcomer = pick(start), pick(new_cell)
        pair = (mover.color, mover.shape)
        if any((i.color, i.shape) == pair for i in (*static, newcomer)):
            continue
        jitter = tuple(
            (rng.randint(-3, 3), rng.randint(-3, 3), rng.randint(7, 10)) for _ in range(len(static) + 2)
        )
        return Clip(static, mover, direction, newcomer, rng.randint(1, FRAMES - 1), jitter)


def render_clip(clip: Clip) -> list[Image.Image]:
    """``FRAMES`` RGB images of ``IMAGE_SIZE`` squared; the mover's centre moves ``cell / (FRAMES - 1)``
    pixels per frame, so it ends centred in the next cell."""
    cell = IMAGE_SIZE // GRID
    dc, dr = DIRECTIONS[clip.direction]
    frames = []
    for f in range(FRAMES):
        shift = round(cell * f / (FRAMES - 1))
        items = list(clip.static) + [clip.mover]
        jitter = list(clip.jitter[: len(clip.static)])
        dx, dy, r = clip.jitter[len(clip.static)]
        jitter.append((dx + dc * shift, dy + dr * shift, r))
        if f >= clip.appears_at:
            items.append(clip.newcomer)
            jitter.append(clip.jitter[-1])
        frames.append(render(Scene(tuple(items), tuple(jitter))))
    return frames


def questions_for(clip: Clip) -> list[tuple[str, str, str]]:
    """``(question_type, question, answer)`` triples, one per type."""
    m, n = clip.mover, clip.newcomer
    return [
        ("moved_shape", "which shape moved ?", m.shape),
        ("moved_color", "which color moved ?", m.color),
        ("direction", f"where did the {m.color} {m.shape} move ?", clip.direction),
        ("appeared_shape", "which shape appeared ?", n.shape),
        ("appeared_where", "where did a shape appear ?", POSITIONS[n.cell]),
    ]


def generate(split: str, num_clips: int, seed: int | None = None, exclude: set | None = None):
    """Yield ``(clip, frames, [(type, question, answer), ...])`` for ``num_clips`` clips of ``split``."""
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    made = 0
    while made < num_clips:
        clip = make_clip(rng)
        if exclude is not None and clip.key() in exclude:
            continue
        yield clip, render_clip(clip), questions_for(clip)
        made += 1


def clip_keys(split: str, num_clips: int, seed: int | None = None) -> set:
    """The keys of the first ``num_clips`` clips :func:`generate` yields for ``split`` (nothing rendered)."""
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    return {make_clip(rng).key() for _ in range(num_clips)}


def video_words() -> list[str]:
    """Words the video questions and answers use beyond the image benchmark's vocabulary (the toy tokenizer
    appends them, so that the image toy's token ids stay unchanged)."""
    return ["which", "moved", "did", "move", "appeared", "appear", "up", "down"]


def write_hub_folder(out: str | Path, num_clips: int = 100, train_clips_checked: int = 1200 * 16) -> Path:
    """Write the test split as a hub-mirror folder: ``README.md`` (dataset card with ``configs``) and
    ``data/test-00000-of-00001.parquet`` with columns question_id, frame_0 .. frame_3 (images), question,
    answer, question_type."""
    import datasets

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    # Every clip the default fine-tune draws (1,200 steps of 16): no test clip is one of them.
    train_keys = clip_keys("train", train_clips_checked)
    frame_columns = [f"frame_{f}" for f in range(FRAMES)]
    rows = {c: [] for c in ["question_id", *frame_columns, "question", "answer", "question_type"]}
    for n, (_, frames, qas) in enumerate(generate("test", num_clips, exclude=train_keys)):
        for j, (qtype, question, answer) in enumerate(qas):
            rows["question_id"].append(f"test-{n:04d}-{j}")
            for column, frame in zip(frame_columns, frames):
                rows[column].append(frame)
            rows["question"].append(question)
            rows["answer"].append(answer)
            rows["question_type"].append(qtype)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            **{c: datasets.Image() for c in frame_columns},
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(out / "data" / "test-00000-of-00001.parquet"))
    frame_features = "".join(f"  - name: {c}\n    dtype: image\n" for c in frame_columns)
    (out / "README.md").write_text(
        _CARD.format(
            n_questions=len(ds), n_clips=num_clips, frames=FRAMES, frame_features=frame_features.rstrip("\n")
        )
    )
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
{frame_features}
  - name: question
    dtype: string
  - name: answer
    dtype: string
  - name: question_type
    dtype: string
---

# vtprune synthetic video QA (test split)

{n_questions} questions on {n_clips} clips of {frames} 96x96 frames: coloured shapes on a 3x3 grid, one of which
slides one cell (up, down, left or right) while another appears part-way. Question types: moved_shape,
moved_color, direction, appeared_shape, appeared_where; single-word answers. Generated deterministically by
`python -m vtprune.toy.synthetic_video --out <folder>`; the train split is regenerated from its seed by the
fine-tuning command (`python -m vtprune.toy.train_video`) and shares no clip with this one.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "synthetic_video_qa"))
    parser.add_argument("--clips", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"wrote {write_hub_folder(args.out, args.clips)}")


if __name__ == "__main__":
    main()
