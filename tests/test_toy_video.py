"""The synthetic video variant of the toy benchmark: deterministic clips whose answers need several frames, the
shipped split, the ``synthetic_video`` benchmark (one image per frame), the video fine-tune of the toy and its
tokenizer, and multi-image prompts."""

import random

import datasets
import numpy as np
import pytest
import torch

from vtprune.eval.benchmarks import BenchmarkLoadError, get_benchmark
from vtprune.eval.benchmarks import synthetic_video as bench_module
from vtprune.toy import TOY_VIDEO_DATASET_DIR, TOY_VIDEO_MODEL_DIR, build_prompt
from vtprune.toy.model import build_tokenizer
from vtprune.toy.synthetic_video import (
    DIRECTIONS,
    FRAMES,
    QUESTION_TYPES,
    clip_keys,
    generate,
    make_clip,
    render_clip,
    video_words,
)


def test_clips_are_deterministic_and_answers_need_several_frames():
    a = [(c.key(), qa) for c, _, qa in generate("test", 20)]
    assert a == [(c.key(), qa) for c, _, qa in generate("test", 20)]
    assert {c.key() for c, _, _ in generate("train", 300)}.isdisjoint({k for k, _ in a})
    for seed in range(20):
        clip = make_clip(random.Random(seed))
        frames = [np.asarray(f) for f in render_clip(clip)]
        assert len(frames) == FRAMES
        # Something changes between every pair of consecutive frames (the mover slides every frame).
        assert all((x != y).any() for x, y in zip(frames, frames[1:]))
        # The newcomer's colour is absent before its frame appears only if no other item shares it: check the
        # frame count of pixels in its exact colour grows at appears_at.
        from vtprune.toy.synthetic import COLORS

        rgb = np.array(COLORS[clip.newcomer.color])
        count = [int((f == rgb).all(-1).sum()) for f in frames]
        assert count[clip.appears_at] > count[clip.appears_at - 1]
        pairs = [(i.color, i.shape) for i in (*clip.static, clip.newcomer)]
        assert (clip.mover.color, clip.mover.shape) not in pairs  # the direction question is unambiguous


def test_mover_ends_one_cell_away_in_its_direction():
    clip = make_clip(random.Random(4))
    from vtprune.toy.synthetic import COLORS

    rgb = np.array(COLORS[clip.mover.color])
    centres = []
    for frame in render_clip(clip):
        others = [i for i in clip.static if i.color == clip.mover.color]
        if others:
            pytest.skip("seed draws a static item of the mover's colour")
        ys, xs = np.nonzero((np.asarray(frame) == rgb).all(-1))
        centres.append((xs.mean(), ys.mean()))
    dc, dr = DIRECTIONS[clip.direction]
    dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
    assert abs(dx - 32 * dc) < 3 and abs(dy - 32 * dr) < 3


def test_every_type_once_per_clip_single_word_answers_in_the_video_vocabulary():
    from vtprune.toy.train_video import extend_tokenizer

    tokenizer = extend_tokenizer(build_tokenizer(), video_words())
    old = build_tokenizer().get_vocab()
    assert {w: tokenizer.get_vocab()[w] for w in old} == old  # the image toy's ids are kept
    unk = tokenizer.unk_token_id
    for _, _, qas in generate("test", 30):
        assert tuple(t for t, _, _ in qas) == QUESTION_TYPES
        for _, question, answer in qas:
            assert len(answer.split()) == 1
            assert unk not in tokenizer(build_prompt(question, FRAMES) + " " + answer)["input_ids"]


def test_multi_image_prompt():
    assert (
        build_prompt("Which shape moved ?", 4)
        == "USER: " + "<image>\n" * 4 + "which shape moved ? ASSISTANT:"
    )
    assert build_prompt("x") == "USER: <image>\nx ASSISTANT:"
    with pytest.raises(ValueError, match="num_images"):
        build_prompt("x", 0)


def test_shipped_split_is_what_the_generator_writes():
    ds = datasets.load_dataset(str(TOY_VIDEO_DATASET_DIR), split="test")
    assert ds.column_names == [
        "question_id", "frame_0", "frame_1", "frame_2", "frame_3", "question", "answer", "question_type",
    ]  # fmt: skip
    clips = list(generate("test", 3))
    # No test clip is one the default fine-tune (1,200 steps x 16 fresh clips) trains on.
    assert clip_keys("test", 100).isdisjoint(clip_keys("train", 1200 * 16))
    assert ds["question"][:15] == [q for _, _, qas in clips for _, q, _ in qas]
    assert ds["answer"][:15] == [a for _, _, qas in clips for _, _, a in qas]
    for f in range(FRAMES):
        assert ds[5][f"frame_{f}"].tobytes() == clips[1][1][f].tobytes()


def test_benchmark_gives_the_frames_in_order(monkeypatch, tmp_path):
    bench = get_benchmark("synthetic_video")
    samples = bench.load(limit=5)
    assert len(samples) == 5 and all(len(s.images) == FRAMES for s in samples)
    _, frames, qas = next(generate("test", 1))
    assert [im.tobytes() for im in samples[0].images] == [f.tobytes() for f in frames]
    assert [s.target for s in samples] == [a for _, _, a in qas]
    metrics = bench.evaluate(samples, [s.target + " ." for s in samples[:4]] + ["no"])
    assert metrics["exact_match"] == 0.8 and set(metrics["by_type"]) == set(QUESTION_TYPES)
    monkeypatch.setattr(bench_module, "SYNTHETIC_VIDEO_DIR", tmp_path / "missing")
    with pytest.raises(BenchmarkLoadError, match="python -m vtprune.toy.synthetic_video"):
        get_benchmark("synthetic_video").load()


def test_video_finetune_is_deterministic_and_loads(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtprune.toy.train_video import train_video

    small = dict(steps=2, batch_size=2, log_every=1000)
    reports = [train_video(tmp_path / name, **small) for name in ("a", "b")]
    assert reports[0]["saved_dtype"] == "float16"
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    processor = AutoProcessor.from_pretrained(tmp_path / "a")
    assert len(processor.tokenizer) == len(build_tokenizer()) + len(video_words())
    assert a["model.language_model.embed_tokens.weight"].shape[0] == len(processor.tokenizer)


def test_shipped_video_toy_through_vtprune_eval(tmp_path):
    """``vtprune eval --model toy-video --benchmarks synthetic_video``: 4 frames x 36 tokens, the per-frame
    budget of FasterVLM (9 of each frame's 36 at keep 0.25), and the unpruned toy well above chance on the
    first 40 questions (chance per type: 1/3, 1/5, 1/4, 1/3, 1/9)."""
    import csv

    from vtprune.cli import main

    assert (TOY_VIDEO_MODEL_DIR / "config.json").is_file()
    out = tmp_path / "run"
    args = ["eval", "--model", "toy-video", "--benchmarks", "synthetic_video", "--limit", "40",
            "--batch-size", "20", "--out", str(out), "--methods", "none", "fastervlm:keep_ratio=0.25"]  # fmt: skip
    assert main(args) == 0
    with open(out / "summary.csv") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert float(rows["none"]["visual_tokens_mean"]) == FRAMES * 36
    assert float(rows["fastervlm-keep_ratio=0.25"]["visual_tokens_mean"]) == FRAMES * 9
    assert float(rows["none"]["exact_match"]) > 0.5
