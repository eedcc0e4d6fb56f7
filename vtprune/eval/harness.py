"""Accuracy against realised speed-up: run benchmarks under several pruning settings in one command.

Layout of an output folder::

    <out>/run.json                       what was run: model, settings, protocols, FLOPs convention, versions,
                                         and one fingerprint per results file (``streams``, see Resuming)
    <out>/.lock                          held (``fcntl.flock``) while a run writes into the folder
    <out>/<benchmark>/<setting>.jsonl    one record per sample, appended as batches finish (rank-suffixed
                                         files under ``accelerate launch``); a rerun skips what is there
    <out>/summary.md, summary.csv        one row per (benchmark, setting); summary.md ends with notes
    <out>/breakdown.md, breakdown.csv    per question type / POPE split / MME subtask / subject / category
    <out>/pareto.png                     accuracy against speed-up and FLOPs reduction, one row of plots per
                                         benchmark (its own metric on the y axis); ``pareto.txt`` says why
                                         when it could not be drawn (matplotlib missing)

Batches are formed from the benchmark order before sharding, and ranks take whole batches round-robin, so
a run over N processes computes exactly the batches a single process would.

Resuming (decisions, issue 17):

- A results file is reused only by a run with the same *fingerprint*: model (name as given, class, dtype,
  device type, parameter count and a checksum of a few weights of every parameter), the setting, the
  benchmark's protocol (name, source, config, split, prompt, generation settings, metric), the batch size
  and the vtprune version. ``run.json`` keeps the fingerprint of every file in the folder; a mismatch, or
  rows without a recorded fingerprint, raise :class:`~vtprune.errors.UsageError` (use another ``--out`` or
  delete the files), before anything is computed.
- ``--limit`` is not part of the fingerprint: rows are keyed by sample id, so a run reports (and computes,
  when missing) exactly the samples it loaded. ``--limit 16`` after ``--limit 40`` reports 16 samples,
  ``--limit 40`` after ``--limit 16`` computes the 24 missing ones.
- A last line cut by a kill (no final newline) is truncated away on restart, with a :class:`ResumeWarning`;
  its sample is recomputed. Other lines that are not JSON (files of older versions) are skipped with a
  warning, their samples recomputed.
- Two runs into one folder at once: the second raises :class:`~vtprune.errors.UsageError`. The lock is an
  ``fcntl.flock`` on ``<out>/.lock``, which the kernel releases when its process dies, so a lock file left by
  a killed run (a dead pid) is simply taken over. Without ``fcntl`` (Windows) the folder is not locked.
- Every record carries the ``session`` (one id per ``run_eval`` call, shared by its ranks). The summary's
  ``timing_sessions`` counts the sessions whose timings a row combines (for pruned settings, its own and
  those of ``none``, which its speed-up divides by); above 1, latency and speed-up mix separate processes
  and summary.md says so. Rerun into a fresh ``--out`` for like-for-like timings.
- ``peak_mem_mb`` is CUDA's allocator peak of each batch (reset before each ``generate``). On CPU there is
  no per-setting measure (the process RSS peak only grows, tracemalloc does not see torch's allocator), so
  it is left blank (``None``).
- Settings are de-duplicated (the same dict twice is run once); two different settings whose labels
  sanitise to the same file name both get a short hash of the setting appended to their label.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import socket
import statistics
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import get_pruner, unwrap, wrap
from ..errors import UsageError
from ..registry import get_family
from .flops import FLOPS_CONVENTION, prefill_flops

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "EvalRun",
    "EvalSummary",
    "ResumeWarning",
    "FolderLock",
    "parse_settings",
    "setting_label",
    "setting_labels",
    "run_eval",
    "summarize",
    "write_reports",
    "plot_pareto",
]

NONE = {"method": "none"}


class ResumeWarning(UserWarning):
    """Something in an output folder was repaired or skipped on resume (a cut last line, a bad line)."""


# ============================================================================================================
# Settings
# ============================================================================================================


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(specs: list[str]) -> list[dict | list[dict]]:
    """``["none", "fastervlm:keep_ratio=0.5,0.25", "static_exit:layer=2,4"]`` -> config dicts (cartesian
    product over comma-separated values). A spec may also be a JSON object or a path to a JSON file.

    Composition: ``"fastervlm:keep_ratio=0.5,0.25+fastv:layer=2"`` joins method specs with ``+`` (a pre-LLM
    method then an in-LLM one); it gives one composed setting - a list of config dicts, run as
    ``vtprune.wrap(model, [cfg_a, cfg_b])`` - per combination of the parts' values (here two). A ``+`` starts
    a new part only where a registered method name follows it (a ``+`` inside a value, e.g. a path, stays).
    A JSON list of config objects (inline or in a file) is a composed setting too.

    Every setting is validated here (``PruneConfig.from_dict``), not after an hour of running; a bad one
    raises :class:`~vtprune.errors.UsageError` naming the spec. Whether the parts of a composed setting fill
    different stages needs the model: :func:`run_eval` wraps every setting once before running any."""
    settings = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("[") or (spec.endswith(".json") and _json_list_file(spec)):
            text = spec if spec.startswith("[") else Path(spec).expanduser().read_text()
            found = [_load_json_list(text, spec)]
        else:
            parts = _split_composition(spec)
            grids = [_parse_one(part) for part in parts]
            if len(parts) == 1:
                found = grids[0]
            else:
                found = [list(combo) for combo in itertools.product(*grids)]
        for setting in found:
            _validate_setting(setting, spec)
        settings += found
    return settings


def _json_list_file(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.is_file() and path.read_text().lstrip().startswith("[")


def _split_composition(spec: str) -> list[str]:
    """``"a:k=1+b:k=2"`` -> ``["a:k=1", "b:k=2"]``; a ``+`` not followed by a method name stays in its part."""
    from ..config import available_methods

    names = set(available_methods()) | {"none"}
    parts: list[str] = []
    for piece in spec.split("+"):
        if parts and piece.split(":", 1)[0].strip() not in names:
            parts[-1] += "+" + piece
        else:
            parts.append(piece.strip())
    return parts


def _parse_one(spec: str) -> list[dict]:
    """The settings of one method spec (``name:key=v1,v2:...``, a JSON object, or a JSON file)."""
    if spec.startswith("{"):
        return [_load_json(spec, spec)]
    if spec.endswith(".json") and (":" not in spec or Path(spec).expanduser().is_file()):
        # "schedule:path=s.json" is a method spec whose option names a file, not a settings file
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"setting {spec!r}: no such JSON file")
        return [_load_json(path.read_text(), spec)]
    name, *fields = spec.split(":")
    if name == "none":
        if fields:
            raise UsageError("the 'none' setting takes no options")
        return [dict(NONE)]
    grid = []
    for item in fields:
        if "=" not in item:
            raise UsageError(f"bad option {item!r} in {spec!r}: expected key=value[,value...]")
        key, values = item.split("=", 1)
        grid.append([(key, _parse_value(v)) for v in _split_values(values)])
    return [{"method": name, **dict(combo)} for combo in (itertools.product(*grid) if grid else [()])]


def _split_values(text: str) -> list[str]:
    """``"0.5,0.25"`` -> two values; commas inside brackets stay (``"[8,16,24],[4,8]"`` -> two lists)."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return values + [text[start:]]


def _load_json_list(text: str, spec: str) -> list[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"setting {spec!r}: not valid JSON ({err})") from err
    if not isinstance(value, list) or not all(isinstance(v, dict) and "method" in v for v in value):
        raise UsageError(f"setting {spec!r}: expected a JSON list of objects with a 'method' key")
    return value


def _is_none(setting) -> bool:
    """Whether ``setting`` is the unpruned baseline."""
    return isinstance(setting, dict) and setting.get("method") == "none"


def _load_json(text: str, spec: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"setting {spec!r}: not valid JSON ({err})") from err
    if not isinstance(value, dict) or "method" not in value:
        raise UsageError(f"setting {spec!r}: expected a JSON object with a 'method' key")
    return value


def _validate_setting(setting: dict | list, spec: str) -> None:
    if isinstance(setting, list):
        if len(setting) < 2:
            raise UsageError(f"setting {spec!r}: a composed setting joins two or more methods")
        if any(_is_none(part) for part in setting):
            raise UsageError(f"setting {spec!r}: 'none' cannot be composed with a method")
        for part in setting:
            _validate_setting(part, spec)
        return
    if setting.get("method") == "none":
        if set(setting) != {"method"}:
            raise UsageError(f"setting {spec!r}: the 'none' setting takes no options")
        return
    from ..config import PruneConfig

    try:
        PruneConfig.from_dict(dict(setting))
    except (ValueError, TypeError) as err:  # config validation (UsageError is a ValueError)
        raise UsageError(f"setting {spec!r}: {err}") from err


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def setting_label(setting: dict | list) -> str:
    """The file-name label of one setting: ``method-key=value-...`` with unsafe characters replaced; a
    composed setting joins its parts' labels with ``+`` (``fastervlm-keep_ratio=0.25+fastv-layer=2``)."""
    if isinstance(setting, list):
        return "+".join(setting_label(part) for part in setting)
    parts = [setting["method"]] + [f"{k}={v}" for k, v in setting.items() if k != "method"]
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", "-".join(parts))


def setting_labels(settings: list[dict]) -> list[str]:
    """Labels of ``settings`` that never collide: two different settings with the same
    :func:`setting_label` (e.g. ``"a b"`` and ``"a/b"`` both give ``a_b``, or ``1`` and ``"1"``) both get
    ``-<8 hex of the setting's hash>`` appended."""
    labels = [setting_label(s) for s in settings]
    owners: dict[str, set[str]] = {}
    for label, setting in zip(labels, settings):
        owners.setdefault(label, set()).add(_canonical(setting))
    return [
        f"{label}-{hashlib.sha1(_canonical(s).encode()).hexdigest()[:8]}" if len(owners[label]) > 1 else label
        for label, s in zip(labels, settings)
    ]


def _unique(settings: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in settings:
        key = _canonical(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


@dataclass
class EvalRun:
    """Everything one ``vtprune eval`` invocation needs.

    ``answer(samples, model, generation_kwargs) -> (predictions, stats)`` runs one batch (see
    :class:`~vtprune.eval.models.Answerer`); ``model`` is the HF model that settings wrap. ``meta`` is
    recorded in run.json; its ``"model"`` (the name the model was loaded by) is part of the resume key.
    """

    model: Any
    answer: Any
    benchmarks: dict  # name -> (Benchmark, list[Sample])
    settings: list[dict]
    out: Path
    batch_size: int = 8
    warmup: int = 1
    meta: dict = field(default_factory=dict)


class EvalSummary(list):
    """The summary rows :func:`run_eval` returns (a list of dicts), with ``files``: the report files
    written into the output folder (on rank 0; empty elsewhere) and ``notes``: what summary.md notes."""

    def __init__(self, rows=(), files=(), notes=()):
        super().__init__(rows)
        self.files = list(files)
        self.notes = list(notes)


# ============================================================================================================
# Timing
# ============================================================================================================


class _FirstTokenTimer:
    """A generate() streamer recording when the first new token appears (time to first token)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first put is the prompt
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first = time.perf_counter()

    def end(self):
        pass


def timed_generate(model, inputs: dict, **generate_kwargs) -> tuple[torch.Tensor, dict]:
    """``model.generate`` with time to first token, end-to-end latency and decode speed; ``peak_mem_mb`` is
    the CUDA allocator's peak during this call, ``None`` on other devices (not measured)."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer = _FirstTokenTimer(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, streamer=timer, **generate_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1] :]
    ttft = (timer.first or end) - start
    n_new = new.shape[1]
    stats = {
        "ttft_s": ttft,
        "latency_s": end - start,
        "new_tokens": n_new,
        "decode_tok_s": (n_new - 1) * new.shape[0] / (end - timer.first)
        if timer.first and n_new > 1
        else None,
        "peak_mem_mb": _peak_memory_mb(device),
    }
    return new, stats


def _peak_memory_mb(device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None  # no per-call measure on CPU: the process RSS peak is the same for every setting


# ============================================================================================================
# Processes
# ============================================================================================================


def _state():
    """accelerate's process state; on machines without CUDA, processes started by ``accelerate launch``
    (or torchrun) join a gloo group (accelerate only does so itself when told the run is CPU-only)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _rank_info() -> tuple[int, int]:
    state = _state()
    return state.process_index, state.num_processes


def _barrier() -> None:
    state = _state()
    if state.num_processes > 1:
        state.wait_for_everyone()


def _broadcast(value, world: int):
    """``value`` of rank 0 on every rank."""
    if world == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


class FolderLock:
    """An exclusive lock on an output folder: ``<folder>/.lock`` held with ``fcntl.flock``.

    The kernel drops the lock when its process dies, so a lock file left by a killed run is taken over; the
    file only records who holds it (pid, host, start time) for the error message. A no-op without
    ``fcntl``."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        if fcntl is None:
            warnings.warn(f"cannot lock {self.path.parent} on this platform", ResumeWarning, stacklevel=2)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by a live process
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"{self.path.parent} is in use by another vtprune eval ({holder}); wait for it to finish or "
                "pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ============================================================================================================
# Results files
# ============================================================================================================


def _stream_files(folder: Path, label: str) -> list[Path]:
    pattern = re.compile(re.escape(label) + r"(\.rank\d+)?\.jsonl")
    return sorted(p for p in folder.glob(f"{label}*.jsonl") if pattern.fullmatch(p.name))


def _read_jsonl(path: Path) -> list[dict]:
    """The records of one file; lines that are not JSON are skipped with a :class:`ResumeWarning`."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and "id" in rec:
            records.append(rec)
        else:
            bad += 1
    if bad:
        warnings.warn(
            f"{path}: {bad} line(s) are not records (written by an older vtprune?); skipped, their samples "
            "are recomputed",
            ResumeWarning,
            stacklevel=3,
        )
    return records


def _repair_cut_line(path: Path) -> None:
    """Truncate ``path`` after its last newline when its last line was cut (a kill during a write)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    warnings.warn(
        f"{path}: the last line was cut ({size - keep} bytes, a killed run?); dropped it, its sample is "
        "recomputed",
        ResumeWarning,
        stacklevel=3,
    )


def _done_ids(folder: Path, label: str) -> set[str]:
    return {str(r["id"]) for path in _stream_files(folder, label) for r in _read_jsonl(path)}


def _records(folder: Path, label: str, ids: set[str] | None = None) -> list[dict]:
    """Records of one (benchmark, setting), one per sample id (restricted to ``ids`` when given)."""
    records = {}
    for path in _stream_files(folder, label):
        for rec in _read_jsonl(path):
            if ids is None or str(rec["id"]) in ids:
                records[str(rec["id"])] = rec
    return list(records.values())


# ============================================================================================================
# Fingerprints
# ============================================================================================================


def _model_fingerprint(model, name) -> dict:
    """Identity of the model: what it was loaded by, its class, dtype, device type and a weights checksum
    (the first 8 values of every parameter: cheap, and different for a retrained or another model)."""
    params = list(model.parameters())
    digest = hashlib.sha1()
    try:
        for p in params:
            digest.update(p.detach().reshape(-1)[:8].float().cpu().numpy().tobytes())
        checksum = digest.hexdigest()[:16]
    except Exception:  # parameters that cannot be read (meta device, exotic quantisation)
        checksum = None
    first = params[0] if params else None
    return {
        "name": name,
        "class": type(model).__name__,
        "dtype": str(first.dtype) if first is not None else None,
        "device": first.device.type if first is not None else None,
        "parameters": sum(p.numel() for p in params),
        "weights_checksum": checksum,
    }


def _benchmark_fingerprint(name: str, bench) -> dict:
    protocol = dict(getattr(bench, "protocol", {}) or {})
    loaded = dict(protocol.pop("loaded", {}) or {})
    for key in ("limit", "samples"):  # sample-level keys: rows are reused by id
        loaded.pop(key, None)
    return {"name": name, **protocol, "loaded": loaded}


def _fingerprint(model_fp: dict, bench_fp: dict, setting: dict, batch_size: int) -> dict:
    from .. import __version__

    fp = {
        "model": model_fp,
        "benchmark": bench_fp,
        "setting": setting,
        "batch_size": batch_size,
        "vtprune": __version__,
    }
    return json.loads(json.dumps(fp, sort_keys=True, default=str))  # as stored and read back


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _read_run_json(out: Path) -> dict:
    path = out / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not valid JSON ({err}); cannot tell what the results in {out} are. Use another --out "
            "or delete the folder"
        ) from err


def _check_resume(out: Path, previous: dict, fingerprints: dict[str, dict]) -> None:
    """Refuse to reuse rows written under another fingerprint (or without one)."""
    streams = previous.get("streams", {})
    for key, fp in fingerprints.items():
        folder, label = out / key.rsplit("/", 1)[0], key.rsplit("/", 1)[1]
        files = [p for p in _stream_files(folder, label) if p.stat().st_size > 0] if folder.is_dir() else []
        if not files:
            continue
        where = f"{folder / label}*.jsonl"
        if key not in streams:
            raise UsageError(
                f"{where} holds results that run.json has no fingerprint for (another vtprune version, or "
                "run.json was replaced); resuming could mix runs. Use another --out or delete those files"
            )
        diffs = _differences(streams[key], fp)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise UsageError(
                f"{where} holds results of a different run ({shown}); resuming would mix them. Use another "
                "--out or delete those files"
            )


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ============================================================================================================
# Running
# ============================================================================================================


def run_eval(run: EvalRun, progress: bool = True) -> EvalSummary:
    """Run every (benchmark, setting); returns the summary rows (computed on rank 0, all ranks return).

    Raises :class:`~vtprune.errors.UsageError` (before computing anything) when ``run.out`` is a file, is
    in use by another run, or holds results of a different run (see the module docstring)."""
    rank, world = _rank_info()
    out = Path(run.out)
    settings = _unique(run.settings)
    labels = setting_labels(settings)
    by_label = dict(zip(labels, settings))
    lock = FolderLock(out)
    failure = None
    if rank == 0:
        try:
            _prepare(run, out, settings, labels, lock, world)
        except Exception as err:
            failure = err
    session = uuid.uuid4().hex[:12]
    message, session = _broadcast(
        (None if failure is None else (isinstance(failure, UsageError), str(failure)), session), world
    )
    if failure is not None:
        raise failure
    if message is not None:
        raise (UsageError if message[0] else RuntimeError)(message[1])
    try:
        dims = get_family(run.model).text_dims()
        for (name, (bench, samples)), label in itertools.product(run.benchmarks.items(), labels):
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            batches = [samples[i : i + run.batch_size] for i in range(0, len(samples), run.batch_size)]
            mine = [(i, b) for i, b in enumerate(batches) if i % world == rank]
            done = _done_ids(folder, label)
            todo = [(i, [s for s in b if str(s.id) not in done]) for i, b in mine]
            todo = [(i, b) for i, b in todo if b]
            path = folder / (f"{label}.rank{rank}.jsonl" if world > 1 else f"{label}.jsonl")
            if todo:
                setting = by_label[label]
                context = (name, label, session, dims)
                _run_setting(run, bench, setting, todo, path, context, progress and rank == 0)
            _barrier()
        _barrier()
        ids = {name: {str(s.id) for s in samples} for name, (_, samples) in run.benchmarks.items()}
        rows = summarize(
            out,
            list(run.benchmarks),
            settings,
            {n: b for n, (b, _) in run.benchmarks.items()},
            ids=ids,
            labels=labels,
        )
        result = EvalSummary(rows)
        if rank == 0:
            main = {n: getattr(b, "main_metric", "") for n, (b, _) in run.benchmarks.items()}
            result.files, result.notes = write_reports(out, rows, main_metrics=main)
        return result
    finally:
        lock.release()


def _prepare(run: EvalRun, out: Path, settings, labels, lock: FolderLock, world: int) -> None:
    """Rank 0, before anything runs: the folder, its lock, the resume check, cut lines, run.json."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; pass a folder (created if missing)")
    _check_wraps(run.model, settings, labels)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, no permission
        raise UsageError(f"cannot create the output folder {str(out)!r}: {err}") from err
    lock.acquire()
    try:
        previous = _read_run_json(out)
        model_fp = _model_fingerprint(run.model, run.meta.get("model"))
        fingerprints = {
            f"{name}/{label}": _fingerprint(
                model_fp, _benchmark_fingerprint(name, bench), setting, run.batch_size
            )
            for name, (bench, _) in run.benchmarks.items()
            for setting, label in zip(settings, labels)
        }
        _check_resume(out, previous, fingerprints)
        for key in fingerprints:
            folder, label = out / key.rsplit("/", 1)[0], key.rsplit("/", 1)[1]
            if folder.is_dir():
                for path in _stream_files(folder, label):
                    _repair_cut_line(path)
        from .. import __version__

        record = dict(run.meta) | {
            "settings": settings,
            "labels": labels,
            "benchmarks": {name: getattr(b, "protocol", {}) for name, (b, _) in run.benchmarks.items()},
            "flops_convention": FLOPS_CONVENTION,
            "batch_size": run.batch_size,
            "processes": world,
            "vtprune": __version__,
            "torch": torch.__version__,
            "streams": previous.get("streams", {}) | fingerprints,
        }
        _write_json_atomic(out / "run.json", record)
    except BaseException:
        lock.release()
        raise


def _check_wraps(model, settings, labels) -> None:
    """Wrap (and unwrap) the model with every pruned setting once, so that what only the model can refuse
    (a layer beyond its depth, two composed methods for one stage) stops the run before it computes."""
    for setting, label in zip(settings, labels):
        if _is_none(setting):
            continue
        try:
            wrap(model, _wrap_arg(setting))
        except UsageError as err:
            raise UsageError(f"setting {label!r}: {err}") from err
        unwrap(model)


def _run_setting(run, bench, setting, todo, path, context, progress):
    from tqdm.auto import tqdm

    name, label, session, dims = context
    model = run.model
    pruned = not _is_none(setting)
    if pruned:
        wrap(model, _wrap_arg(setting))
    try:
        for _ in range(run.warmup):  # a full first batch: kernels, caches, allocator; nothing recorded
            run.answer(todo[0][1], model, bench.generation_kwargs)
        bar = tqdm(todo, desc=f"{name} {label}", disable=not progress, unit="batch")
        for batch_index, samples in bar:
            stopwatch = get_pruner(model).stopwatch if pruned else None
            if stopwatch is not None:
                stopwatch.reset()
            predictions, stats = run.answer(samples, model, bench.generation_kwargs)
            stats = dict(stats, selection_s=stopwatch.seconds if stopwatch is not None else None)
            selections = get_pruner(model).last if pruned else None
            lines = []
            for j, (sample, pred) in enumerate(zip(samples, predictions)):
                rec = {
                    "id": str(sample.id),
                    "benchmark": name,
                    "setting": label,
                    "prediction": pred,
                    "batch": batch_index,
                    "session": session,
                    **bench.score_sample(sample, pred),
                    **stats,
                }
                rec |= _token_stats(model, selections[j] if selections else None, stats["prompt"][j], dims)
                rec.pop("prompt")
                lines.append(json.dumps(rec, default=_jsonable))
            with open(path, "a") as f:  # one write + fsync per batch: a kill loses at most this batch
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
    finally:
        if pruned:
            unwrap(model)


def _wrap_arg(setting: dict | list):
    """What ``vtprune.wrap`` takes for a setting: a config dict, or a list of them (composed)."""
    return [dict(part) for part in setting] if isinstance(setting, list) else dict(setting)


def _token_stats(model, selection, prompt, dims) -> dict:
    d, m, gated, n_layers = dims.hidden, dims.intermediate, dims.gated, dims.num_layers
    if selection is not None:
        text = selection.tokens_in - selection.visual_in
        layer_visual = list(selection.layer_visual)
        visual_in = selection.visual_in
    else:
        text, visual_in = prompt["text"], prompt["visual"]
        layer_visual = [visual_in] * n_layers
    full = prefill_flops(text, [visual_in] * n_layers, d, m, gated)
    flops = prefill_flops(text, layer_visual, d, m, gated)
    return {
        "visual_in": visual_in,
        "visual_llm_input": layer_visual[0] if layer_visual else visual_in,
        "visual_per_layer": layer_visual,
        "visual_mean": sum(layer_visual) / len(layer_visual),
        "text_tokens": text,
        "prefill_tflops": flops / 1e12,
        "flops_ratio": flops / full if full else 1.0,
    }


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# ============================================================================================================
# Summary and reports
# ============================================================================================================


def summarize(
    out: Path,
    benchmarks: list[str],
    settings: list[dict],
    bench_objs: dict,
    ids: dict[str, set[str]] | None = None,
    labels: list[str] | None = None,
) -> list[dict]:
    """One row per (benchmark, setting) with records on disk. ``ids`` (benchmark -> sample ids) restricts
    each benchmark to the samples of this run; ``labels`` defaults to :func:`setting_labels`. A row's
    ``breakdown`` holds the benchmark's grouped metrics (``by_type``, POPE ``splits``, MME ``subtasks``...)."""
    labels = labels or setting_labels(settings)
    rows = []
    for name in benchmarks:
        base = None
        base_answers = None
        per_setting = []
        for setting, label in zip(settings, labels):
            recs = _records(Path(out) / name, label, None if ids is None else ids.get(name))
            if not recs:
                continue
            metrics = bench_objs[name].aggregate(recs)
            batches = {}
            for r in recs:
                batches.setdefault((r.get("session"), r["batch"]), r)
            b = list(batches.values())
            peaks = [x["peak_mem_mb"] for x in b if x.get("peak_mem_mb") is not None]
            row = {
                "benchmark": name,
                "setting": label,
                "samples": len(recs),
                **{k: v for k, v in metrics.items() if _is_number(v)},
                "visual_tokens_input": statistics.fmean(
                    r.get("visual_llm_input", r["visual_per_layer"][0]) for r in recs
                ),
                "visual_tokens_mean": statistics.fmean(r["visual_mean"] for r in recs),
                "flops_ratio": statistics.fmean(r["flops_ratio"] for r in recs),
                "selection_ms": _median(
                    [None if x.get("selection_s") is None else 1e3 * x["selection_s"] for x in b]
                ),
                "ttft_ms": 1e3 * statistics.median(x["ttft_s"] for x in b),
                "latency_ms": 1e3 * statistics.median(x["latency_s"] for x in b),
                "decode_tok_s": _median([x["decode_tok_s"] for x in b]),
                "peak_mem_mb": max(peaks) if peaks else None,
                "_sessions": {r.get("session") for r in recs},
                "_answers": {str(r["id"]): r.get("prediction") for r in recs},
                "breakdown": {k: v for k, v in metrics.items() if isinstance(v, dict)},
            }
            if _is_none(setting):
                base = row
                base_answers = row["_answers"]
            per_setting.append(row)
        base_sessions = base["_sessions"] if base else set()
        for row in per_setting:
            row["loyalty"] = _loyalty(row.pop("_answers"), base_answers)
            row["speedup"] = base["ttft_ms"] / row["ttft_ms"] if base else None
            # realised over FLOPs-ideal speed-up (ideal = 1 / flops_ratio; LLM FLOPs only, FastV's convention)
            row["realised_vs_ideal"] = row["speedup"] * row["flops_ratio"] if base else None
            row["timing_sessions"] = len(row.pop("_sessions") | base_sessions)
        rows.extend(per_setting)
    return rows


def _loyalty(answers: dict, base: dict | None) -> float | None:
    """Share of the samples (by id, those both settings answered) whose answer equals the unpruned one
    (``none``); answers compare as strings with surrounding whitespace stripped. None without ``none``."""
    if base is None:
        return None
    common = [i for i in answers if i in base]
    if not common:
        return None
    same = sum(str(answers[i]).strip() == str(base[i]).strip() for i in common)
    return same / len(common)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def write_reports(
    out: Path, rows: list[dict], main_metrics: dict | None = None
) -> tuple[list[str], list[str]]:
    """summary.csv / summary.md, breakdown.csv / breakdown.md and the Pareto plot (or pareto.txt saying why
    there is none). Returns ``(files written, notes)``; the notes end summary.md."""
    out = Path(out)
    if not rows:
        return [], []
    files, notes = [], []
    columns = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "breakdown"]
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    files.append("summary.csv")
    files += write_breakdown(out, rows)
    try:
        notes += plot_pareto(out / "pareto.png", rows, main_metrics=main_metrics)
        files.append("pareto.png")
    except ImportError as err:
        (out / "pareto.txt").write_text(f"no plot: {err}\n")
        files.append("pareto.txt")
        notes.append(f"pareto.png not drawn: {err}")
    notes = _summary_notes(rows) + notes
    lines = _table(columns, [[row.get(c) for c in columns] for row in rows])
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    files.insert(0, "summary.md")
    return files, notes


def _summary_notes(rows: list[dict]) -> list[str]:
    notes = []
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        if not any(r["setting"] == "none" for r in rows if r["benchmark"] == name):
            notes.append(
                f"{name}: speedup is blank: the unpruned baseline `none` is not among the settings "
                "(add `none` to --methods)"
            )
    if any(r.get("selection_ms") is not None for r in rows):
        notes.append(
            "selection_ms: per batch (median), host wall-clock ms the method spent scoring and selecting - "
            "probe statistics, scorer, keep rule or transform, layer-plan decisions (`Pruner.stopwatch`); "
            "the vision encoder and the LLM layers are not in it. On CUDA it is the time to launch that work "
            "(no synchronisation is added), not the device time"
        )
    if any(r.get("loyalty") is None for r in rows):
        notes.append(
            "loyalty (share of samples whose answer equals the unpruned `none` answer, from the per-sample "
            "JSONL) is blank where `none` did not run on that benchmark in this run (add `none` to --methods)"
        )
    mixed = [f"{r['benchmark']} {r['setting']}" for r in rows if (r.get("timing_sessions") or 0) > 1]
    if mixed:
        notes.append(
            "timing_sessions > 1 ("
            + ", ".join(mixed)
            + "): latency and speed-up combine timings of separate "
            "eval processes (a resumed run); rerun into a fresh --out for like-for-like timings"
        )
    if any(r.get("peak_mem_mb") is None for r in rows):
        notes.append("peak_mem_mb is blank where not measured (only CUDA's per-batch allocator peak is)")
    return notes


def _flatten_breakdown(breakdown: dict) -> list[tuple[str, str, str, Any]]:
    """``(group, key, metric, value)`` for the numbers of a row's breakdown (two levels at most)."""
    items = []
    for group, content in breakdown.items():
        for key, value in content.items():
            if isinstance(value, dict):
                items += [(group, str(key), str(m), v) for m, v in value.items() if _is_number(v)]
            elif _is_number(value):
                items.append((group, str(key), "", value))
    return items


def write_breakdown(out: Path, rows: list[dict]) -> list[str]:
    """breakdown.csv (long: benchmark, setting, group, key, metric, value) and breakdown.md (one table per
    benchmark and group: settings x keys, or for nested groups such as POPE's splits and MME's subtasks,
    (setting, key) x metrics). Nothing is written when no benchmark reports groups."""
    flat = [
        (r["benchmark"], r["setting"], *item)
        for r in rows
        for item in _flatten_breakdown(r.get("breakdown") or {})
    ]
    if not flat:
        return []
    with open(out / "breakdown.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "setting", "group", "key", "metric", "value"])
        writer.writerows(flat)
    lines = ["# Breakdowns", ""]
    for bench in dict.fromkeys(x[0] for x in flat):
        for group in dict.fromkeys(x[2] for x in flat if x[0] == bench):
            items = [x for x in flat if x[0] == bench and x[2] == group]
            settings = list(dict.fromkeys(x[1] for x in items))
            keys = list(dict.fromkeys(x[3] for x in items))
            metrics = list(dict.fromkeys(x[4] for x in items))
            value = {(x[1], x[3], x[4]): x[5] for x in items}
            lines += [f"## {bench}: {group}", ""]
            if metrics == [""]:
                table = _table(
                    ["setting", *keys], [[s, *[value.get((s, k, "")) for k in keys]] for s in settings]
                )
            else:
                table = _table(
                    ["setting", "key", *metrics],
                    [[s, k, *[value.get((s, k, m)) for m in metrics]] for s in settings for k in keys],
                )
            lines += [*table, ""]
    (out / "breakdown.md").write_text("\n".join(lines))
    return ["breakdown.md", "breakdown.csv"]


def _point_label(setting_label: str) -> str:
    parts = [part.partition("-") for part in setting_label.split("+")]
    return "+".join(options or method for method, _, options in parts)


def _label_method(setting_label: str) -> str:
    """The method (``fastervlm``, or ``fastervlm+fastv`` for a composed setting) of a setting label."""
    return "+".join(part.partition("-")[0] for part in setting_label.split("+"))


def plot_pareto(
    path: Path, rows: list[dict], metric: str | None = None, main_metrics: dict | None = None
) -> list[str]:
    """One row of two plots per benchmark: its metric (``metric``, else ``main_metrics[benchmark]``, else a
    guess) against the realised prefill speed-up (TTFT) and against the FLOPs reduction. Points are
    labelled with the setting's options (``keep_ratio=0.25``); settings of one method are joined. Without the
    ``none`` baseline the speed-up plot says so instead of staying empty. Returns notes for the summary."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the Pareto plot needs matplotlib: pip install 'vtprune[plot]'") from err
    names = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False)
    notes = []
    for (ax_speed, ax_flops), name in zip(axes, names):
        bench_rows = [r for r in rows if r["benchmark"] == name]
        key = metric or (main_metrics or {}).get(name) or _main_metric(bench_rows[0])
        if not all(_is_number(r.get(key)) for r in bench_rows):
            key = _main_metric(bench_rows[0])
        has_base = any(r.get("speedup") is not None for r in bench_rows)
        for ax, x in ((ax_speed, "speedup"), (ax_flops, "flops_ratio")):
            if x == "speedup" and not has_base:
                ax.text(
                    0.5,
                    0.5,
                    "no speed-up: the unpruned baseline `none`\nwas not run (add `none` to --methods)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
                notes.append(f"pareto.png: {name} has no speed-up plot (no `none` setting)")
            else:
                for method in dict.fromkeys(_label_method(r["setting"]) for r in bench_rows):
                    pts = [r for r in bench_rows if _label_method(r["setting"]) == method]
                    xy = sorted(
                        ((r[x] if x == "speedup" else 1 / r[x]), r[key], _point_label(r["setting"]))
                        for r in pts
                    )
                    ax.plot(
                        [p[0] for p in xy], [p[1] for p in xy], "o-" if len(xy) > 1 else "o", label=method
                    )
                    for px, py, text in xy:
                        ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
                ax.legend(fontsize=7)
            ax.set_xlabel(
                "realised prefill speed-up vs none (TTFT, x)"
                if x == "speedup"
                else "prefill FLOPs reduction (x)"
            )
            ax.set_ylabel(f"{name}: {key}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


def _main_metric(row: dict) -> str:
    for key in ("accuracy", "exact_match", "vqa_accuracy", "f1", "score", "perception"):
        if key in row:
            return key
    skip = {
        "samples",
        "loyalty",
        "visual_tokens_input",
        "visual_tokens_mean",
        "selection_ms",
        "flops_ratio",
        "ttft_ms",
        "latency_ms",
        "decode_tok_s",
        "peak_mem_mb",
        "speedup",
        "realised_vs_ideal",
        "timing_sessions",
    }
    return next(k for k, v in row.items() if _is_number(v) and k not in skip)
