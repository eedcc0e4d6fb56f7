"""GQA testdev-balanced (lmms-eval ``gqa``): instructions joined with images on ``imageId``, exact match."""

from __future__ import annotations

from ..metrics import exact_match, gqa_llava_match
from .base import (
    LMMS_EVAL,
    SHORT_ANSWER_PROMPT,
    Benchmark,
    LazyImages,
    Sample,
    SchemaError,
    _cfg,
    _check_limit,
    _image_columns,
    _mean,
)

__all__ = ["GQA"]


class GQA(Benchmark):
    """GQA testdev-balanced: the instructions config joined with the images config on ``imageId``,
    short-answer instruction, exact match (lmms-eval ``gqa``; LLaVA's stricter match reported beside it)."""

    name = "gqa"
    description = "GQA testdev-balanced (12.6k questions on 398 images), exact match"
    hub_ids = ("lmms-lab-encoder/GQA", "lmms-lab/GQA")
    config = "testdev_balanced_instructions"
    images_config = "testdev_balanced_images"
    split = "testdev"
    columns = ("id", "imageId", "question", "answer")
    image_columns = ("id", "image")
    prompt_template = "{question}" + SHORT_ANSWER_PROMPT
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = (
        "exact match after lower-casing and removing punctuation (lmms-eval); exact_match_llava: "
        "prediction.rstrip('.').lower() == answer (LLaVA convert_gqa_for_submission + GQA eval.py)"
    )
    main_metric = "exact_match"
    reference = f"{LMMS_EVAL} tasks/gqa (gqa.yaml, gqa_process_docs joins the images config on imageId)"

    def load(self, source=None, split=None, limit=None, config=None):
        """Questions from the instructions config joined with the images config on ``imageId``; only the
        images of the selected questions are decoded."""
        split = split or self.split
        config = self.config if config is None else config
        _check_limit(limit)
        images_config = (
            self.images_config if config == self.config else config.replace("instructions", "images")
        )
        questions, origin = self._open(source, config, split)
        where = f"split {split!r} of {origin}" + _cfg(config)
        self.validate(questions, self.columns, None, where)
        if limit is not None:
            questions = questions.select(range(min(limit, len(questions))))
        images, _ = self._open(origin, images_config, split)
        self.validate(images, self.image_columns, None, f"split {split!r} of {origin}" + _cfg(images_config))
        wanted = set(questions["imageId"])
        pixels = images.select_columns(["image"])
        by_id = {image_id: i for i, image_id in enumerate(images["id"]) if image_id in wanted}
        missing = sorted(wanted - set(by_id))
        if missing:
            raise SchemaError(
                f"benchmark {self.name!r}: imageId {missing[0]!r} of config {config!r} has no row in config "
                f"{images_config!r} of {origin} ({len(missing)} missing)"
            )
        samples = [
            Sample(
                id=str(q["id"]),
                images=LazyImages(pixels, by_id[q["imageId"]], ["image"]),
                prompt=f"{q['question']}{SHORT_ANSWER_PROMPT}",
                target=q["answer"],
                meta={"question": q["question"], "imageId": q["imageId"]},
            )
            for q in questions.remove_columns([c for c in _image_columns(questions)])
        ]
        self._check_samples(samples, where)
        self.source = origin
        self.loaded = {"source": origin, "config": [config, images_config], "split": split}
        self.loaded |= {"limit": limit, "samples": len(samples)}
        return samples

    def score_sample(self, sample, prediction):
        return {
            "target": sample.target,
            "score": exact_match(prediction, sample.target),
            "score_llava": gqa_llava_match(prediction, sample.target),
        }

    def aggregate(self, records):
        return {
            "exact_match": _mean(r["score"] for r in records),
            "exact_match_llava": _mean(r["score_llava"] for r in records),
        }
