"""Train CrossLMM's dual cross-attention adapters on a frozen model.

Only the adapters learn (:class:`~vtprune.methods.crosslmm.CrossLMMAdapters`); every parameter of the
model is frozen. Each step wraps the model with ``CrossLMMConfig(tokens=t, adapters=<the adapters being
trained>)`` - the very forward pass inference runs - and minimises the cross-entropy of the answer tokens
(teacher forcing). The pooled count ``t`` cycles through ``tokens`` step by step, so one set of adapters
serves every count it was trained on.

Deterministic and resumable: the adapters' initialisation follows ``seed``; batch order is a permutation
per epoch seeded by ``(seed, epoch)``; the count follows the step. A checkpoint (adapters, optimiser, step,
losses, CPU seconds) is written atomically every ``checkpoint_every`` steps to ``<out>/checkpoint.pt``; a
run started again with the same settings continues from it and ends with the same weights as a run that
was never interrupted. The finished adapters are saved to ``out`` (default: beside the model,
``<model folder>/vtprune_crosslmm``) with ``report.json``, and the checkpoint is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..api import unwrap, wrap
from ..errors import UsageError
from ..methods.crosslmm import CrossLMMAdapters, CrossLMMConfig, adapters_folder

__all__ = ["answer_batch", "train_crosslmm", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"


def answer_batch(processor, images, prompts: Sequence[str], answers: Sequence[str]) -> dict:
    """A training batch: ``prompt + answer + </s>`` per row, left-padded (every row ends at the last
    column), with ``target_lengths``: the answer tokens (end-of-sequence included) that close each row."""
    tokenizer = processor.tokenizer
    if tokenizer.padding_side != "left":
        raise UsageError("answer_batch needs a left-padding tokenizer (tokenizer.padding_side = 'left')")
    texts = [f"{p} {a}" for p, a in zip(prompts, answers)]
    batch = dict(processor(images=list(images), text=texts, return_tensors="pt", padding=True))
    eos = tokenizer.eos_token_id
    rows = batch["input_ids"].shape[0]
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((rows, 1), eos)], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], 1)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    batch["target_lengths"] = torch.tensor(lengths)
    return batch


def _answer_loss(model, batch: dict) -> torch.Tensor:
    lengths = batch["target_lengths"]
    span = int(lengths.max())
    inputs = {k: v for k, v in batch.items() if k != "target_lengths"}
    logits = model(**inputs, logits_to_keep=span + 1).logits[:, :-1].float()  # predict the last `span`
    targets = inputs["input_ids"][:, -span:]
    mask = torch.arange(span, device=lengths.device) >= span - lengths[:, None]
    return torch.nn.functional.cross_entropy(logits[mask.to(logits.device)], targets[mask.to(targets.device)])


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _fingerprint(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_crosslmm(
    model,
    batches: Sequence[dict],
    out: str | Path | None = None,
    *,
    tokens: Sequence[int] = (9, 4),
    every: int = 4,
    dim: int | None = None,
    heads: int | None = None,
    steps: int = 600,
    lr: float = 2e-3,
    warmup: int = 20,
    seed: int = 0,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train adapters for ``model`` on ``batches`` (from :func:`answer_batch`), save them to ``out``.

    Args:
        tokens: pooled counts per image, cycled step by step.
        every, dim, heads: the adapters' shape (:class:`~vtprune.methods.crosslmm.CrossLMMAdapters`).
        steps, lr, warmup: AdamW steps, peak learning rate (cosine decay after a linear warm-up).
        checkpoint_every: steps between checkpoints.

    Returns:
        the folder holding the adapters and a report dict (loss, CPU seconds, parameters, gates).
    """
    if not batches:
        raise UsageError("no training batches")
    out = Path(out) if out is not None else adapters_folder(model)
    settings = {
        "tokens": list(tokens),
        "every": every,
        "dim": dim,
        "heads": heads,
        "steps": steps,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "batches": len(batches),
        "rows": sum(int(b["input_ids"].shape[0]) for b in batches),
    }
    fingerprint = _fingerprint(settings)
    torch.manual_seed(seed)
    adapters = CrossLMMAdapters.for_model(model, every=every, dim=dim, heads=heads)
    params = list(adapters.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, losses, cpu_before = 0, [], 0.0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise UsageError(
                f"{ckpt} was written by a run with other settings ({state['settings']}); delete it to start "
                "over, or rerun with those settings to resume"
            )
        adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        start, losses, cpu_before = state["step"], state["losses"], state["cpu_seconds"]

    def checkpoint(step: int, cpu: float) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (CHECKPOINT + ".tmp")
        state = {
            "fingerprint": fingerprint,
            "settings": settings,
            "step": step,
            "adapters": adapters.state_dict(),
            "optimizer": opt.state_dict(),
            "losses": losses,
            "cpu_seconds": cpu,
        }
        torch.save(state, tmp)
        os.replace(tmp, ckpt)

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    cpu_start = time.process_time()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc="train-crosslmm", disable=not progress)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        adapters.train()
        order: list[int] = []
        for step in range(start, steps):
            epoch, pos = divmod(step, len(batches))
            if not order or pos == 0 or step == start:
                order = torch.randperm(
                    len(batches), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                ).tolist()
            batch = {k: v.to(model.device) for k, v in batches[order[pos]].items()}
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps, lr, warmup)
            wrap(model, CrossLMMConfig(tokens=tokens[step % len(tokens)], adapters=adapters))
            try:
                with torch.enable_grad():
                    loss = _answer_loss(model, batch)
            finally:
                unwrap(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            done = step + 1
            if done % checkpoint_every == 0 and done < steps:
                checkpoint(done, cpu_before + time.process_time() - cpu_start)
    finally:
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
        adapters.eval()
    cpu = cpu_before + time.process_time() - cpu_start
    report = {
        "settings": settings,
        "cpu_seconds": cpu,
        "parameters": adapters.num_parameters(),
        "layers": adapters.layers,
        "loss_first": sum(losses[:20]) / max(1, len(losses[:20])),
        "loss_last": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "gates": {
            str(i): {"v2v": torch.tanh(b.v2v.gate).item(), "t2v": torch.tanh(b.t2v.gate).item()}
            for i, b in zip(adapters.layers, adapters.blocks.values())
        },
    }
    adapters.meta = {k: report[k] for k in ("settings", "cpu_seconds")}
    adapters.save(out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)
    return out, report
