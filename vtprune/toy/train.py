"""Train the toy LLaVA on CPU and save it (model + processor) with ``save_pretrained``.

    python -m vtprune.toy.train --out vtprune/toy/assets/toy-llava    # the shipped weights: ~27 CPU minutes

Stage 1 trains the vision tower alone on the feature layer (-2): heads on its [CLS] token (which colour-shape
pairs are present, how many of each shape, which shape sits in each grid cell) make [CLS] gather localised
evidence, so its attention is the meaningful signal FasterVLM reads; per-patch heads (colour, shape and grid
cell under each patch) make every visual token say what lies under it. The feature layer's output is then
standardised, folded exactly into the projector's first linear layer.

Stage 2 freezes the tower (as LLaVA does) and trains the projector and language model on LLaVA-style data:
multi-turn conversations holding all of an image's questions, plus a caption per image (every grid cell as
``<position> <color> <shape>``, cells in a random order), the dense grounding signal. The loss is on answer
tokens and end-of-sequence only (not on a shuffled caption's position words, which are unpredictable). Everything
is seeded and runs on one thread by default, so the weights reproduce bit for bit; the train split is regenerated
from its seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import build_model, build_processor, build_prompt, build_tokenizer
from .synthetic import COLORS, GRID, IMAGE_SIZE, PATCH_SIZE, POSITIONS, SHAPES, Item, generate, render

__all__ = ["train", "main"]


def _patch_labels(scene):
    """Per patch (row-major): the colour and shape (1-based; 0 = background) of the object covering most of it,
    and the grid cell the patch lies in.

    Rendered from the scene itself: each item is drawn in a colour that encodes its index."""
    label_colors = list(COLORS)
    coded = replace(
        scene, items=tuple(Item(i.shape, label_colors[k], i.cell) for k, i in enumerate(scene.items))
    )
    pixels = np.asarray(render(coded))
    n = IMAGE_SIZE // PATCH_SIZE
    colors, shapes = torch.zeros(n * n, dtype=torch.long), torch.zeros(n * n, dtype=torch.long)
    cells = torch.zeros(n * n, dtype=torch.long)
    for p in range(n * n):
        r, c = divmod(p, n)
        cells[p] = (r * GRID // n) * GRID + c * GRID // n
        block = pixels[r * PATCH_SIZE : (r + 1) * PATCH_SIZE, c * PATCH_SIZE : (c + 1) * PATCH_SIZE]
        counts = [
            int((block == np.array(v)).all(-1).sum()) for v in list(COLORS.values())[: len(scene.items)]
        ]
        if counts and max(counts) >= 8:  # the item covering most of the patch, if any covers some
            item = scene.items[int(np.argmax(counts))]
            colors[p] = 1 + list(COLORS).index(item.color)
            shapes[p] = 1 + SHAPES.index(item.shape)
    return colors, shapes, cells


CAPTION_QUESTION = "what is there ?"


def caption(scene, rng: random.Random | None = None) -> str:
    """Every grid cell as ``<position> <color> <shape>`` (``no no`` when empty), in reading order, or in a
    random order drawn from ``rng``.

    Captions are the dense grounding signal (LLaVA's stage-1 data are captions too): each colour and shape word
    must be read off the visual tokens of the cell just named, which a single answer word per image teaches
    far more slowly. In reading order the model can track the cell by its place in the caption instead of by
    the position word, and then cannot answer "what shape is in the <cell> ?" (measured: 100% of caption
    shapes right, 61% of those questions); a random order removes that shortcut."""
    by_cell = {i.cell: i for i in scene.items}
    order = list(range(len(POSITIONS)))
    if rng is not None:
        rng.shuffle(order)
    words = []
    for cell in order:
        item = by_cell.get(cell)
        words += [POSITIONS[cell], item.color, item.shape] if item else [POSITIONS[cell], "no", "no"]
    return " ".join(words)


def _scene_targets(scene):
    pairs = torch.zeros(len(COLORS) * len(SHAPES))
    cells = torch.zeros(GRID * GRID, dtype=torch.long)  # 0 = empty, 1 + shape index
    counts = torch.zeros(len(SHAPES), dtype=torch.long)
    colors = list(COLORS)
    for item in scene.items:
        s = SHAPES.index(item.shape)
        pairs[colors.index(item.color) * len(SHAPES) + s] = 1
        cells[item.cell] = 1 + s
        counts[s] += 1
    return (pairs, cells, counts, *_patch_labels(scene))


class ClsHeads(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        # Patch heads make each visual token say what lies under it, so that the LLM can ground words in
        # tokens after a short stage 2 (grounding from scratch takes far longer than a CPU budget allows).
        self.patch_norm = nn.LayerNorm(dim)
        self.patch_color = nn.Linear(dim, 1 + len(COLORS))
        self.patch_shape = nn.Linear(dim, 1 + len(SHAPES))
        self.patch_cell = nn.Linear(dim, GRID * GRID)
        self.pairs = nn.Linear(dim, len(COLORS) * len(SHAPES))
        self.cells = nn.Linear(dim, GRID * GRID * (1 + len(SHAPES)))
        self.counts = nn.Linear(dim, len(SHAPES) * 5)

    def forward(self, cls):
        h = self.norm(cls)
        return (
            self.pairs(h),
            self.cells(h).view(-1, GRID * GRID, 1 + len(SHAPES)),
            self.counts(h).view(-1, 3, 5),
        )

    def patches(self, tokens):
        h = self.patch_norm(tokens)
        return self.patch_color(h), self.patch_shape(h), self.patch_cell(h)


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cosine(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _encode_conversation(tokenizer, turns, n_image_tokens, unlearned=frozenset()):
    """``(input_ids, labels)`` of a LLaVA-1.5 conversation about one image; only the answers are learned,
    less the answer tokens in ``unlearned`` (token ids).

    The first turn is exactly the inference prompt; later turns continue as ``USER: q ASSISTANT: a</s>``."""
    ids, labels = [], []
    for k, (question, answer) in enumerate(turns):
        if k == 0:
            prompt = tokenizer(build_prompt(question).replace("<image>", "<image>" * n_image_tokens))
        else:
            prompt = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += prompt["input_ids"] + target
        labels += [-100] * len(prompt["input_ids"]) + [-100 if t in unlearned else t for t in target]
    return ids, labels


def _batch(rows, pad_id):
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y, _) in enumerate(rows):
        ids[i, width - len(x) :] = torch.tensor(x)
        labels[i, width - len(y) :] = torch.tensor(y)
        mask[i, width - len(x) :] = 1
    return ids, labels, mask


def _optimizer_step(opt, loss, params) -> None:
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _conversations(scenes_and_questions, multi_turn, captions, caption_order, rng):
    """``(image index, [(question, answer), ...], shuffled caption?)`` per training sequence.

    With ``multi_turn`` all of an image's questions share one conversation in random order, as LLaVA's
    instruction data does: several answers per image forward. Captions always stand alone, or later answers
    could be read off the caption's text."""
    conversations = []
    for index, (scene, questions) in enumerate(scenes_and_questions):
        turns = [(q, a) for _, q, a in questions]
        if multi_turn:
            rng.shuffle(turns)
            conversations.append((index, turns, False))
        else:
            conversations.extend((index, [t], False) for t in turns)
        if captions:
            shuffled = caption_order == "shuffled"
            conversations.append(
                (index, [(CAPTION_QUESTION, caption(scene, rng if shuffled else None))], shuffled)
            )
    return conversations


def _train_tower(tower, pixels, targets, steps, batch_size, g, log_every) -> None:
    """Stage 1: the vision tower with [CLS] and per-patch heads on the feature layer."""
    heads = ClsHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    tower.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * _cosine(step, steps, 50)
        idx = torch.randint(len(pixels), (batch_size * 2,), generator=g)
        features = tower(pixels[idx].float(), output_hidden_states=True).hidden_states[-2]
        p_pairs, p_cells, p_counts = heads(features[:, 0])
        p_color, p_shape, p_cell = heads.patches(features[:, 1:])
        loss = nn.functional.binary_cross_entropy_with_logits(p_pairs, targets[0][idx])
        for logits, target in zip((p_cells, p_counts, p_color, p_shape, p_cell), targets[1:]):
            loss = loss + nn.functional.cross_entropy(logits.flatten(0, 1), target[idx].flatten())
        _optimizer_step(opt, loss, params)
        if step % log_every == 0 or step == steps - 1:
            print(f"vision step {step:5d} loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def _fold_standardisation(model, pixels) -> None:
    """Standardise the feature layer's output for the projector, folded exactly into its first linear layer:
    stage 1 leaves features with a large common component (its heads normalise), which would drown the
    per-token differences the language model has to read."""
    tower = model.model.vision_tower.eval()
    sample = torch.cat(
        [
            tower(pixels[i : i + 256].float(), output_hidden_states=True).hidden_states[-2][:, 1:]
            for i in range(0, min(len(pixels), 1024), 256)
        ]
    ).flatten(0, 1)
    mean, std = sample.mean(0), sample.std(0) + 1e-5
    first = model.model.multi_modal_projector.linear_1
    first.weight.div_(std[None, :])
    first.bias.sub_(first.weight @ mean)


def _train_language(model, tokenizer, encoded, pixels, steps, batch_size, lr, g, log_every) -> None:
    """Stage 2: projector + language model on the conversations and captions. The vision tower stays frozen,
    as in LLaVA's training: its [CLS] attention and per-patch grounding are what stage 1 built, and question
    answering alone would wash them out."""
    model.train()
    model.model.vision_tower.eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step, steps, 100)
        rows = [encoded[j] for j in torch.randint(len(encoded), (batch_size,), generator=g).tolist()]
        ids, labels, mask = _batch(rows, tokenizer.pad_token_id)
        pix = pixels[torch.tensor([r[2] for r in rows])].float()
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        _optimizer_step(opt, loss, trainable)
        if step % log_every == 0 or step == steps - 1:
            print(f"vlm step {step:5d} loss {loss.item():.4f}", flush=True)
    model.eval()


def train(
    out: str | Path,
    seed: int = 0,
    images: int = 3000,
    vision_steps: int = 600,
    vlm_steps: int = 6500,
    batch_size: int = 32,
    threads: int = 1,
    log_every: int = 100,
    lm_lr: float = 2e-3,
    captions: bool = True,
    multi_turn: bool = True,
    caption_order: str = "shuffled",
) -> dict:
    if caption_order not in ("shuffled", "reading"):
        raise ValueError(f"caption_order must be 'shuffled' or 'reading', got {caption_order!r}")
    with _torch_threads(threads):  # 1 thread: bit-reproducible weights
        random.seed(seed)
        torch.manual_seed(seed)
        start_wall, start_cpu = time.time(), time.process_time()
        tokenizer = build_tokenizer()
        processor = build_processor(tokenizer)
        model = build_model(tokenizer, seed=seed)
        n_image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2

        scenes, pixels, questions = [], [], []
        for scene, image, qas in generate("train", images, seed=None):
            scenes.append(scene)
            questions.append(qas)
            pixels.append(
                processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0].half()
            )
        conversations = _conversations(
            zip(scenes, questions), multi_turn, captions, caption_order, random.Random(seed)
        )
        n_questions = sum(len(t) for _, t, _ in conversations)
        pixels = torch.stack(pixels)
        targets = [torch.stack(t) for t in zip(*(_scene_targets(s) for s in scenes))]
        print(
            f"data: {len(scenes)} train images, {n_questions} questions ({time.time() - start_wall:.0f}s)",
            flush=True,
        )

        g = torch.Generator().manual_seed(seed)
        _train_tower(model.model.vision_tower, pixels, targets, vision_steps, batch_size, g, log_every)
        _fold_standardisation(model, pixels)
        # In a shuffled caption the next position word is a coin toss: it is context, not a target.
        position_ids = frozenset(tokenizer.convert_tokens_to_ids(list(POSITIONS)))
        encoded = [
            (
                *_encode_conversation(
                    tokenizer, turns, n_image_tokens, position_ids if shuffled else frozenset()
                ),
                i,
            )
            for i, turns, shuffled in conversations
        ]
        _train_language(model, tokenizer, encoded, pixels, vlm_steps, batch_size, lm_lr, g, log_every)

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        report = {
            "seed": seed,
            "train_images": images,
            "train_questions": n_questions,
            "multi_turn": multi_turn,
            "captions": captions,
            "caption_order": caption_order,
            "vision_steps": vision_steps,
            "vlm_steps": vlm_steps,
            "batch_size": batch_size,
            "threads": threads,
            "wall_seconds": round(time.time() - start_wall, 1),
            "cpu_seconds": round(time.process_time() - start_cpu, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "toy-llava"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--vision-steps", type=int, default=600)
    parser.add_argument("--vlm-steps", type=int, default=6500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="1 reproduces the shipped weights")
    parser.add_argument("--lm-lr", type=float, default=2e-3)
    parser.add_argument("--single-turn", action="store_true", help="one question per training sequence")
    parser.add_argument("--no-captions", action="store_true", help="question answering only in stage 2")
    parser.add_argument(
        "--caption-order", choices=("shuffled", "reading"), default="shuffled", help="cell order in captions"
    )
    args = parser.parse_args(argv)
    report = train(
        args.out,
        seed=args.seed,
        images=args.images,
        vision_steps=args.vision_steps,
        vlm_steps=args.vlm_steps,
        batch_size=args.batch_size,
        threads=args.threads,
        lm_lr=args.lm_lr,
        captions=not args.no_captions,
        multi_turn=not args.single_turn,
        caption_order=args.caption_order,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
