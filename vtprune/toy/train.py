"""Train the toy LLaVA on CPU and save it (model + processor) with ``save_pretrained``.

    python -m vtprune.toy.train --out vtprune/toy/assets/toy-llava

Stage 1 trains the vision tower alone with heads on the [CLS] token of the feature layer (-2): which
colour-shape pairs are present, how many of each shape, and which shape sits in each grid cell. The [CLS]
token must gather localised evidence, so its attention at that layer becomes the meaningful signal
FasterVLM reads. Stage 2 trains the whole VLM on question answering, with the loss on the answer word and the
end-of-sequence token only. Everything is seeded; the train split is regenerated from its seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from .model import build_model, build_processor, build_prompt, build_tokenizer
from .synthetic import COLORS, GRID, SHAPES, generate

__all__ = ["train", "main"]


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
    return pairs, cells, counts


class ClsHeads(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
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


def _cosine(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _encode_qa(tokenizer, question, answer, n_image_tokens):
    prompt = build_prompt(question).replace("<image>", "<image>" * n_image_tokens)
    ids = tokenizer(prompt)["input_ids"]
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids + target, [-100] * len(ids) + target


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


def train(
    out: str | Path,
    seed: int = 0,
    images: int = 3000,
    vision_steps: int = 800,
    vlm_steps: int = 2500,
    batch_size: int = 32,
    threads: int = 2,
    log_every: int = 100,
) -> dict:
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    start_wall, start_cpu = time.time(), time.process_time()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=seed)
    n_image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2

    scenes, pixels, qas = [], [], []
    for scene, image, questions in generate("train", images, seed=None):
        scenes.append(scene)
        pixels.append(
            processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0].half()
        )
        qas.extend((len(scenes) - 1, q, a) for _, q, a in questions)
    pixels = torch.stack(pixels)
    targets = [torch.stack(t) for t in zip(*(_scene_targets(s) for s in scenes))]
    print(
        f"data: {len(scenes)} train images, {len(qas)} questions ({time.time() - start_wall:.0f}s)",
        flush=True,
    )

    # Stage 1: vision tower with [CLS] heads on the feature layer.
    tower = model.model.vision_tower
    heads = ClsHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    tower.train()
    for step in range(vision_steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * _cosine(step, vision_steps, 50)
        idx = torch.randint(len(scenes), (batch_size * 2,), generator=g)
        hidden = tower(pixels[idx].float(), output_hidden_states=True).hidden_states[-2][:, 0]
        p_pairs, p_cells, p_counts = heads(hidden)
        loss = (
            nn.functional.binary_cross_entropy_with_logits(p_pairs, targets[0][idx])
            + nn.functional.cross_entropy(p_cells.flatten(0, 1), targets[1][idx].flatten())
            + nn.functional.cross_entropy(p_counts.flatten(0, 1), targets[2][idx].flatten())
        )
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == vision_steps - 1:
            print(f"vision step {step:5d} loss {loss.item():.4f}", flush=True)

    # Stage 2: the whole VLM on question answering.
    encoded = [(*_encode_qa(tokenizer, q, a, n_image_tokens), i) for i, q, a in qas]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(vlm_steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _cosine(step, vlm_steps, 100)
        rows = [encoded[j] for j in torch.randint(len(encoded), (batch_size,), generator=g).tolist()]
        ids, labels, mask = _batch(rows, tokenizer.pad_token_id)
        pix = pixels[torch.tensor([r[2] for r in rows])].float()
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == vlm_steps - 1:
            print(f"vlm step {step:5d} loss {loss.item():.4f}", flush=True)

    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {
        "seed": seed,
        "train_images": images,
        "train_questions": len(qas),
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
    parser.add_argument("--vision-steps", type=int, default=800)
    parser.add_argument("--vlm-steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    report = train(
        args.out, args.seed, args.images, args.vision_steps, args.vlm_steps, args.batch_size, args.threads
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
