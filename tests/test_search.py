"""G-Search and P-Sigmoid (vtprune.tune.search): greedy == brute force under the paper's assumption,
P-Sigmoid always meets its budget, killed searches resume to the same result, the model-side objective
encodes images once, and the CLI writes a schedule the method loads."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtprune
from vtprune.cli import main
from vtprune.errors import UsageError
from vtprune.testing import TINY_FAMILIES
from vtprune.tune.calibration import CalibrationSet, ScheduleObjective
from vtprune.tune.search import (
    FlopsCost,
    Space,
    TrialLog,
    fit_psigmoid,
    greedy_search,
    psigmoid_search,
    psigmoid_values,
)


def _cost(space: Space, text=(12, 20), dims=(64, 160, True)) -> FlopsCost:
    n = space.full if space.unit == "count" else 16
    return FlopsCost(tuple(text), (n,) * len(text), *dims, space.unit)


def _separable(essential):
    """A monotone objective under the paper's assumption: the score stays at 0 exactly when every layer keeps
    at least its own number of essential tokens."""
    return lambda values: -float(sum(max(0, e - v) for e, v in zip(essential, values)))


def _brute_force(space: Space, score, threshold, cost):
    best = None
    for tail in itertools.product(space.candidates, repeat=space.num_layers - 1):
        values = [space.full, *tail]
        if any(b > a for a, b in zip(values, values[1:])) or score(values) < threshold:
            continue
        if best is None or cost(values) < cost(best):
            best = values
    return best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_greedy_equals_brute_force_over_non_increasing_schedules(data):
    layers = data.draw(st.integers(2, 5), label="layers")
    n = data.draw(st.integers(1, 6), label="visual tokens")
    essential = data.draw(st.lists(st.integers(0, n), min_size=layers, max_size=layers), label="essential")
    space = Space.grid(layers, [n])
    cost, score = _cost(space), _separable(essential)
    calls = []
    result = greedy_search(lambda v: calls.append(v) or score(v), space, 0.0, cost)
    assert result.values == _brute_force(space, score, 0.0, cost)
    assert result.values == [n] + [max(essential[i:]) for i in range(1, layers)]
    assert len(calls) <= 2 + (layers - 1) * (n + 1).bit_length()  # bisection, not a scan


def test_greedy_result_is_locally_minimal_for_a_coupled_objective():
    space = Space.grid(4, [8])
    cost = _cost(space)

    def score(values):  # couples layers: the total of visual tokens seen by layers 1..3 matters
        return float(sum(values[1:]) >= 12 and values[1] >= 5)

    result = greedy_search(score, space, 1.0, cost)
    assert score(result.values) == 1.0
    for layer in range(1, 4):
        lower = list(result.values)
        lower[layer] -= 1
        if lower[layer] >= 0 and all(b <= a for a, b in zip(lower, lower[1:])):
            assert score(lower) < 1.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(2, 40),
    n=st.integers(1, 600),
    text=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    k=st.floats(0.1, 10.0),
    alpha=st.floats(0.0, 40.0),
    budget=st.floats(0.0, 1.0),
    ratio_space=st.booleans(),
)
def test_psigmoid_schedules_always_meet_the_budget(layers, n, text, k, alpha, budget, ratio_space):
    space = Space.grid(layers, [n, n + 3] if ratio_space else [n], 16 if ratio_space else None)
    visual = (n,) * len(text) if not ratio_space else tuple(n + 3 * (i % 2) for i in range(len(text)))
    cost = FlopsCost(tuple(text), visual, 96, 256, True, space.unit)
    alpha = min(alpha, layers - 1)
    least = cost(psigmoid_values(k, alpha, 0.0, space))
    if budget < least:
        with pytest.raises(UsageError, match="below the least FLOPs ratio"):
            fit_psigmoid(k, alpha, budget, space, cost)
        return
    values, level = fit_psigmoid(k, alpha, budget, space, cost)
    assert cost(values) <= budget
    assert values[0] == space.full and all(b <= a for a, b in zip(values, values[1:]))
    assert all(v in space.candidates for v in values) or space.unit == "count"
    if level < 2.0:  # the level is the largest that fits: a little more does not
        higher = psigmoid_values(k, alpha, min(2.0, level + 1e-6), space)
        assert higher == values or cost(higher) > budget


def _interrupt_after(fn, calls: int):
    state = {"n": 0}

    def wrapped(values):
        if state["n"] == calls:
            raise KeyboardInterrupt
        state["n"] += 1
        return fn(values)

    return wrapped


def test_a_killed_gsearch_resumes_to_the_same_result(tmp_path):
    space = Space.grid(6, [16])
    cost, score = _cost(space), _separable([16, 14, 9, 9, 3, 0])
    header = {"objective": "synthetic"}
    full = greedy_search(TrialLog(None, header, score, cost).evaluate, space, 0.0, cost)
    path = tmp_path / "trials.jsonl"
    with pytest.raises(KeyboardInterrupt):
        greedy_search(TrialLog(path, header, _interrupt_after(score, 5), cost).evaluate, space, 0.0, cost)
    with open(path, "a") as f:
        f.write('{"trial": 5, "values": [16, 1')  # a line cut by the kill
    log = TrialLog(path, header, score, cost)
    resumed = greedy_search(log.evaluate, space, 0.0, cost)
    assert resumed.values == full.values and resumed.evaluations == full.evaluations
    assert log.fresh == len(log) - 5 and log.replayed >= 5
    with pytest.raises(UsageError, match="other settings"):
        TrialLog(path, {"objective": "other"}, score, cost)


def test_a_killed_psigmoid_search_resumes_to_the_same_result(tmp_path):
    space = Space.grid(8, [32])
    cost = _cost(space)

    def score(values):  # prefers keeping tokens late rather than early, with a noisy-looking surface
        return float(sum((i + 1) * v for i, v in enumerate(values)) % 97) / 97

    def run(path, objective):
        log = TrialLog(path, {"objective": "synthetic"}, objective, cost)
        return psigmoid_search(log.evaluate, space, 0.5, cost, trials=5, seed=3, startup=3), log

    full, _ = run(None, score)
    path = tmp_path / "trials.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(path, _interrupt_after(score, 3))
    resumed, log = run(path, score)
    assert resumed.values == full.values and resumed.details["params"] == full.details["params"]
    assert log.replayed >= 3 and all(r["flops_ratio"] <= 0.5 for r in log.order)
    assert resumed.score == max(r["score"] for r in log.order)


_KILL_SCRIPT = """
import sys, time
from vtprune.tune.search import FlopsCost, Space, TrialLog, greedy_search
space = Space.grid(6, [16])
cost = FlopsCost((12, 20), (16, 16), 64, 160, True, "count")
essential = [16, 14, 9, 9, 3, 0]
def score(values):
    time.sleep(float(sys.argv[2]))
    return -float(sum(max(0, e - v) for e, v in zip(essential, values)))
log = TrialLog(sys.argv[1], {"objective": "synthetic"}, score, cost)
print(greedy_search(log.evaluate, space, 0.0, cost).values)
"""


def test_a_search_killed_by_a_signal_resumes_from_its_trial_log(tmp_path):
    script, path = tmp_path / "search.py", tmp_path / "trials.jsonl"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path), "0.2"], stdout=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = len(path.read_text().splitlines()) - 1
    assert 3 <= logged < 10
    done = subprocess.run(
        [sys.executable, str(script), str(path), "0"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[16, 14, 9, 9, 3, 0]"
    lines = path.read_text().splitlines()[1:]
    assert len(lines) > logged
    schedules = [tuple(json.loads(line)["values"]) for line in lines]
    assert len(schedules) == len(set(schedules))  # the resumed run evaluated none of the logged ones again


# --------------------------------------------------------------------------------------- model side


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # equal / unequal visual tokens per sample
def test_objective_encodes_images_once_and_scores_the_full_schedule_as_unpruned(family, monkeypatch):
    tiny = TINY_FAMILIES[family]
    model = tiny.build(text_layers=4)
    base = vtprune.registry.get_family(model).base_model
    calls = []
    original = base.get_image_features

    @functools.wraps(original)  # the objective reads the encoder's signature
    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "get_image_features", counted)
    calibration = CalibrationSet([tiny.inputs(model, seed=s) for s in range(2)], description="tiny")
    kl = ScheduleObjective(model, calibration, "kl")
    agree = ScheduleObjective(model, calibration, "agreement", max_new_tokens=2)
    assert len(calls) == 4  # two objectives x two batches, at construction only
    assert kl([1.0] * 4, "ratio") == pytest.approx(0.0, abs=1e-6)
    assert agree([1.0] * 4, "ratio") == 1.0
    assert kl([1.0, 0.5, 0.25, 0.0], "ratio") < 0
    assert len(calls) == 4
    space = Space.grid(4, kl.visual_tokens)
    assert space.unit == ("count" if len(set(kl.visual_tokens)) == 1 else "ratio")


def test_accuracy_needs_labels():
    tiny = TINY_FAMILIES["llava"]
    model = tiny.build(text_layers=4)
    with pytest.raises(UsageError, match="label-free"):
        ScheduleObjective(model, CalibrationSet([tiny.inputs(model)]), "accuracy")


def test_cli_gsearch_on_the_toy_model_writes_a_schedule_the_method_loads_and_resumes(tmp_path, capsys):
    out = tmp_path / "gs"
    args = ["search", "gsearch", "--samples", "8", "--batch-size", "8", "--grid", "4", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"schedule.json", "search.json", "summary.md", "trials.jsonl"}
    assert summary["vision_encoder_calls"] == 1 and summary["evaluated_this_run"] == summary["trials_logged"]
    assert summary["score"] >= summary["threshold"]
    keep = summary["schedule"]["keep"]
    assert keep[0] == 36 and all(v in (0, 9, 18, 27, 36) for v in keep)
    assert main([*args, "--no-progress"]) == 0  # resumed: everything answered from trials.jsonl
    again = json.loads((out / "search.json").read_text())
    assert again["schedule"] == summary["schedule"] and again["evaluated_this_run"] == 0
    from vtprune.toy import load_toy_model

    model, _ = load_toy_model()
    vtprune.wrap(model, "schedule", path=str(out / "schedule.json"))
    assert vtprune.get_pruner(model).parts.plan.keep == keep
    vtprune.unwrap(model)
    from vtprune.eval.harness import parse_settings

    file = str(out / "schedule.json")
    assert parse_settings([file]) == [summary["schedule"]]
    assert parse_settings([f"schedule:path={file}"]) == [{"method": "schedule", "path": file}]


def test_cli_psigmoid_meets_the_budget_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "ps"
    base = [
        "search",
        "psigmoid",
        "--samples",
        "16",
        "--batch-size",
        "16",
        "--objective",
        "kl",
        "--out",
        str(out),
    ]
    assert main([*base, "--budget", "0.6", "--trials", "3", "--startup", "2", "--no-progress"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["flops_ratio"] <= 0.6
    assert all(
        json.loads(line)["flops_ratio"] <= 0.6 for line in (out / "trials.jsonl").read_text().splitlines()[1:]
    )
    with pytest.raises(SystemExit) as err:
        main([*base, "--budget", "1.5"])
    assert err.value.code == 2 and "budget must be a FLOPs ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["search", "gsearch", "--model", "mid-llava", "--benchmark", "gqa"])
    assert err.value.code == 2 and "drop --benchmark" in capsys.readouterr().err


def test_psigmoid_without_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    space = Space.grid(4, [8])
    with pytest.raises(UsageError, match=r"pip install vtprune\[tune\]"):
        psigmoid_search(lambda v, **k: 0.0, space, 0.5, _cost(space), trials=2)


def test_space_grid_uses_counts_for_equal_inputs_and_ratios_otherwise():
    assert Space.grid(3, [36, 36]).candidates == tuple(range(37))
    assert Space.grid(3, [576], 16).candidates == tuple(36 * g for g in range(17))
    ratio = Space.grid(3, [16, 24], 4)
    assert ratio.unit == "ratio" and ratio.candidates == (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(UsageError):
        Space.grid(1, [16])
