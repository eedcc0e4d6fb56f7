"""``vtprune train-crosslmm``: train CrossLMM adapters for the toy model and save them beside it."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "toy_training_batches"]


def toy_training_batches(
    processor, images: int, samples: int | None, batch_size: int, seen: int
) -> list[dict]:
    """Questions on the synthetic train split's scenes ``[seen, seen + images)``: scenes the toy model was
    not trained on (its training used the first ``seen``), none of them in the test split."""
    import itertools

    from ..toy import build_prompt
    from ..toy.synthetic import generate
    from .crosslmm import answer_batch

    rows = [
        (image, q, a)
        for _, image, qas in itertools.islice(generate("train", seen + images), seen, None)
        for _, q, a in qas
    ]
    rows = rows[:samples] if samples else rows
    return [
        answer_batch(
            processor,
            [r[0] for r in chunk],
            [build_prompt(r[1]) for r in chunk],
            [r[2] for r in chunk],
        )
        for chunk in (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    ]


def _run(args) -> int:
    import json

    import torch

    from ..errors import UsageError
    from .crosslmm import train_crosslmm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model != "toy":
        raise UsageError(
            "train-crosslmm builds its training set from the synthetic benchmark's train split, which only the "
            "toy model reads; for other models call vtprune.tune.crosslmm.train_crosslmm(model, batches) with "
            "batches from vtprune.tune.crosslmm.answer_batch"
        )
    from ..toy import TOY_MODEL_DIR, load_toy_model

    model, processor = load_toy_model()
    seen = json.loads((TOY_MODEL_DIR / "training.json").read_text())["train_images"]
    batches = toy_training_batches(processor, args.images, args.samples, args.batch_size, seen)
    out = args.out or (TOY_MODEL_DIR / "vtprune_crosslmm")
    folder, report = train_crosslmm(
        model,
        batches,
        out=out,
        tokens=args.tokens,
        every=args.every,
        dim=args.dim,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    print(
        f"saved CrossLMM adapters to {folder}: layers {report['layers']}, {report['parameters']:,} parameters, "
        f"{report['cpu_seconds']:.0f} CPU s; answer loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train-crosslmm`` on the CLI's sub-parsers."""
    p = sub.add_parser(
        "train-crosslmm",
        help="train CrossLMM dual cross-attention adapters (model frozen) and save them beside the model",
    )
    p.add_argument("--model", default="toy")
    p.add_argument("--tokens", type=int, nargs="+", default=[9, 4], help="pooled counts, cycled per step")
    p.add_argument("--every", type=int, default=2, help="an adapter every N decoder layers (0, N, 2N...)")
    p.add_argument("--dim", type=int, default=None, help="adapter attention width (default: LLM hidden)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--images", type=int, default=2000, help="training scenes (train split, unseen by the model)"
    )
    p.add_argument("--samples", type=int, default=None, help="at most this many questions (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="default: <model folder>/vtprune_crosslmm (resumes from it)")
    p.set_defaults(func=_run)
