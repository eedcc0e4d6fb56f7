"""G-Search and P-Sigmoid (Zhao et al., CVPR 2025, arXiv 2412.00556): find a per-layer visual-token schedule
for :class:`~vtprune.methods.schedule.ScheduleConfig`.

This module holds the searches themselves, independent of any model: a schedule is a list of per-layer
values from a :class:`Space` (counts, or ratios when calibration inputs differ in visual tokens), scored by
an ``evaluate(values) -> float`` (higher is better; :mod:`vtprune.tune.calibration` builds one from a model
and a calibration set) and costed by a :class:`FlopsCost` (the eval harness's FLOPs model,
:func:`vtprune.eval.flops.prefill_flops`). Every evaluation goes through a :class:`TrialLog` (JSONL): a
search killed at any point and started again replays what the log holds without running the model, and
continues to the same result (both searches are deterministic for a seed).

**G-Search** (scenario I: least compute without a performance drop). The paper: from the shallow layers to
the deep, greedily find the least number of visual tokens each layer must keep, never more than the layer
before, such that performance does not drop. Choices where the paper's §3 could not be read here:

* "does not drop" means ``score >= threshold`` (e.g. calibration accuracy >= the unpruned model's minus a
  tolerance; or, label-free, agreement with the unpruned answers / KL of the first answer token);
* while layer ``l`` is searched, the layers after it keep as many tokens as layer ``l`` (the most any of
  them may keep): the least ``c_l`` found is the least for which *some* deeper completion keeps the score;
* the least count is found by binary search over the candidate counts ``<= c_{l-1}``, i.e. the score is
  assumed monotone in each layer's count. (Secondary summaries of the paper say it uses Bayesian
  optimisation per layer; under the monotone assumption bisection is exact and needs ``log2`` evaluations.)

Optimality: if the score stays above the threshold exactly when every layer keeps at least its own number of
essential tokens ``e_l`` (the paper's assumption, in its separable form), the result is the least schedule
that does, ``c_l = max_{m >= l} e_m``, which is what a brute-force search over every non-increasing schedule
returns (tested). For a score that couples layers, the result is feasible and no layer can be lowered alone,
but it need not be the global minimum.

**P-Sigmoid** (scenario II: best score under a FLOPs budget). Layer ``l >= 1`` keeps the fraction
``r(l) = b + (s - b) * sigmoid(-k * (l - alpha))`` of the visual tokens (layer 0 keeps all: no in-LLM method
can drop before it). The shape - steepness ``k`` and midpoint ``alpha`` - is tuned by Bayesian optimisation
(optuna's GP sampler, the optional ``vtprune[tune]`` extra); the level is *solved*, not searched: for each
shape the floor ``b`` (with ``s = 1``), or when even ``b = 0`` costs too much the scale ``s`` (with ``b = 0``),
is the largest whose schedule - after rounding to token counts - fits the budget. Every evaluated schedule
therefore meets the budget by construction (tested with hypothesis). The budget is the FLOPs ratio against
the unpruned model, averaged over the calibration samples as the harness averages it over a benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..eval.flops import prefill_flops
from ..methods.schedule import layer_counts

__all__ = [
    "Space",
    "FlopsCost",
    "TrialLog",
    "greedy_search",
    "psigmoid_values",
    "fit_psigmoid",
    "psigmoid_search",
    "SearchResult",
    "require_optuna",
]


# ============================================================================================================
# Search space and cost
# ============================================================================================================


@dataclasses.dataclass(frozen=True)
class Space:
    """Per-layer schedule values a search may pick.

    Attributes:
        num_layers: decoder layers (schedule length).
        candidates: ascending values a layer may keep; the last is "every visual token" (``N`` counts, or
            ``1.0`` as a ratio), the first is usually 0 (every visual token leaves).
        unit: ``"count"`` or ``"ratio"`` (as :class:`~vtprune.methods.schedule.ScheduleConfig`).
    """

    num_layers: int
    candidates: tuple
    unit: str

    @property
    def full(self):
        return self.candidates[-1]

    @classmethod
    def grid(cls, num_layers: int, visual_tokens: Sequence[int], levels: int | None = None) -> Space:
        """Counts ``round(g * N / levels)`` when every calibration sample has ``N`` visual tokens (every count
        when ``levels`` is None or >= N), else ratios ``g / levels`` (``levels`` default 32)."""
        if num_layers < 2:
            raise UsageError("a schedule search needs a model with at least 2 decoder layers")
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 1):
            raise UsageError(f"grid levels must be an int >= 1, got {levels!r}")
        sizes = set(visual_tokens)
        if not sizes or min(sizes) < 1:
            raise UsageError("the calibration samples carry no visual tokens")
        if len(sizes) == 1:
            n = sizes.pop()
            levels = n if levels is None else min(levels, n)
            return cls(
                num_layers,
                tuple(sorted({math.floor(g * n / levels + 0.5) for g in range(levels + 1)})),
                "count",
            )
        levels = 32 if levels is None else levels
        return cls(num_layers, tuple(g / levels for g in range(levels + 1)), "ratio")

    def validate(self, values: Sequence) -> None:
        if len(values) != self.num_layers or values[0] != self.full:
            raise ValueError(f"not a schedule of this space: {values}")
        if any(b > a for a, b in zip(values, values[1:])):
            raise ValueError(f"schedule increases: {values}")


@dataclasses.dataclass(frozen=True)
class FlopsCost:
    """FLOPs ratio of a schedule against the unpruned model, averaged over samples (the harness's convention:
    per sample, :func:`~vtprune.eval.flops.prefill_flops` of the tokens each layer processes, over the same
    with every visual token)."""

    text_tokens: tuple[int, ...]
    visual_tokens: tuple[int, ...]
    hidden: int
    intermediate: int
    gated: bool
    unit: str

    def __call__(self, values: Sequence) -> float:
        ratios = []
        for text, n in zip(self.text_tokens, self.visual_tokens):
            full = prefill_flops(text, [n] * len(values), self.hidden, self.intermediate, self.gated)
            used = prefill_flops(
                text, layer_counts(list(values), self.unit, n), self.hidden, self.intermediate, self.gated
            )
            ratios.append(used / full)
        return sum(ratios) / len(ratios)


# ============================================================================================================
# Trial log: the per-trial record, and what makes a search resumable
# ============================================================================================================


def _key(values: Sequence) -> str:
    return json.dumps([float(v) for v in values])


class TrialLog:
    """A JSONL file: a header line (the search's settings) and one line per evaluated schedule.

    ``evaluate(values)`` answers from the log when the schedule is there, else runs the objective, appends the
    line (flushed and fsynced: a kill loses at most the trial under way) and returns the score. A log written
    with other settings is refused; a last line cut by a kill is dropped. With ``path=None`` it keeps the
    trials in memory only.
    """

    def __init__(
        self,
        path: str | Path | None,
        header: dict,
        objective: Callable[[list], float],
        cost: Callable[[list], float] | None = None,
        on_trial: Callable[[dict], None] | None = None,
    ):
        self.path = Path(path) if path is not None else None
        self.header = json.loads(json.dumps(header))
        self.objective, self.cost, self.on_trial = objective, cost, on_trial
        self.records: dict[str, dict] = {}
        self.order: list[dict] = []
        self.replayed = 0  # evaluations answered from the log in this run
        self.fresh = 0  # evaluations run in this run
        if self.path is not None:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append({"header": self.header})
            return
        lines = self.path.read_text().split("\n")
        good: list[str] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError:
                if any(rest.strip() for rest in lines[i + 1 :]):  # only the last line may be cut by a kill
                    raise UsageError(
                        f"{self.path}: line {i + 1} is not JSON; the trial log is damaged"
                    ) from None
                continue
            good.append(line)
        if len(good) != len([x for x in lines if x.strip()]):
            self.path.write_text("\n".join(good) + "\n")
        header = json.loads(good[0]).get("header") if good else None
        if header != self.header:
            diff = _differences(header or {}, self.header)
            raise UsageError(
                f"{self.path} holds a search with other settings ({'; '.join(diff) or 'no header'}): pass another "
                "--out folder, or delete it to start over"
            )
        for line in good[1:]:
            record = json.loads(line)
            self.records[_key(record["values"])] = record
            self.order.append(record)

    def _append(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def evaluate(self, values: Sequence, **extra: Any) -> float:
        values = list(values)
        key = _key(values)
        if key in self.records:
            self.replayed += 1
            record = self.records[key]
        else:
            start = time.perf_counter()
            score = float(self.objective(values))
            record = {
                "trial": len(self.order),
                "values": values,
                "score": score,
                "flops_ratio": self.cost(values) if self.cost is not None else None,
                "seconds": round(time.perf_counter() - start, 3),
                **extra,
            }
            self._append(record)
            self.records[key] = record
            self.order.append(record)
            self.fresh += 1
        if self.on_trial is not None:
            self.on_trial(record)
        return record["score"]

    def __len__(self) -> int:
        return len(self.order)


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclasses.dataclass
class SearchResult:
    values: list
    score: float
    flops_ratio: float | None
    evaluations: int  # distinct schedules evaluated (over every run of a resumed search)
    details: dict = dataclasses.field(default_factory=dict)


# ============================================================================================================
# G-Search
# ============================================================================================================


def greedy_search(
    evaluate: Callable[[list], float],
    space: Space,
    threshold: float,
    cost: Callable[[list], float] | None = None,
) -> SearchResult:
    """Greedy shallow-to-deep search for the least per-layer values whose score stays ``>= threshold``.

    Args:
        evaluate: ``values -> score`` (pass :meth:`TrialLog.evaluate` to log and resume).
        space: the candidate values; the schedule keeping everything must score ``>= threshold``.
        threshold: the score a schedule must reach ("performance does not drop").
        cost: optional ``values -> FLOPs ratio`` reported with the result.

    Layer 0 keeps everything; layer ``l`` gets the least candidate ``c <= c_{l-1}`` such that the schedule
    ``c_0 .. c_{l-1}, c, c, ..., c`` reaches the threshold, found by bisection (the score is assumed
    monotone in ``c``). Stops early once a layer keeps the smallest candidate (later layers keep it too).
    """
    n = space.num_layers
    values = [space.full] * n
    calls = 0
    if evaluate(values) < threshold:
        raise UsageError(
            f"the unpruned schedule scores below the threshold {threshold}: nothing to search (check the objective "
            "and tolerance)"
        )
    for layer in range(1, n):
        allowed = [c for c in space.candidates if c <= values[layer - 1]]
        lo, hi = 0, len(allowed) - 1  # allowed[hi]: the current schedule, known to reach the threshold
        while lo < hi:
            mid = (lo + hi) // 2
            trial = values[:layer] + [allowed[mid]] * (n - layer)
            calls += 1
            if evaluate(trial) >= threshold:
                hi = mid
            else:
                lo = mid + 1
        values = values[:layer] + [allowed[lo]] * (n - layer)
        if allowed[lo] == space.candidates[0]:
            break
    score = evaluate(values)
    return SearchResult(values, score, cost(values) if cost is not None else None, calls + 1)


# ============================================================================================================
# P-Sigmoid
# ============================================================================================================


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def psigmoid_ratios(k: float, alpha: float, level: float, num_layers: int) -> list[float]:
    """Keep ratios per layer: 1 at layer 0, then ``b + (s - b) * sigmoid(-k (l - alpha))``.

    ``level`` in [0, 2] walks the two knobs monotonically: ``[0, 1]`` is the scale ``s = level`` with floor
    ``b = 0``; ``[1, 2]`` is the floor ``b = level - 1`` with ``s = 1``. Every ratio is non-decreasing in
    ``level``, and non-increasing in ``l`` for ``k > 0``.
    """
    scale, floor = (level, 0.0) if level <= 1 else (1.0, level - 1.0)
    ratios = [1.0]
    for layer in range(1, num_layers):
        ratios.append(min(1.0, max(0.0, floor + (scale - floor) * _sigmoid(-k * (layer - alpha)))))
    for i in range(1, num_layers):  # exact monotonicity despite float rounding
        ratios[i] = min(ratios[i], ratios[i - 1])
    return ratios


def psigmoid_values(k: float, alpha: float, level: float, space: Space) -> list:
    """:func:`psigmoid_ratios` mapped to the space's values: counts ``round(r * N)`` (0 allowed), or the
    nearest ratio candidate at or below ``r`` (layer 0 keeps everything)."""
    ratios = psigmoid_ratios(k, alpha, level, space.num_layers)
    if space.unit == "count":
        n = space.full
        values = [n] + [int(math.floor(r * n + 0.5)) for r in ratios[1:]]
    else:
        values = [space.full] + [max(c for c in space.candidates if c <= r + 1e-12) for r in ratios[1:]]
    for i in range(1, len(values)):
        values[i] = min(values[i], values[i - 1])
    return values


def fit_psigmoid(
    k: float, alpha: float, budget: float, space: Space, cost: Callable[[list], float], steps: int = 40
) -> tuple[list, float]:
    """The schedule of shape ``(k, alpha)`` with the largest level whose cost is ``<= budget``, and that level.

    Raises :class:`~vtprune.errors.UsageError` when even the lowest level (every visual token leaves after
    layer 0) costs more than the budget.
    """
    lowest = psigmoid_values(k, alpha, 0.0, space)
    floor_cost = cost(lowest)
    if floor_cost > budget:
        raise UsageError(
            f"budget {budget:g} is below the least FLOPs ratio a schedule can reach here ({floor_cost:.3f}: layer "
            "0 processes every visual token)"
        )
    top = psigmoid_values(k, alpha, 2.0, space)
    if cost(top) <= budget:
        return top, 2.0
    lo, hi = 0.0, 2.0  # lo fits the budget, hi does not
    best = lowest
    for _ in range(steps):
        mid = (lo + hi) / 2
        values = psigmoid_values(k, alpha, mid, space)
        if cost(values) <= budget:
            lo, best = mid, values
        else:
            hi = mid
    return best, lo


def require_optuna():
    try:
        import optuna
        import scipy  # noqa: F401  (optuna's GP sampler needs it; optuna does not require it)
    except ImportError as err:
        raise UsageError(
            f"P-Sigmoid's Bayesian optimisation needs optuna's GP sampler ({err}): pip install vtprune[tune]  "
            "(or: pip install optuna scipy)"
        ) from None
    if not hasattr(optuna.samplers, "GPSampler"):
        raise UsageError(f"optuna {optuna.__version__} has no GP sampler: pip install 'optuna>=4.2'")
    return optuna


K_RANGE = (0.1, 10.0)  # sigmoid steepness, log-uniform


def psigmoid_search(
    evaluate: Callable[..., float],
    space: Space,
    budget: float,
    cost: Callable[[list], float],
    trials: int = 30,
    seed: int = 0,
    startup: int = 10,
    progress: Callable[[int], None] | None = None,
) -> SearchResult:
    """Bayesian optimisation (optuna's GP sampler, seeded) of the P-Sigmoid shape ``(k, alpha)`` under a
    FLOPs budget; every trial's level is fitted to the budget (:func:`fit_psigmoid`).

    ``evaluate(values, **extra)`` scores a schedule (pass :meth:`TrialLog.evaluate`: shapes that round to the
    same schedule are evaluated once, and a resumed search replays its log). The first trial is the centred
    shape ``k = 1, alpha = (L - 1) / 2``. The best trial is the highest score, then the lowest FLOPs, then
    the earliest.
    """
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if trials < 1:
        raise UsageError(f"trials must be >= 1, got {trials}")
    sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(startup, trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({"k": 1.0, "alpha": (space.num_layers - 1) / 2})
    found: list[tuple[float, float, int, list, dict]] = []

    def objective(trial):
        k = trial.suggest_float("k", *K_RANGE, log=True)
        alpha = trial.suggest_float("alpha", 0.0, float(space.num_layers - 1))
        values, level = fit_psigmoid(k, alpha, budget, space, cost)
        params = {"k": k, "alpha": alpha, "level": level}
        score = evaluate(values, params=params)
        found.append((score, -cost(values), -trial.number, values, params))
        if progress is not None:
            progress(trial.number)
        return score

    study.optimize(objective, n_trials=trials)
    score, neg_cost, _, values, params = max(found, key=lambda t: t[:3])
    distinct = len({_key(f[3]) for f in found})
    return SearchResult(values, score, -neg_cost, distinct, {"params": params, "trials": trials})
