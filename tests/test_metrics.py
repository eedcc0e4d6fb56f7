"""Metrics: hand-computed golden cases, and parity with lmms-eval's own metric code when it is installed.

The parity tests load lmms-eval 0.7.x's task utilities straight from its files (``pip install lmms-eval==0.7.3
--no-deps`` is enough: ``lmms_eval.tasks/__init__.py``, which pulls in the whole framework, is bypassed and
``loguru`` is stubbed when absent) and compare them with :mod:`vtprune.eval.metrics` on thousands of varied
predictions.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import random
import string
import sys
import types
from pathlib import Path

import pytest

from vtprune.eval import metrics as M

FIXTURES = Path(__file__).parent / "fixtures" / "hub"

# ------------------------------------------------------------------------------------------------------------
# golden cases
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two dogs!", "2 dogs"),
        ("The cat's toy.", "cat 's toy"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("A man", "man"),
        ("none", "0"),
        ("red/white", "red white"),
        ("red / white", "red white"),
        ("  Tennis\n racket\t", "tennis racket"),
        ("Isnt it", "isn't it"),
    ],
)
def test_vqa_normalisation_golden(text, expected):
    assert M.normalize_vqa_answer(text) == expected


def test_vqa_punctuation_rules():
    assert M.vqa_process_punctuation("hello-world") == "hello world"  # no space next to '-': becomes a space
    assert M.vqa_process_punctuation("hello - world") == "hello  world"  # touches a space: deleted
    assert M.vqa_process_punctuation("1,5 (x)") == "15 x"  # a comma between digits: every mark deleted
    assert M.vqa_process_punctuation("e.g. 2.5") == "eg 2.5"
    assert M.vqa_process_digit_article("The Three Dogs Arent") == "3 dogs aren't"


def test_vqa_accuracy_golden():
    answers = ["frisbee"] * 8 + ["disc"] * 2
    assert M.vqa_accuracy("frisbee", answers) == 1.0
    # leaving out a 'frisbee' leaves 2 'disc' (2/3), leaving out a 'disc' leaves 1 (1/3): (8*2/3 + 2*1/3) / 10
    assert M.vqa_accuracy("disc", answers) == pytest.approx(0.6)
    assert M.vqa_accuracy("Disc.", answers) == pytest.approx(0.6)
    assert M.vqa_accuracy("ball", answers) == 0.0
    numbers = ["2"] * 7 + ["3"] * 3
    assert M.vqa_accuracy("two", numbers) == 1.0
    assert M.vqa_accuracy("Three", numbers) == pytest.approx(0.9)  # (7 * 1 + 3 * 2/3) / 10
    assert M.vqa_accuracy("x", []) == 0.0
    assert M.vqa_accuracy("Nokia", ["nokia"] * 4, style="textvqa") == 1.0
    assert M.vqa_accuracy("Nokia", ["nokia"] * 3, style="textvqa") == pytest.approx(2 / 3)  # 2 of 3 left
    assert M.vqa_accuracy("the nokia's", ["nokia 's"] * 4, style="textvqa") == 1.0
    with pytest.raises(ValueError, match="style"):
        M.vqa_accuracy("a", ["a"], style="okvqa")


def test_exact_match_golden():
    assert M.exact_match(" Yes. ", "yes") == 1.0
    assert M.exact_match("T-shirt", "tshirt") == 1.0  # punctuation is deleted on both sides
    assert M.exact_match("the left", "left") == 0.0
    assert M.gqa_llava_match("Left.", "left") == 1.0
    assert M.gqa_llava_match("t shirt", "t-shirt") == 0.0
    assert M.first_word_match("Bottom-right.", "bottom-right") == 1.0
    assert M.first_word_match("red square", "red") == 1.0
    assert M.first_word_match("", "red") == 0.0


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("no, there is not", "no"),
        ("There is no dog.", "no"),
        ("I am not sure", "no"),
        ("Yes. But no.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # LLaVA only looks for 'No', 'no' and 'not'
        ("", "yes"),
    ],
)
def test_parse_yes_no_llava(text, label):
    assert M.parse_yes_no(text) == label


def test_pope_metrics_golden():
    m = M.pope_metrics(["yes", "no", "Yes, it is.", "yes"], ["yes", "no", "no", "Yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 0)
    assert m["accuracy"] == 0.75
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == 1.0
    assert m["f1"] == pytest.approx(0.8)
    assert m["yes_ratio"] == 0.75 and m["gt_yes_ratio"] == 0.5
    raw = M.pope_metrics(["yes", "maybe", "no"], ["yes", "yes", "yes"], parse=False)  # lmms-eval: no parsing
    assert (raw["tp"], raw["fn"], raw["accuracy"], raw["recall"]) == (1, 1, pytest.approx(1 / 3), 0.5)
    assert M.pope_metrics([], [])["f1"] == 0
    with pytest.raises(ValueError, match="yes/no"):
        M.pope_metrics(["yes"], ["maybe"])


def test_pope_report_splits_and_average():
    rows = [
        ("adversarial", "yes", "yes"),
        ("adversarial", "yes", "no"),
        ("random", "no", "no"),
        ("random", "yes", "yes"),
    ]
    rep = M.pope_report(rows)
    assert list(rep["splits"]) == ["adversarial", "random"]
    assert rep["splits"]["adversarial"]["f1"] == pytest.approx(2 / 3)
    assert rep["splits"]["random"]["f1"] == 1.0
    assert rep["f1_avg"] == pytest.approx((2 / 3 + 1) / 2)
    assert rep["pooled"]["f1"] == pytest.approx(0.8)
    assert rep["accuracy_avg"] == 0.75


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Y", "yes"),
        ("n", "no"),
        ("No, it is not.", "no"),
        ("not sure", "no"),
        ("The answer is yes", "other"),
        ("maybe", "other"),
        ("x", "other"),
    ],
)
def test_parse_mme_answer(text, label):
    assert M.parse_mme_answer(text) == label


def test_mme_scores_golden():
    items = [
        ("existence", "e1", 1),
        ("existence", "e1", 1),  # both right
        ("existence", "e2", 1),
        ("existence", "e2", 0),  # half right
        ("count", "c1", 0),
        ("count", "c1", 0),
        ("code_reasoning", "r1", 1),
        ("code_reasoning", "r1", 1),
        ("artwork", "a1", 1),  # a lone question (a --limit cut): no acc+
    ]
    s = M.mme_scores(items)
    ex = s["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, 125.0)
    assert s["subtasks"]["count"]["score"] == 0.0
    assert s["subtasks"]["artwork"] == {
        "score": 100.0,
        "acc": 1.0,
        "acc_plus": 0.0,
        "images": 1,
        "incomplete_images": 1,
    }
    assert s["perception"] == 225.0 and s["cognition"] == 200.0 and s["total"] == 425.0
    assert M.mme_correct("Yes, it is.", "Yes") == 1.0


def test_scienceqa_option_golden():
    assert M.scienceqa_option("A", 4) == "A"
    assert M.scienceqa_option(" b ", 4) == "B"
    assert M.scienceqa_option("C. Arizona", 4) == "C"
    assert M.scienceqa_option("The answer is A.", 4) is None
    assert M.scienceqa_option("E", 4) is None
    assert M.scienceqa_option("a. West Virginia", 4) is None
    assert M.scienceqa_correct("B.", 1, 2) == 1.0
    assert M.scienceqa_correct("A", 1, 2) == 0.0


def test_mmbench_extraction_golden():
    choices = {"A": "teddy bear", "B": "rabbit", "C": "cat", "D": "dog"}
    assert M.mmbench_extract("A", choices) == "A"
    assert M.mmbench_extract("The answer is B.", choices) == "B"
    assert M.mmbench_extract("(C) cat", choices) == "C"
    assert M.mmbench_extract("a cute teddy bear", choices) == "A"  # by option text
    assert M.mmbench_extract("A dog is shown", choices) == "D"  # 'A' may be an article: option text decides
    assert M.mmbench_extract("It could be a cat or a dog", choices) is None
    assert M.mmbench_extract("Answer: the correct option is D", choices) == "D"
    assert M.mmbench_choices({"A": "x", "B": "y", "C": None, "D": float("nan")}) == {"A": "x", "B": "y"}
    assert M.extract_mcq_answer("The correct answer is (B).") == "B"
    assert M.extract_mcq_answer("I choose C") == "C"
    assert M.extract_mcq_answer("") == ""
    assert M.extract_mcq_answer("(A) is wrong, so B.") == "B"


def test_circular_eval_golden():
    rows = [
        (0, True),
        (1_000_000, True),
        (2_000_000, False),
        (1, True),
        (1_000_001, True),
        (5, True),
        (1_000_007, True),
    ]
    out = M.circular_eval(rows)
    assert out["hits"] == {0: 0, 1: 1, 5: 1}  # question 7 has no original row: ignored
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert M.circular_eval([])["accuracy"] == 0.0


# ------------------------------------------------------------------------------------------------------------
# parity with lmms-eval
# ------------------------------------------------------------------------------------------------------------


class _Logger:
    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.fixture(scope="module")
def lmms():
    """lmms-eval's task modules imported from its files, without running ``lmms_eval/tasks/__init__.py``."""
    pytest.importorskip("lmms_eval")
    root = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0])
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        tasks = types.ModuleType("lmms_eval.tasks")
        tasks.__path__ = [str(root / "tasks")]
        mp.setitem(sys.modules, "lmms_eval.tasks", tasks)
        if importlib.util.find_spec("loguru") is None:
            mp.setitem(sys.modules, "loguru", types.SimpleNamespace(logger=_Logger()))
        ns = types.SimpleNamespace(root=root)
        for attr, name in {
            "evalai": "_task_utils.vqa_eval_metric",
            "vqav2": "vqav2.utils",
            "textvqa": "textvqa.utils",
            "gqa": "gqa.utils",
            "pope": "pope.utils",
            "mme": "mme.utils",
            "sqa": "scienceqa.utils",
            "mcq": "_task_utils.mcq_extract",
            "mmb_evals": "mmbench.mmbench_evals",
            "mmb_en": "mmbench.en_utils",
        }.items():
            setattr(ns, attr, importlib.import_module(f"lmms_eval.tasks.{name}"))
        ns.exact_match_hf_evaluate = _function_from(root / "api" / "metrics.py", "exact_match_hf_evaluate")
        ns.evaluator = ns.mmb_evals.MMBench_Evaluator(sys_prompt="There are several options:")
        yield ns
    for name in set(sys.modules) - before:
        if name.startswith("lmms_eval.tasks"):
            del sys.modules[name]


def _function_from(path: Path, name: str):
    """A top-level function of a module file compiled alone (lmms_eval.api.metrics imports heavy packages)."""
    import re as _re

    import numpy as np

    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    namespace = {"np": np, "re": _re, "string": string}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


VOCAB = (
    "yes|Yes|no|No|NO|not|two|Two|2|3|ten|10|none|zero|a|an|The|the|dog|dogs|cat's|its|it's|dont|"
    "isnt|Im|youre|ow's'at|let's|nokia|1,000|1,5|3.5|2.|e.g.|t-shirt|red/white|(x)|[y]|x;y|a+b|"
    '@home|`q`|_u_|<>|"q"|a\\b|?!|!|?|,|.|...|-|ünï|ÉTÉ|A|B|C|D|E|A.|B)|(C)|D:|:A|answer|is|option|'
    "Answer:|The answer is|I choose|Y|n"
).split("|")
SEPARATORS = [" ", " ", " ", "", "\n", "\t", ", ", "-", "/", ". ", "  "]


def random_text(rng: random.Random) -> str:
    words = [rng.choice(VOCAB) for _ in range(rng.randint(0, 4))]
    text = ""
    for w in words:
        text += (rng.choice(SEPARATORS) if text else "") + w
    if rng.random() < 0.3:
        text = rng.choice(["", " ", "\n"]) + text + rng.choice([".", "!", "?", " ", "\n", ""])
    return text


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(20240601)
    return [random_text(rng) for _ in range(3000)]


def test_parity_with_lmms_eval_answer_processor(lmms, texts):
    proc = lmms.evalai.EvalAIAnswerProcessor()
    assert M._CONTRACTIONS == proc.CONTRACTIONS
    for t in texts:
        assert M.normalize_vqa_answer(t) == proc(t), t
        assert M.vqa_process_punctuation(t) == proc.process_punctuation(t), t
        assert M.vqa_process_digit_article(t) == proc.process_digit_article(t), t


def test_parity_with_lmms_eval_vqav2_and_textvqa(lmms, texts):
    rng = random.Random(7)
    for _ in range(2500):
        pool = rng.sample(texts, 3) + [rng.choice(["2", "two", "yes", "nokia", "cat's"])]
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + [rng.choice(texts)])
        doc = {
            "question_id": 1,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
            ],
        }
        ref = lmms.vqav2.vqav2_process_results(doc, [pred])["exact_match"]
        assert M.vqa_accuracy(pred, answers, style="vqav2") == ref, (pred, answers)
        ref = lmms.textvqa.textvqa_process_results({"question_id": 1, "answers": list(answers)}, [pred])[
            "exact_match"
        ]
        assert M.vqa_accuracy(pred, answers, style="textvqa") == ref, (pred, answers)


def test_parity_with_lmms_eval_exact_match(lmms, texts):
    rng = random.Random(3)
    golds = ["yes", "no", "left", "t-shirt", "Red", "2", "tshirt", "man's", "bottom-right", ""]
    for _ in range(2000):
        gold = rng.choice(golds)
        pred = rng.choice([gold, gold.upper() + ".", f" {gold} ", rng.choice(texts)])
        ref = lmms.exact_match_hf_evaluate(
            predictions=[pred.strip()], references=[gold], ignore_case=True, ignore_punctuation=True
        )["exact_match"]
        assert M.exact_match(pred, gold) == float(ref), (pred, gold)


POPE_PREDS = (
    "yes|no|Yes|No| yes |No.|Yes, there is.|There is no dog.|not|NO|maybe||yes no|I do not think so"
).split("|")


def _lmms_pope(lmms, preds, gts):
    results = [
        lmms.pope.pope_process_results({"question_id": i, "answer": g}, [p])
        for i, (p, g) in enumerate(zip(preds, gts))
    ]
    agg = {
        "accuracy": lmms.pope.pope_aggregate_accuracy,
        "precision": lmms.pope.pope_aggregate_precision,
        "recall": lmms.pope.pope_aggregate_recall,
        "f1": lmms.pope.pope_aggregate_f1_score,
        "gt_yes_ratio": lmms.pope.pope_aggregate_yes_ratio,  # lmms-eval's pope_yes_ratio counts the answers
    }
    return {
        k: fn(
            [
                r[f"pope_{'f1_score' if k == 'f1' else 'yes_ratio' if k == 'gt_yes_ratio' else k}"]
                for r in results
            ]
        )
        for k, fn in agg.items()
    }


def test_parity_with_lmms_eval_pope(lmms, texts):
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 40)
        gts = [rng.choice(["yes", "no", "Yes", "No"]) for _ in range(n)]
        preds = [rng.choice(POPE_PREDS + [rng.choice(texts)]) for _ in range(n)]
        ours = M.pope_metrics(preds, gts, parse=False)
        ref = _lmms_pope(lmms, preds, gts)
        assert {k: ours[k] for k in ref} == ref
        # with LLaVA's yes/no parsing applied first, lmms-eval's aggregation gives our parsed metrics
        parsed = M.pope_metrics(preds, gts)
        ref = _lmms_pope(lmms, [M.parse_yes_no(p) for p in preds], gts)
        assert {k: parsed[k] for k in ref} == ref


def test_parity_with_lmms_eval_mme(lmms, texts):
    for t in texts + ["Yes", "no.", "Y", "N", "yes, it is", "No it is not", "nope", "y."]:
        assert M.parse_mme_answer(t) == lmms.mme.parse_pred_ans(t), t
    rng = random.Random(5)
    categories = list(M.MME_PERCEPTION + M.MME_COGNITION)
    for _ in range(20):
        docs, preds = [], []
        for category in rng.sample(categories, rng.randint(1, len(categories))):
            for image in range(rng.randint(1, 4)):
                for answer in rng.sample(["Yes", "No"], 2):
                    docs.append(
                        {"question_id": f"{category}/{image}.jpg", "category": category, "answer": answer}
                    )
                    preds.append(rng.choice(["Yes", "No", "yes.", "no", rng.choice(texts)]))
        order = list(range(len(docs)))
        rng.shuffle(order)
        docs, preds = [docs[i] for i in order], [preds[i] for i in order]
        grouped: dict = {}
        for doc, pred in zip(docs, preds):
            for key, value in lmms.mme.mme_process_results(doc, [pred]).items():
                grouped.setdefault(key, []).append(value)
        ours = M.mme_scores(
            (d["category"], d["question_id"], M.mme_correct(p, d["answer"])) for d, p in zip(docs, preds)
        )
        for key, ours_key in (("mme_perception_score", "perception"), ("mme_cognition_score", "cognition")):
            ref = lmms.mme.mme_aggregate_results(grouped[key]) if key in grouped else 0
            assert ours[ours_key] == ref


SQA_PREDS = ("A|a|B|b.|C. cat|c. cat|D|E|A.|B)|(A)|The answer is A.|Answer: B| C ||AB|A B|Á|ı|B. |Z.").split(
    "|"
)


def test_parity_with_lmms_eval_scienceqa(lmms, texts):
    rng = random.Random(9)
    for _ in range(3000):
        n = rng.randint(2, 5)
        doc = {"choices": [f"choice {i}" for i in range(n)], "answer": rng.randrange(n)}
        pred = rng.choice(SQA_PREDS + [rng.choice(texts)])
        ref = lmms.sqa.sqa_process_results(doc, [pred])["exact_match"]
        assert M.scienceqa_correct(pred, doc["answer"], n) == ref, (pred, doc)


MMB_PREDS = (
    "A|B.|(C)|D|E|The answer is D|I think it is a cat|teddy bear|A dog is shown|Option B: rabbit|"
    "answer: c|C) cat|A or B|none|A B C|it is (A).|:B|B).|"
    "The correct answer is A because the rabbit is not there|Failed to obtain answer via API|a"
).split("|")
MMB_OPTIONS = ["teddy bear", "rabbit", "cat", "dog", "a cat", "Cat", "none of these"]


def test_parity_with_lmms_eval_mmbench_extraction(lmms, texts):
    rng = random.Random(13)
    for _ in range(3000):
        n = rng.randint(2, 4)
        choices = dict(zip("ABCD", rng.sample(MMB_OPTIONS, n)))
        pred = rng.choice(MMB_PREDS + [rng.choice(texts), rng.choice(list(choices.values()))])
        ref = lmms.evaluator.can_infer_option(pred)
        assert M.mmbench_can_infer_option(pred) == (ref or None), pred
        ref = lmms.evaluator.can_infer_text(pred, dict(choices))
        assert M.mmbench_can_infer_text(pred, choices) == (ref or None), (pred, choices)
        letters = sorted(choices)
        assert M.extract_mcq_answer(pred, letters) == lmms.mcq.extract_mcq_answer(pred, choices=letters), pred
        assert M.extract_mcq_answer(pred) == lmms.mcq.extract_mcq_answer(pred), pred


def test_parity_with_lmms_eval_mmbench_circular(lmms, texts):
    rng = random.Random(17)
    results, ours = [], []
    for q in range(60):
        options = rng.sample(MMB_OPTIONS, rng.randint(2, 4))
        answer = rng.randrange(len(options))
        for shift in range(len(options) if rng.random() < 0.8 else 1):
            rotated = options[shift:] + options[:shift]
            letter = "ABCD"[rotated.index(options[answer])]
            row = {
                "index": q + shift * 1_000_000,
                "question": f"q{q}",
                "answer": letter,
                "hint": None,
                "source": "s",
                "split": "dev",
                "category": f"cat{q % 3}",
                "L2-category": "l2",
            }
            for k, letter_k in enumerate("ABCD"):
                row[letter_k] = rotated[k] if k < len(rotated) else None
            row["E"] = "nan"
            row["prediction"] = rng.choice(
                [
                    letter,
                    letter + ".",
                    options[answer],
                    rng.choice(MMB_PREDS),
                    rng.choice(texts),
                    "ABCD"[rng.randrange(len(rotated))],
                ]
            ).strip()
            results.append(row)
            pred = M.mmbench_extract(row["prediction"], M.mmbench_choices(row))
            ours.append((row["index"], pred == letter))
    rng.shuffle(results)
    overall, _, _ = lmms.evaluator.eval_result([dict(r) for r in results], eval_method="static")
    assert 0.2 < overall < 0.8  # a mix of right and wrong questions
    assert M.circular_eval(ours)["accuracy"] == overall


# ------------------------------------------------------------------------------------------------------------
# protocol parity: the task YAMLs and doc_to_text
# ------------------------------------------------------------------------------------------------------------


def _task_yaml(root: Path, relpath: str) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    data = {}
    path = root / "tasks" / relpath
    doc = yaml.load(path.read_text(), Loader=Loader)
    if "include" in doc:
        data.update(_task_yaml(root, str(Path(relpath).parent / doc["include"])))
    data.update(doc)
    return data


TASKS = {  # our benchmark -> lmms-eval 0.7.3 task YAML
    "vqav2": "vqav2/vqav2_val.yaml",
    "gqa": "gqa/gqa.yaml",
    "textvqa": "textvqa/textvqa_val.yaml",
    "pope": "pope/pope.yaml",
    "mme": "mme/mme.yaml",
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "mmbench_en": "mmbench/mmbench_en_dev.yaml",
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_parity_with_lmms_eval_task_yaml(lmms, name):
    from vtprune.eval.benchmarks import get_benchmark

    task = _task_yaml(lmms.root, TASKS[name])
    bench = get_benchmark(name)
    assert bench.hub_ids[0] == task["dataset_path"]
    assert bench.hub_ids[1] == task["dataset_path"].replace("lmms-lab-encoder/", "lmms-lab/")
    assert bench.config == task.get("dataset_name")
    assert bench.split == task["test_split"]
    if "max_new_tokens" in task.get("generation_kwargs", {}):
        assert bench.generation_kwargs["max_new_tokens"] == task["generation_kwargs"]["max_new_tokens"]


def _docs(folder: str, config=None, split="test"):
    import datasets

    return list(datasets.load_dataset(str(FIXTURES / folder), name=config, split=split))


@pytest.mark.parametrize(
    "name, folder, module, fn, config, split",
    [
        ("vqav2", "lmms-lab__VQAv2", "vqav2", "vqav2_doc_to_text", None, "validation"),
        ("gqa", "lmms-lab__GQA", "gqa", "gqa_doc_to_text", "testdev_balanced_instructions", "testdev"),
        ("textvqa", "lmms-lab__textvqa", "textvqa", "textvqa_doc_to_text", None, "validation"),
        ("textvqa_ocr", "lmms-lab__textvqa", "textvqa", "textvqa_doc_to_text", None, "validation"),
        ("pope", "lmms-lab__POPE", "pope", "pope_doc_to_text", None, "test"),
        ("mme", "lmms-lab__MME", "mme", "mme_doc_to_text", None, "test"),
        ("scienceqa_img", "lmms-lab__ScienceQA", "sqa", "sqa_doc_to_text", "ScienceQA-IMG", "test"),
        ("mmbench_en", "lmms-lab__MMBench", "mmb_en", "mmbench_doc_to_text", "en", "dev"),
    ],
)
def test_parity_with_lmms_eval_prompts(lmms, name, folder, module, fn, config, split):
    from vtprune.eval.benchmarks import get_benchmark

    task = _task_yaml(lmms.root, TASKS[name.replace("_ocr", "")])
    kwargs = dict(task["lmms_eval_specific_kwargs"]["default"])
    if name == "textvqa_ocr":
        kwargs["ocr"] = True
    doc_to_text = getattr(getattr(lmms, module), fn)
    bench = get_benchmark(name)
    samples = bench.load(source=FIXTURES / folder)
    docs = _docs(folder, config, split)
    assert len(samples) == len(docs)
    for sample, doc in zip(samples, docs):
        assert sample.prompt == doc_to_text(doc, kwargs)
