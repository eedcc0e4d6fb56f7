"""What every benchmark shares: :class:`Sample`, :class:`LazyImages`, the :class:`Benchmark` base with its
loader (``datasets.load_dataset`` on a hub id or a local mirror folder, schema validation, ``limit``), the
error types and the registry.

Loading is re-entrant: :meth:`Benchmark.load` keeps no state between rows (a benchmark that numbers rows
within a group, as MME does per image, does so in :meth:`Benchmark.make_samples`, local to one call); it
only records what it read in ``source`` / ``loaded`` for the results file.

The error types are :class:`~vtprune.errors.UsageError` subclasses (bad input: the CLI prints them in one line)
and keep their historical bases (``ValueError``; ``RuntimeError`` for :class:`BenchmarkLoadError`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UsageError

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
    "LMMS_EVAL",
]

SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
OPTION_LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."
LMMS_EVAL = "lmms-eval 0.7.3"


class SchemaError(UsageError):
    """A dataset lacks a column (or a nested field) that its benchmark reads."""


class BenchmarkLoadError(UsageError, RuntimeError):
    """A benchmark's data could not be loaded from any of its sources (or holds no samples)."""


class UnknownBenchmarkError(UsageError):
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
        _check_limit(limit)
        ds, origin = self._open(source, config, split)
        where = f"split {split!r} of {origin}" + _cfg(config)
        self.validate(ds, self.columns, self.nested, where)
        if limit is not None:
            ds = ds.select(self._select(ds, limit))
        rows, images_of = _split_images(ds)
        samples = self.make_samples(rows, images_of)
        self._check_samples(samples, where)
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
        from datasets.exceptions import DatasetNotFoundError, DatasetsError

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
            except (ValueError, FileNotFoundError, DatasetsError) as err:  # bad split / config / files
                raise BenchmarkLoadError(
                    f"benchmark {self.name!r}: could not load split {split!r}{_cfg(config)} from "
                    f"{candidate}: {_describe(err)}"
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

    def _check_samples(self, samples: list[Sample], where: str) -> None:
        """Unique ids, and at least one sample (an empty split is a mistake, not a score of 0)."""
        if not samples:
            raise BenchmarkLoadError(f"benchmark {self.name!r}: {where} has no rows")
        self._check_ids(samples)

    # ------------------------------------------------------------------------------------------ per benchmark
    def make_samples(self, rows: Iterable[dict], images_of: Callable[[int], Sequence]) -> list[Sample]:
        """The samples of the selected rows (``images_of(i)`` decodes row ``i``'s images). A benchmark whose
        samples depend on earlier rows (MME numbers the questions of an image) overrides this, keeping that
        state local to the call so that loading stays re-entrant."""
        return [self.make_sample(row, i, images_of(i)) for i, row in enumerate(rows)]

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


def _describe(err: BaseException) -> str:
    """The first line of an error and of its causes ("An error occurred while generating the dataset" says
    little; its cause names the file), for one-line messages."""
    parts = []
    while err is not None and len(parts) < 3:
        text = str(err).strip()
        parts.append(text.splitlines()[0] if text else type(err).__name__)
        err = err.__cause__ or err.__context__
    return ": ".join(dict.fromkeys(parts))


def _check_limit(limit) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"limit must be a positive int or None, got {limit!r}")


def _check_source(source: str, name: str) -> str:
    """A local folder (returned absolute, so that the record names it whatever the working directory) or a
    hub id ``org/name``."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BenchmarkLoadError(
                f"benchmark {name!r}: {source!r} is a file; pass the folder mirroring the hub repository "
                "(README.md with configs and the parquet files)"
            )
        return str(path.resolve())
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
# Registry
# ============================================================================================================

_REGISTRY: dict[str, Callable[..., Benchmark]] = {}


def register_benchmark(name: str, factory: Callable[..., Benchmark]) -> None:
    """Make ``get_benchmark(name)`` return ``factory()``."""
    _REGISTRY[name] = factory


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
