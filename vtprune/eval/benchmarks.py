"""Benchmarks on their real hub schemas: loading, prompts, generation settings and scoring.

Each :class:`Benchmark` knows the dataset ids lmms-eval 0.7.3's task YAMLs use (``lmms-lab-encoder/...``; the
older ``lmms-lab/...`` ids are accepted too and tried next), the config and split, the columns it reads
(validated on load: a missing column is a :class:`SchemaError` naming the column and the benchmark), how
lmms-eval / LLaVA build the prompt, the generation settings, and which :mod:`vtprune.eval.metrics` function
scores it. Loading goes through ``datasets.load_dataset(source, name=config, split=split)``; ``source`` is a
hub id or a local folder mirroring the hub repository (README.md with ``configs:`` and parquet files), which
is how offline machines and the tests use it.

The harness calls ``get_benchmark(name)``, ``bench.load(source=..., limit=...)``, then per sample
``bench.score_sample(sample, prediction)`` (fields written to the JSONL record) and at the end
``bench.aggregate(records)`` on those records; ``bench.protocol`` and ``bench.generation_kwargs`` are
recorded / passed to ``generate``. Accuracies are fractions in [0, 1]; MME scores are MME points.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as M

__all__ = [
    "Sample",
    "LazyImages",
    "Benchmark",
    "SchemaError",
    "BenchmarkLoadError",
    "UnknownBenchmarkError",
    "get_benchmark",
    "list_benchmarks",
    "register_benchmark",
    "SHORT_ANSWER_PROMPT",
    "OPTION_LETTER_PROMPT",
    "SYNTHETIC_DIR",
]

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
OPTION_LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."
MME_YES_NO_SUFFIX = " Please answer yes or no."
MMBENCH_OPTIONS_HEADER = "There are several options:"  # lmms-eval mmbench.yaml metadata.sys_prompt
SYNTHETIC_DIR = Path(__file__).resolve().parents[1] / "toy" / "assets" / "synthetic_vqa"
LMMS_EVAL = "lmms-eval 0.7.3"


class SchemaError(ValueError):
    """A dataset lacks a column (or a nested field) that its benchmark reads."""


class BenchmarkLoadError(RuntimeError):
    """A benchmark's data could not be loaded from any of its sources."""


class UnknownBenchmarkError(ValueError):
    """``get_benchmark`` was given a name that is not registered."""


@dataclass
class Sample:
    """One benchmark question: ``prompt`` is the user text without the image placeholder (the model's chat
    template adds the images in front, LLaVA / lmms-eval style); ``target`` is what scoring compares with."""

    id: str
    images: Sequence  # PIL images (a LazyImages decoding on access, when loaded from a dataset)
    prompt: str
    target: Any
    meta: dict = field(default_factory=dict)


def _rgb(image):
    return None if image is None else image.convert("RGB")


class LazyImages(Sequence):
    """The images of one dataset row, decoded (to RGB) when accessed: a whole benchmark's samples can be held
    in memory while the pictures stay in the memory-mapped dataset."""

    __slots__ = ("_ds", "_row", "_columns")

    def __init__(self, ds, row: int, columns: Sequence[str]):
        self._ds, self._row, self._columns = ds, row, tuple(columns)

    def __len__(self) -> int:
        return len(self._columns)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        return _rgb(self._ds[self._row][self._columns[k]])

    def __repr__(self) -> str:
        return f"LazyImages(row={self._row}, columns={list(self._columns)})"


def _image_columns(ds) -> list[str]:
    import datasets

    return [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]


def _present(ds, column: str) -> list[bool]:
    """Which rows have a (non-null) value in ``column``, read from Arrow without decoding anything."""
    table = ds.select_columns([column]).with_format("arrow")[:]
    return table.column(column).is_valid().to_pylist()


def _split_images(ds):
    """``(rows without the image columns, images_of(i) -> LazyImages of row i's non-null images)``."""
    columns = _image_columns(ds)
    if not columns:
        return ds, lambda i: LazyImages(None, i, ())
    pixels = ds.select_columns(columns)
    present = {c: _present(ds, c) for c in columns}
    return ds.remove_columns(columns), lambda i: LazyImages(pixels, i, [c for c in columns if present[c][i]])


def _item_fields(feature) -> set | None:
    """Field names of the items of a list-of-struct feature (``None`` when it is not one)."""
    if isinstance(feature, dict):  # legacy Sequence(struct) is stored as a struct of lists
        return set(feature)
    if isinstance(feature, list | tuple) and feature and isinstance(feature[0], dict):
        return set(feature[0])
    inner = getattr(feature, "feature", None)
    return set(inner) if isinstance(inner, dict) else None


class Benchmark:
    """Base class: subclasses set the class attributes and implement :meth:`make_sample`, :meth:`score_sample`
    and :meth:`aggregate` (and may override :meth:`_select` for ``limit``)."""

    name: str = ""
    description: str = ""
    hub_ids: tuple[str, ...] = ()  # first one is lmms-eval 0.7.3's
    config: str | None = None
    split: str = "test"
    columns: tuple[str, ...] = ()  # columns read; validated on load
    nested: dict[str, tuple[str, ...]] = {}  # list-of-struct column -> fields its items must have
    prompt_template: str = ""
    generation_kwargs: dict = {}
    metric: str = ""
    main_metric: str = ""
    reference: str = ""  # where the protocol comes from

    def __init__(self):
        self.source: str | None = None  # what load() read, for the record
        self.loaded: dict = {}

    # ---------------------------------------------------------------------------------------------- record
    @property
    def protocol(self) -> dict:
        """What a results file should say about how this benchmark was run."""
        return {
            "benchmark": self.name,
            "description": self.description,
            "hub_ids": list(self.hub_ids),
            "config": self.config,
            "split": self.split,
            "prompt": self.prompt_template,
            "generation_kwargs": dict(self.generation_kwargs),
            "metric": self.metric,
            "main_metric": self.main_metric,
            "reference": self.reference,
            **({"loaded": dict(self.loaded)} if self.loaded else {}),
        }

    def __repr__(self) -> str:
        return f"<Benchmark {self.name}>"

    # ---------------------------------------------------------------------------------------------- loading
    def load(
        self,
        source: str | Path | None = None,
        split: str | None = None,
        limit: int | None = None,
        config: str | None = None,
    ) -> list[Sample]:
        """Samples of ``split`` (default: the benchmark's) from ``source``: a hub id, a local folder mirroring
        the hub repository, or ``None`` for the benchmark's hub ids in order. ``limit`` keeps the first
        ``limit`` samples (benchmarks with structure keep whole units; see each class)."""
        split = split or self.split
        config = self.config if config is None else config
        ds, origin = self._open(source, config, split)
        self.validate(ds, self.columns, self.nested, f"split {split!r} of {origin}" + _cfg(config))
        if limit is not None:
            ds = ds.select(self._select(ds, limit))
        rows, images_of = _split_images(ds)
        samples = [self.make_sample(row, i, images_of(i)) for i, row in enumerate(rows)]
        self._check_ids(samples)
        self.source = origin
        self.loaded = {
            "source": origin,
            "config": config,
            "split": split,
            "limit": limit,
            "samples": len(samples),
        }
        return samples

    def _select(self, ds, limit: int) -> list[int]:
        return list(range(min(limit, len(ds))))

    def _default_sources(self) -> tuple[str, ...]:
        return self.hub_ids

    def _open(self, source, config, split):
        """``(dataset, origin)`` via ``datasets.load_dataset``; with no source, the hub ids in order (the next
        is tried only when the hub says a repository does not exist)."""
        import datasets
        from datasets.exceptions import DatasetNotFoundError

        if source is not None:
            candidates = (_check_source(str(source), self.name),)
        else:
            candidates = self._default_sources()
            if not candidates:
                raise BenchmarkLoadError(
                    f"benchmark {self.name!r} has no default source: pass a local folder"
                )
        tried = []
        for candidate in candidates:
            try:
                return datasets.load_dataset(candidate, name=config, split=split), candidate
            except DatasetNotFoundError as err:
                tried.append(f"{candidate}: {err}")
            except ConnectionError as err:
                raise BenchmarkLoadError(
                    f"benchmark {self.name!r}: could not reach {candidate!r} ({err}). Offline, pass a local "
                    f"folder mirroring the hub repository: `--benchmarks {self.name}=/path/to/folder`"
                ) from err
            except (ValueError, FileNotFoundError) as err:
                raise BenchmarkLoadError(
                    f"benchmark {self.name!r}: could not load split {split!r}{_cfg(config)} from "
                    f"{candidate}: {err}"
                ) from err
        raise BenchmarkLoadError(f"benchmark {self.name!r}: no dataset found; tried " + "; ".join(tried))

    def validate(
        self, ds, columns: Iterable[str], nested: dict | None = None, where: str = "the dataset"
    ) -> None:
        """Raise :class:`SchemaError` naming the benchmark and the first missing column (or nested field)."""
        names = list(ds.column_names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise SchemaError(
                f"benchmark {self.name!r}: column {missing[0]!r} is missing from {where}"
                + (f" (also missing: {missing[1:]})" if len(missing) > 1 else "")
                + f"; it has columns {names}, the benchmark reads {list(columns)}"
            )
        for column, wanted in (nested or {}).items():
            have = _item_fields(ds.features[column])
            if have is None:
                raise SchemaError(
                    f"benchmark {self.name!r}: column {column!r} of {where} should be a list of records with "
                    f"fields {list(wanted)}, got {ds.features[column]}"
                )
            lacking = [f for f in wanted if f not in have]
            if lacking:
                raise SchemaError(
                    f"benchmark {self.name!r}: column {column!r} of {where} lacks the field "
                    f"{lacking[0]!r} in its items (has {sorted(have)})"
                )

    def _check_ids(self, samples: list[Sample]) -> None:
        seen = set()
        for s in samples:
            if s.id in seen:
                raise SchemaError(f"benchmark {self.name!r}: sample id {s.id!r} appears twice")
            seen.add(s.id)

    # ------------------------------------------------------------------------------------------ per benchmark
    def make_sample(self, row: dict, index: int, images: Sequence) -> Sample:
        """The sample of dataset row ``index``; ``row`` lacks the image columns, ``images`` decodes them."""
        raise NotImplementedError

    def score_sample(self, sample: Sample, prediction: str) -> dict:
        """JSON-serialisable fields for the sample's record: ``target``, ``score``, what aggregation needs."""
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict:
        """Final metrics from the records (dicts holding at least the :meth:`score_sample` fields)."""
        raise NotImplementedError

    def evaluate(self, samples: list[Sample], predictions: list[str]) -> dict:
        """:meth:`aggregate` of :meth:`score_sample` over ``samples`` and ``predictions`` (no harness)."""
        if len(samples) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
        records = [
            {"id": s.id, "prediction": p, **self.score_sample(s, p)} for s, p in zip(samples, predictions)
        ]
        return self.aggregate(records)


def _cfg(config) -> str:
    return f" (config {config!r})" if config else ""


def _check_source(source: str, name: str) -> str:
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not source.endswith("/"):
        return source  # a hub id
    raise BenchmarkLoadError(
        f"benchmark {name!r}: no such folder {source!r} (and it is not a hub id 'org/name')"
    )


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def _mean_by(records: list[dict], key: str, value: str = "score") -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(r.get(key), []).append(r[value])
    return {k: _mean(v) for k, v in sorted(groups.items(), key=lambda kv: str(kv[0])) if k is not None}


# ============================================================================================================
# VQA family
# ============================================================================================================


class VQAv2(Benchmark):
    """VQAv2 val: "{question}" + short-answer instruction, VQA accuracy (lmms-eval ``vqav2_val``)."""

    name = "vqav2"
    description = "VQAv2 val (214k questions on COCO val2014), VQA accuracy"
    hub_ids = ("lmms-lab-encoder/VQAv2", "lmms-lab/VQAv2")
    split = "validation"
    columns = ("question_id", "question", "image", "answers")
    nested = {"answers": ("answer",)}
    prompt_template = "{question}" + SHORT_ANSWER_PROMPT
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = "VQA accuracy (official VQAv2 normalisation, 10 leave-one-out subsets, min(1, matches/3))"
    main_metric = "vqa_accuracy"
    reference = f"{LMMS_EVAL} tasks/vqav2 (vqav2_val: doc_to_text, vqav2_process_results); LLaVA-1.5 prompt"
    vqa_style = "vqav2"

    def make_sample(self, row, index, images):
        answers = [a["answer"] for a in row["answers"] or []]
        meta = {
            k: row[k]
            for k in ("image_id", "answer_type", "question_type", "multiple_choice_answer")
            if k in row
        }
        return Sample(
            id=str(row["question_id"]),
            images=images,
            prompt=f"{row['question']}{SHORT_ANSWER_PROMPT}",
            target=answers,
            meta={"question": row["question"], **meta},
        )

    def score_sample(self, sample, prediction):
        rec = {
            "target": sample.target,
            "score": M.vqa_accuracy(prediction, sample.target, style=self.vqa_style),
        }
        if "answer_type" in sample.meta:
            rec["answer_type"] = sample.meta["answer_type"]
        return rec

    def aggregate(self, records):
        out = {"vqa_accuracy": _mean(r["score"] for r in records)}
        if any("answer_type" in r for r in records):
            out["by_answer_type"] = _mean_by(records, "answer_type")
        return out


class TextVQA(VQAv2):
    """TextVQA val: capitalized question (+ reference OCR tokens with ``ocr_tokens=True``) + short-answer
    instruction, VQA accuracy with the EvalAI processor (lmms-eval ``textvqa_val``)."""

    name = "textvqa"
    description = "TextVQA val (5k questions needing OCR), VQA accuracy"
    hub_ids = ("lmms-lab-encoder/textvqa", "lmms-lab/textvqa")
    split = "validation"
    columns = ("question_id", "question", "image", "answers")
    nested = {}
    prompt_template = "{question.capitalize()}" + SHORT_ANSWER_PROMPT
    # lmms-eval leaves max_new_tokens to the model (1024 for llava_hf) and stops at "ASSISTANT:"; a single
    # word or phrase fits in 16 tokens, as for VQAv2 / GQA.
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = "VQA accuracy with the EvalAI answer processor on prediction and answers"
    reference = f"{LMMS_EVAL} tasks/textvqa (textvqa_val: textvqa_doc_to_text, textvqa_process_results)"
    vqa_style = "textvqa"

    def __init__(self, ocr_tokens: bool = False):
        super().__init__()
        self.ocr_tokens = ocr_tokens
        if ocr_tokens:
            self.name = "textvqa_ocr"
            self.columns = (*type(self).columns, "ocr_tokens")
            self.prompt_template = (
                "{question.capitalize()}\nReference OCR token: {', '.join(ocr_tokens)}" + SHORT_ANSWER_PROMPT
            )
            self.description += "; prompt with the reference OCR tokens (LLaVA-1.5 / lmms-eval ocr=True)"

    def make_sample(self, row, index, images):
        ocr = f"\nReference OCR token: {', '.join(row['ocr_tokens'])}" if self.ocr_tokens else ""
        return Sample(
            id=str(row["question_id"]),
            images=images,
            prompt=f"{row['question'].capitalize()}{ocr}{SHORT_ANSWER_PROMPT}",
            target=list(row["answers"] or []),
            meta={
                "question": row["question"],
                **({"image_id": row["image_id"]} if "image_id" in row else {}),
            },
        )


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
        images_config = (
            self.images_config if config == self.config else config.replace("instructions", "images")
        )
        questions, origin = self._open(source, config, split)
        self.validate(questions, self.columns, None, f"split {split!r} of {origin}" + _cfg(config))
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
        self._check_ids(samples)
        self.source = origin
        self.loaded = {"source": origin, "config": [config, images_config], "split": split}
        self.loaded |= {"limit": limit, "samples": len(samples)}
        return samples

    def score_sample(self, sample, prediction):
        return {
            "target": sample.target,
            "score": M.exact_match(prediction, sample.target),
            "score_llava": M.gqa_llava_match(prediction, sample.target),
        }

    def aggregate(self, records):
        return {
            "exact_match": _mean(r["score"] for r in records),
            "exact_match_llava": _mean(r["score_llava"] for r in records),
        }


# ============================================================================================================
# Yes / no
# ============================================================================================================


class POPE(Benchmark):
    """POPE: yes/no questions, split by ``category``; LLaVA yes/no parsing; F1 per split and their mean
    (lmms-eval ``pope`` data and prompt, LLaVA ``eval_pope.py`` scoring)."""

    name = "pope"
    description = "POPE (COCO; adversarial / popular / random, 3k questions each), yes/no F1"
    hub_ids = ("lmms-lab-encoder/POPE", "lmms-lab/POPE")
    split = "test"
    full_config = "Full"  # lmms-eval pope_adv / pope_pop / pope_random: one split per category
    columns = ("question_id", "question", "answer", "image", "category")
    prompt_template = "{question.strip()}" + SHORT_ANSWER_PROMPT
    generation_kwargs = {"max_new_tokens": 128, "do_sample": False}
    metric = (
        "answers parsed to yes/no as LLaVA eval_pope.py; accuracy, precision, recall, F1, yes-ratio per "
        "split (category); f1 = mean of the split F1s (LLaVA-1.5 paper), pooled_* over all questions"
    )
    main_metric = "f1"
    reference = f"{LMMS_EVAL} tasks/pope (pope.yaml: test split, category column); LLaVA eval_pope.py parsing"

    def load(self, source=None, split=None, limit=None, config=None):
        """The ``test`` split of the default config (category column = POPE split), as lmms-eval's ``pope``
        task. ``config="Full"`` with ``split=None`` loads its adversarial, popular and random splits."""
        if config == self.full_config and split is None:
            samples, loaded = [], []
            for part in M.POPE_SPLITS:
                samples += super().load(source, split=part, limit=limit, config=config)
                loaded.append(self.loaded)
            self.loaded = {**loaded[0], "split": list(M.POPE_SPLITS), "samples": len(samples)}
            self._check_ids(samples)
            return samples
        return super().load(source, split=split, limit=limit, config=config)

    def _select(self, ds, limit):
        """``limit`` questions taken round-robin over the categories, so that every split is represented."""
        by_cat: dict[str, list[int]] = {}
        for i, cat in enumerate(ds["category"]):
            by_cat.setdefault(cat, []).append(i)
        picked, queues = [], [iter(v) for v in by_cat.values()]
        while len(picked) < limit and queues:
            for q in list(queues):
                i = next(q, None)
                if i is None:
                    queues.remove(q)
                elif len(picked) < limit:
                    picked.append(i)
        return sorted(picked)

    def make_sample(self, row, index, images):
        return Sample(
            id=f"{row['category']}/{row['question_id']}",
            images=images,
            prompt=f"{row['question'].strip()}{SHORT_ANSWER_PROMPT}",
            target=row["answer"].lower().strip(),
            meta={
                "question": row["question"],
                "category": row["category"],
                "question_id": row["question_id"],
            },
        )

    def score_sample(self, sample, prediction):
        label = M.parse_yes_no(prediction)
        return {
            "target": sample.target,
            "category": sample.meta["category"],
            "pred_label": label,
            "score": float(label == sample.target),
        }

    def aggregate(self, records):
        rows = [(r["category"], r["prediction"], r["target"]) for r in records]
        report = M.pope_report(rows)
        pooled = report["pooled"]
        return {
            "f1": report["f1_avg"],
            "accuracy_avg": report["accuracy_avg"],
            "pooled_accuracy": pooled["accuracy"],
            "pooled_precision": pooled["precision"],
            "pooled_recall": pooled["recall"],
            "pooled_f1": pooled["f1"],
            "yes_ratio": pooled["yes_ratio"],
            "splits": report["splits"],
            "lmms_eval_unparsed": M.pope_metrics([r[1] for r in rows], [r[2] for r in rows], parse=False),
        }


class MME(Benchmark):
    """MME: two yes/no questions per image; perception and cognition scores (lmms-eval ``mme``)."""

    name = "mme"
    description = "MME (14 subtasks, 2 yes/no questions per image), perception and cognition scores"
    hub_ids = ("lmms-lab-encoder/MME", "lmms-lab/MME")
    split = "test"
    columns = ("question_id", "image", "question", "answer", "category")
    prompt_template = "{question.strip() without ' Please answer yes or no.'}" + SHORT_ANSWER_PROMPT
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = (
        "answer parsed as lmms-eval parse_pred_ans; per subtask acc and acc+ (both questions of an image "
        "right); perception / cognition = sum over subtasks of 100 * (acc + acc+)"
    )
    main_metric = "perception"
    reference = f"{LMMS_EVAL} tasks/mme (mme_doc_to_text, mme_process_results, mme_aggregate_results)"

    def load(self, source=None, split=None, limit=None, config=None):
        self._seen: dict[str, int] = {}
        return super().load(source, split=split, limit=limit, config=config)

    def make_sample(self, row, index, images):
        image_id = str(row["question_id"])
        n = self._seen.get(image_id, 0)
        self._seen[image_id] = n + 1
        question = row["question"].strip().replace(MME_YES_NO_SUFFIX, "")
        return Sample(
            id=f"{image_id}#{n}",
            images=images,
            prompt=f"{question}{SHORT_ANSWER_PROMPT}",
            target=row["answer"].lower().strip().replace(".", ""),
            meta={"question": row["question"], "category": row["category"], "image_id": image_id},
        )

    def score_sample(self, sample, prediction):
        label = M.parse_mme_answer(prediction)
        return {
            "target": sample.target,
            "category": sample.meta["category"],
            "image_id": sample.meta["image_id"],
            "pred_label": label,
            "score": float(label == sample.target),
        }

    def aggregate(self, records):
        return M.mme_scores((r["category"], r["image_id"], r["score"]) for r in records)


# ============================================================================================================
# Multiple choice
# ============================================================================================================


class ScienceQAImg(Benchmark):
    """ScienceQA-IMG test: context, question, lettered choices, option-letter instruction; accuracy
    (lmms-eval ``scienceqa_img``)."""

    name = "scienceqa_img"
    description = "ScienceQA-IMG test (2017 questions with an image), option-letter accuracy"
    hub_ids = ("lmms-lab-encoder/ScienceQA", "lmms-lab/ScienceQA")
    config = "ScienceQA-IMG"
    split = "test"
    columns = ("image", "question", "choices", "answer", "hint")
    prompt_template = (
        "[Context: {hint}\\n]{question}\\nA. {choice_0}\\nB. {choice_1}..." + OPTION_LETTER_PROMPT
    )
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = (
        "accuracy of the option letter read as lmms-eval sqa_process_results (a lone letter, or 'X.' first)"
    )
    main_metric = "accuracy"
    reference = (
        f"{LMMS_EVAL} tasks/scienceqa (scienceqa_img: sqa_doc_to_text format=default, sqa_process_results)"
    )

    def make_sample(self, row, index, images):
        choices = list(row["choices"])
        options = "\n".join(f"{M.OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))
        context = f"Context: {row['hint']}\n" if row["hint"] else ""
        meta = {k: row[k] for k in ("subject", "grade", "category", "skill", "topic", "task") if k in row}
        return Sample(
            id=str(index),
            images=images,
            prompt=f"{context}{row['question']}\n{options}{OPTION_LETTER_PROMPT}",
            target=M.OPTION_LETTERS[int(row["answer"])],
            meta={"question": row["question"], "choices": choices, "answer": int(row["answer"]), **meta},
        )

    def score_sample(self, sample, prediction):
        letter = M.scienceqa_option(prediction, len(sample.meta["choices"]))
        rec = {"target": sample.target, "pred_letter": letter, "score": float(letter == sample.target)}
        if "subject" in sample.meta:
            rec["subject"] = sample.meta["subject"]
        return rec

    def aggregate(self, records):
        out = {"accuracy": _mean(r["score"] for r in records)}
        if any("subject" in r for r in records):
            out["by_subject"] = _mean_by(records, "subject")
        return out


def _notna(value) -> bool:
    return not M._is_missing(value) and value != "nan"


class MMBenchEN(Benchmark):
    """MMBench-EN dev with its circular variants; lmms-eval's prompt, offline option extraction and
    CircularEval (lmms-eval ``mmbench_en_dev_static``)."""

    name = "mmbench_en"
    description = "MMBench-EN dev (with circular variants), CircularEval accuracy without a GPT judge"
    hub_ids = ("lmms-lab-encoder/MMBench", "lmms-lab/MMBench")
    config = "en"
    split = "dev"
    columns = ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image", "source",
               "L2-category", "split")  # fmt: skip
    prompt_template = (
        "[{hint} ]{question} " + MMBENCH_OPTIONS_HEADER + "\\nA. {A}\\nB. {B}...\\n" + OPTION_LETTER_PROMPT
    )
    generation_kwargs = {"max_new_tokens": 1024, "do_sample": False}
    metric = (
        "option read offline as lmms-eval mmbench_en_dev_static (can_infer, then extract_mcq_answer); "
        "accuracy = CircularEval (a question counts only if all its circular variants are right); "
        "vanilla_accuracy per row"
    )
    main_metric = "accuracy"
    reference = f"{LMMS_EVAL} tasks/mmbench (en_utils.mmbench_doc_to_text, MMBench_Evaluator static eval)"

    def _select(self, ds, limit):
        """The first ``limit`` questions with all their circular variants (rows with index = i + k * 1e6)."""
        groups: dict[int, list[int]] = {}
        for i, index in enumerate(ds["index"]):
            group = int(index) % M.CIRCULAR_OFFSET
            if group in groups or len(groups) < limit:
                groups.setdefault(group, []).append(i)
        return sorted(i for rows in groups.values() for i in rows)

    def make_sample(self, row, index, images):
        options = {k: row[k] for k in "ABCDE" if k in row and row[k]}
        lines = [f"{k}. {v}" for k, v in sorted(options.items()) if _notna(v)]
        options_prompt = "\n".join([MMBENCH_OPTIONS_HEADER, *lines])
        hint = row["hint"]
        query = (
            f"{hint} {row['question']} {options_prompt}"
            if _notna(hint)
            else f"{row['question']} {options_prompt}"
        )
        return Sample(
            id=str(int(row["index"])),
            images=images,
            prompt=f"{query}\n{OPTION_LETTER_PROMPT}",
            target=row["answer"],
            meta={
                "index": int(row["index"]),
                "question": row["question"],
                "choices": M.mmbench_choices(row),
                "category": row["category"],
                "l2_category": row["L2-category"],
            },
        )

    def score_sample(self, sample, prediction):
        letter = M.mmbench_extract(prediction, sample.meta["choices"])
        return {
            "target": sample.target,
            "pred_letter": letter,
            "index": sample.meta["index"],
            "category": sample.meta["category"],
            "l2_category": sample.meta["l2_category"],
            "score": float(letter == sample.target),
        }

    def aggregate(self, records):
        circ = M.circular_eval((r["index"], r["score"] == 1.0) for r in records)
        category = {int(r["index"]): r["category"] for r in records}
        by_cat: dict[str, list[int]] = {}
        for index, hit in circ["hits"].items():
            by_cat.setdefault(category[index], []).append(hit)
        return {
            "accuracy": circ["accuracy"],
            "vanilla_accuracy": _mean(r["score"] for r in records),
            "by_category": {k: _mean(v) for k, v in sorted(by_cat.items())},
            "circular": {"questions": circ["questions"], "rows": len(records)},
        }


# ============================================================================================================
# Synthetic (shipped)
# ============================================================================================================


class Synthetic(Benchmark):
    """vtprune's shipped synthetic VQA: the question as-is, first-word exact match."""

    name = "synthetic"
    description = "vtprune's synthetic shapes VQA (test split shipped in vtprune/toy/assets/synthetic_vqa)"
    hub_ids = ()
    split = "test"
    columns = ("question_id", "image", "question", "answer", "question_type")
    prompt_template = "{question}"
    generation_kwargs = {"max_new_tokens": 8, "do_sample": False}
    metric = (
        "exact match of the prediction's first word (lower-cased, outer punctuation stripped) with the answer"
    )
    main_metric = "exact_match"
    reference = "vtprune.toy (normalize_answer); answers are single words"

    def _default_sources(self):
        if not (SYNTHETIC_DIR / "README.md").is_file():
            raise BenchmarkLoadError(
                f"benchmark 'synthetic': no data at {SYNTHETIC_DIR}; generate it with "
                f"`python -m vtprune.toy.synthetic --out {SYNTHETIC_DIR}`"
            )
        return (str(SYNTHETIC_DIR),)

    def make_sample(self, row, index, images):
        return Sample(
            id=str(row["question_id"]),
            images=images,
            prompt=row["question"],
            target=row["answer"],
            meta={"question": row["question"], "question_type": row["question_type"]},
        )

    def score_sample(self, sample, prediction):
        return {
            "target": sample.target,
            "question_type": sample.meta["question_type"],
            "score": M.first_word_match(prediction, sample.target),
        }

    def aggregate(self, records):
        return {
            "exact_match": _mean(r["score"] for r in records),
            "by_type": _mean_by(records, "question_type"),
        }


# ============================================================================================================
# Registry
# ============================================================================================================

_REGISTRY: dict[str, Callable[..., Benchmark]] = {}


def register_benchmark(name: str, factory: Callable[..., Benchmark]) -> None:
    """Make ``get_benchmark(name)`` return ``factory()``."""
    _REGISTRY[name] = factory


for _name, _factory in {
    "vqav2": VQAv2,
    "gqa": GQA,
    "textvqa": TextVQA,
    "textvqa_ocr": lambda: TextVQA(ocr_tokens=True),
    "pope": POPE,
    "mme": MME,
    "scienceqa_img": ScienceQAImg,
    "mmbench_en": MMBenchEN,
    "synthetic": Synthetic,
}.items():
    register_benchmark(_name, _factory)


def list_benchmarks() -> list[str]:
    """The registered benchmark names."""
    return sorted(_REGISTRY)


def get_benchmark(name: str, **options) -> Benchmark:
    """A fresh benchmark object by name (``options`` go to its constructor, e.g. ``ocr_tokens=True`` for
    ``textvqa``); an unknown name raises :class:`UnknownBenchmarkError` listing the known ones."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(list_benchmarks())}"
        )
    return _REGISTRY[key](**options)
