"""vtprune's lmms-eval model (``vtprune.eval.lmms_plugin``): registration through lmms-eval 0.7's entry-point
group, generation and log-likelihood requests on the toy model, pruned and not.

Needs lmms-eval importable; ``pip install --no-deps lmms-eval==0.7.3 loguru pytz`` is enough (the model base
class and the registry need no more), as for the parity tests in tests/test_metrics.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip("loguru")

from lmms_eval.api.instance import Instance  # noqa: E402

from vtprune.errors import UsageError  # noqa: E402
from vtprune.eval.lmms_plugin import VTPruneLMM, manifest  # noqa: E402
from vtprune.toy import answer_questions, load_toy_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def docs():
    data = load_toy_benchmark("test").select(range(6))
    return [{"image": row["image"], "question": row["question"], "answer": row["answer"]} for row in data]


def _attach(model, docs):
    model.task_dict = {"toy": {"test": docs}}
    return model


def _generate_requests(docs, until=("\n",)):
    return [
        Instance(
            "generate_until",
            arguments=(
                d["question"],
                {"until": list(until), "max_new_tokens": 4},
                lambda doc: [doc["image"]],
                i,
                "toy",
                "test",
            ),
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


def _loglik_requests(docs, targets):
    return [
        Instance(
            "loglikelihood",
            arguments=(d["question"], " " + t, lambda doc: [doc["image"]], i, "toy", "test"),
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1},
        )
        for i, (d, t) in enumerate(zip(docs, targets))
    ]


def test_manifest_and_entry_point():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    m = manifest()
    assert m.model_id == "vtprune" and m.simple_class_path.endswith("lmms_plugin.VTPruneLMM")
    registry = ModelRegistryV2()
    registry.register_manifest(m)
    assert registry.get_model_class("vtprune") is VTPruneLMM
    # the installed package's entry point (setup.cfg) resolves to the same manifest when its metadata is current
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vtprune"]
    if not found:
        pytest.skip("vtprune's installed metadata predates the entry point: pip install -e . again")
    assert found[0].load()() == m


def test_generate_until_matches_the_harness_answers(docs):
    lm = _attach(VTPruneLMM.create_from_arg_string("pretrained=toy,method=fastervlm,keep_ratio=0.25"), docs)
    answers = lm.generate_until(_generate_requests(docs))
    expected = answer_questions(
        lm.model, lm.processor, [d["image"] for d in docs], [d["question"] for d in docs]
    )
    assert answers == expected
    assert lm.model.__dict__["_vtprune"].last[0].visual_out == 9  # pruned: 9 of 36 tokens


def test_loglikelihood_on_the_pruned_prompt(docs):
    targets = [d["answer"] for d in docs]
    full = _attach(VTPruneLMM(pretrained="toy"), docs)
    pruned = _attach(VTPruneLMM(pretrained="toy", method="fastervlm", keep_ratio=0.1), docs)
    scored = full.loglikelihood(_loglik_requests(docs, targets))
    assert all(loss > 0 for loss, _ in scored)  # a mean negative log-likelihood, as lmms-eval's models return
    # greedy flags agree with what generation answers
    answers = full.generate_until(_generate_requests(docs))
    assert [g for _, g in scored] == [a == t for a, t in zip(answers, targets)]
    # the unwrapped model's own negative log-probability of the answer token (one word-level token here)
    for (loss, _), d, t in zip(scored, docs, targets):
        prompt = full.prompt_fn(full.processor, d["question"], 1)
        inputs = full.processor(images=[d["image"]], text=[prompt + " " + t], return_tensors="pt")
        with torch.no_grad():
            logits = full.model(**inputs).logits[0, -2]
        assert loss == pytest.approx(
            -float(torch.log_softmax(logits, -1)[inputs["input_ids"][0, -1]]), abs=1e-5
        )
    pruned_scores = pruned.loglikelihood(_loglik_requests(docs, targets))
    assert pruned.model.__dict__["_vtprune"].last[0].visual_out == 4
    assert [round(a, 4) for a, _ in pruned_scores] != [round(a, 4) for a, _ in scored]


def test_bad_model_args():
    with pytest.raises(UsageError, match="method"):
        VTPruneLMM(pretrained="toy", keep_ratio=0.1)
    with pytest.raises(UsageError):
        VTPruneLMM(pretrained="toy", method="fastervlm", keep_ratio=3.0)


# --------------------------------------------------------------------------- a whole lmms-eval run
FIXTURE_TASKS = Path(__file__).parent / "fixtures" / "lmms_task"


@pytest.fixture
def lmms_tasks(tmp_path, monkeypatch):
    """The fixture tasks (tests/fixtures/lmms_task) pointed at the toy synthetic split, and lmms-eval 0.7.3's
    evaluator made to run here."""
    pytest.importorskip("lmms_eval.evaluator", exc_type=ImportError)
    import lmms_eval.api.instance as instance
    import lmms_eval.evaluator as evaluator

    from vtprune.toy import TOY_MODEL_DIR

    data = TOY_MODEL_DIR.parent / "synthetic_vqa"
    for f in FIXTURE_TASKS.iterdir():
        if f.suffix == ".yaml":
            (tmp_path / f.name).write_text(f.read_text().replace("DATASET_PATH", str(data)))
        elif f.suffix == ".py":
            shutil.copy(f, tmp_path / f.name)
    # lmms-eval 0.7.3 patches filelock._api, which filelock 4.3.1 does not have; the patch only makes locks
    # re-entrant across processes, which a one-process run never needs
    monkeypatch.setattr(evaluator._enable_reentrant_filelocks, "_patched", True, raising=False)
    # lmms-eval 0.7.3 turns every model's loglikelihood (float, bool) pair into its str() before scoring
    # (api/instance.py unwrap_generation_output), so no multiple-choice task can be scored; pass pairs through
    unwrap = evaluator.unwrap_generation_output

    def keep_pairs(output):
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], bool):
            return output, None
        return unwrap(output)

    monkeypatch.setattr(evaluator, "unwrap_generation_output", keep_pairs)
    assert instance.unwrap_generation_output((-1.0, True))[0] == "(-1.0, True)"  # the upstream behaviour
    return tmp_path


def test_lmms_eval_runs_a_task_through_the_plugin(lmms_tasks):
    """``simple_evaluate(model="vtprune", ...)``: the model resolved by name (the entry point, or the registry
    the test fills when the installed metadata predates it), a generation task and a multiple-choice
    (log-likelihood) task on 4 toy questions each, pruned by FasterVLM."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    if "vtprune" not in MODEL_REGISTRY_V2.list_model_names():
        MODEL_REGISTRY_V2.register_manifest(manifest())
    out = simple_evaluate(
        model="vtprune",
        model_args="pretrained=toy,method=fastervlm,keep_ratio=0.25",
        tasks=["vtprune_toy_gen", "vtprune_toy_mc"],
        limit=4,
        batch_size=1,
        log_samples=True,
        task_manager=TaskManager(include_path=str(lmms_tasks)),
    )
    gen = out["results"]["vtprune_toy_gen"]["exact_match,none"]
    mc = out["results"]["vtprune_toy_mc"]["acc,none"]
    samples = sorted(out["samples"]["vtprune_toy_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == 4 and len(out["samples"]["vtprune_toy_mc"]) == 4
    # the first 4 questions, answered by the wrapped toy model as the eval harness answers them
    direct = VTPruneLMM(pretrained="toy", method="fastervlm", keep_ratio=0.25)
    rows = load_toy_benchmark("test").select(range(4))
    expected = answer_questions(direct.model, direct.processor, rows["image"], rows["question"])
    assert [s["filtered_resps"][0] for s in samples] == expected
    assert gen == pytest.approx(sum(a == t for a, t in zip(expected, rows["answer"])) / 4)
    # multiple choice: the choice of lowest loss
    mc_samples = sorted(out["samples"]["vtprune_toy_mc"], key=lambda s: s["doc_id"])
    assert mc == pytest.approx(sum(s["acc"] for s in mc_samples) / 4)
    for s in mc_samples:  # log-likelihood pairs reached the scorer, and acc is the argmax choice's
        pairs = [tuple(r) for r in s["filtered_resps"]]
        assert len(pairs) >= 2 and all(isinstance(loss, float) and loss > 0 for loss, _ in pairs)
        best = min(range(len(pairs)), key=lambda i: pairs[i][0])  # lmms-eval picks the lowest loss
        assert s["acc"] == float(best == s["target"])
