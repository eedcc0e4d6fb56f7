"""Fine-tune the shipped toy LLaVA on the synthetic video clips (:mod:`vtprune.toy.synthetic_video`) on CPU.

    python -m vtprune.toy.train_video --out vtprune/toy/assets/toy-llava-video   # the shipped weights: ~12 CPU min

Starts from ``toy-llava`` (its vision tower stays frozen, as in stage 2 of :mod:`vtprune.toy.train`: its [CLS]
attention is what FasterVLM reads), appends the video words to the word-level tokenizer (the image toy's token
ids are unchanged; the new embedding rows start at the mean embedding) and trains the projector and language
model on multi-turn conversations holding all five questions of a clip, each clip a multi-image prompt of its
frames, ``batch_size`` fresh clips of the train stream per step. The loss is on answer tokens and end-of-sequence. Seeded, one thread by default; the weights are saved
in float16 (half the size; ``load_toy_video_model`` upcasts).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from .model import build_prompt
from .synthetic_video import FRAMES, generate, video_words
from .train import _batch, _cosine, _optimizer_step, _torch_threads

__all__ = ["extend_tokenizer", "train_video", "main"]


def extend_tokenizer(tokenizer, words):
    """A copy of the toy's word-level ``tokenizer`` with ``words`` appended at new ids (existing ids kept)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    for word in words:
        vocab.setdefault(word, len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _encode(tokenizer, turns, n_image_tokens, frames):
    """``(input_ids, labels)`` of a conversation about one clip: the first turn is exactly the inference
    prompt (``frames`` image slots), later turns continue as ``USER: q ASSISTANT: a</s>``."""
    ids, labels = [], []
    for k, (question, answer) in enumerate(turns):
        if k == 0:
            text = build_prompt(question, frames).replace("<image>", "<image>" * n_image_tokens)
            prompt = tokenizer(text)["input_ids"]
        else:
            prompt = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += prompt + target
        labels += [-100] * len(prompt) + target
    return ids, labels


def train_video(
    out: str | Path,
    base: str | Path | None = None,
    seed: int = 0,
    steps: int = 1200,
    batch_size: int = 16,
    lr: float = 2e-3,
    threads: int = 1,
    log_every: int = 50,
) -> dict:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from . import TOY_MODEL_DIR

    base = Path(base or TOY_MODEL_DIR)
    with _torch_threads(threads):
        random.seed(seed)
        torch.manual_seed(seed)
        start_wall, start_cpu = time.time(), time.process_time()
        model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        old = LlavaProcessor.from_pretrained(base)
        tokenizer = extend_tokenizer(old.tokenizer, video_words())
        processor = LlavaProcessor(
            image_processor=old.image_processor,
            tokenizer=tokenizer,
            patch_size=old.patch_size,
            vision_feature_select_strategy=old.vision_feature_select_strategy,
            num_additional_image_tokens=old.num_additional_image_tokens,
            image_token="<image>",
        )
        n_old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # new words start at the mean embedding (tied with the output layer)
            emb = model.get_input_embeddings().weight
            emb[n_old:] = emb[:n_old].mean(0)
        n_image_tokens = model.config.image_seq_length

        # A fresh stream of clips, batch_size per step: each clip is seen once (a fixed pool of 1,500 clips
        # seen ~11 times each fitted it and reached 68% on the test split).
        stream, rng = generate("train", steps * batch_size), random.Random(seed)

        def next_batch():
            rows, pixels = [], []
            for _ in range(batch_size):
                _, frames, qas = next(stream)
                pixels.append(processor.image_processor(images=frames, return_tensors="pt")["pixel_values"])
                turns = [(q, a) for _, q, a in qas]
                rng.shuffle(turns)
                rows.append((*_encode(tokenizer, turns, n_image_tokens, FRAMES), None))
            return rows, torch.cat(pixels)  # (batch_size * FRAMES, 3, H, W), clip by clip

        model.train()
        model.model.vision_tower.eval().requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * _cosine(step, steps, 50)
            rows, pix = next_batch()
            ids, labels, mask = _batch(rows, tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
            _optimizer_step(opt, loss, trainable)
            if step % log_every == 0 or step == steps - 1:
                print(
                    f"video step {step:5d} loss {loss.item():.4f} ({time.time() - start_wall:.0f}s)",
                    flush=True,
                )
        model.eval()

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.half().save_pretrained(out)
        processor.save_pretrained(out)
        report = {
            "base": base.name,
            "seed": seed,
            "train_clips": steps * batch_size,
            "frames": FRAMES,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "threads": threads,
            "saved_dtype": "float16",
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
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "toy-llava-video"))
    parser.add_argument("--base", default=None, help="the image toy's folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="1 reproduces the shipped weights")
    args = parser.parse_args(argv)
    report = train_video(
        args.out,
        base=args.base,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
