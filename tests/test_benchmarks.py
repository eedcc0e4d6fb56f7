"""Benchmarks load from local mirrors of their hub repos (tests/fixtures/hub), build the protocol's prompts,
validate schemas and score end to end. Offline: only the committed fixtures are read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from PIL import Image

from vtprune.eval import benchmarks as B
from vtprune.eval.benchmarks import (
    BenchmarkLoadError,
    SchemaError,
    UnknownBenchmarkError,
    get_benchmark,
    list_benchmarks,
)
from vtprune.eval.benchmarks import synthetic as synthetic_module

HUB = Path(__file__).parent / "fixtures" / "hub"
SOURCES = {
    "vqav2": "lmms-lab__VQAv2",
    "gqa": "lmms-lab__GQA",
    "textvqa": "lmms-lab__textvqa",
    "textvqa_ocr": "lmms-lab__textvqa",
    "pope": "lmms-lab__POPE",
    "mme": "lmms-lab__MME",
    "scienceqa_img": "lmms-lab__ScienceQA",
    "mmbench_en": "lmms-lab__MMBench",
    "synthetic": "vtprune__synthetic_vqa",
}
COUNTS = {
    "vqav2": 4,
    "gqa": 5,
    "textvqa": 3,
    "textvqa_ocr": 3,
    "pope": 6,
    "mme": 8,
    "scienceqa_img": 3,
    "mmbench_en": 6,
    "synthetic": 4,
}
MAIN = {
    "vqav2": "vqa_accuracy",
    "gqa": "exact_match",
    "textvqa": "vqa_accuracy",
    "textvqa_ocr": "vqa_accuracy",
    "pope": "f1",
    "mme": "perception",
    "scienceqa_img": "accuracy",
    "mmbench_en": "accuracy",
    "synthetic": "exact_match",
}
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name):
        if name not in cache:
            bench = get_benchmark(name)
            cache[name] = (bench, bench.load(source=HUB / SOURCES[name]))
        return cache[name]

    return get


def truth(sample):
    """A prediction equal to the ground truth, in the form a model would write it."""
    return sample.target[0] if isinstance(sample.target, list) else sample.target.capitalize()


def records(bench, samples, predictions):
    """What the harness writes and reads back: one JSON line per sample."""
    out = []
    for s, p in zip(samples, predictions):
        rec = {"id": s.id, "benchmark": bench.name, "prediction": p, **bench.score_sample(s, p)}
        out.append(json.loads(json.dumps(rec)))
    return out


def test_registry_and_unknown_name():
    assert set(SOURCES) <= set(list_benchmarks())
    with pytest.raises(UnknownBenchmarkError, match="unknown benchmark 'vqa3'.*gqa.*mmbench_en.*vqav2"):
        get_benchmark("vqa3")
    assert get_benchmark("VQAv2").name == "vqav2"
    assert get_benchmark("textvqa", ocr_tokens=True).name == "textvqa_ocr"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_loads_fixture_and_scores_end_to_end(loaded, name):
    bench, samples = loaded(name)
    assert len(samples) == COUNTS[name]
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        assert s.images and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in s.images)
        assert s.prompt and "<image>" not in s.prompt
    perfect = bench.aggregate(records(bench, samples, [truth(s) for s in samples]))
    wrong = bench.aggregate(records(bench, samples, ["zebra crossing"] * len(samples)))
    best = {"mme": 400.0}.get(name, 1.0)  # MME fixture: two perception subtasks (+ one cognition)
    assert perfect[MAIN[name]] == pytest.approx(best)
    assert wrong[MAIN[name]] == (pytest.approx(2 / 3) if name == "pope" else 0.0)  # POPE: "yes" to everything
    assert bench.evaluate(samples, [truth(s) for s in samples]) == perfect
    proto = bench.protocol
    assert proto["benchmark"] == bench.name and proto["main_metric"] == MAIN[name]
    assert proto["loaded"]["source"].endswith(SOURCES[name]) and proto["loaded"]["samples"] == len(samples)
    assert set(bench.generation_kwargs) >= {"max_new_tokens", "do_sample"}
    json.dumps(proto)


def test_vqav2(loaded):
    bench, samples = loaded("vqav2")
    s = samples[0]
    assert s.id == "262148000"
    assert s.prompt == "What is the man holding?" + SHORT
    assert s.target == ["frisbee"] * 8 + ["disc"] * 2
    assert s.meta["answer_type"] == "other"
    rec = bench.score_sample(s, "Disc.")
    assert rec["score"] == pytest.approx(0.6)
    out = bench.evaluate(samples, ["frisbee", "two", "No.", "blue"])
    assert out["vqa_accuracy"] == pytest.approx(0.75)
    assert out["by_answer_type"] == {"number": 1.0, "other": 0.5, "yes/no": 1.0}


def test_gqa_joins_images_on_image_id(loaded):
    bench, samples = loaded("gqa")
    images = {
        r["id"]: r["image"].convert("RGB")
        for r in datasets.load_dataset(str(HUB / "lmms-lab__GQA"), "testdev_balanced_images", split="testdev")
    }
    for s in samples:
        assert s.images[0].tobytes() == images[s.meta["imageId"]].tobytes()
    assert samples[0].prompt == "Is it overcast?" + SHORT and samples[0].target == "no"
    assert bench.loaded["config"] == ["testdev_balanced_instructions", "testdev_balanced_images"]
    out = bench.evaluate(samples, ["No.", "Woman", "white fence", "yes", "Left"])
    assert out == {"exact_match": 0.8, "exact_match_llava": 0.8}
    assert len(get_benchmark("gqa").load(source=HUB / "lmms-lab__GQA", limit=2)) == 2


def test_textvqa_prompts_with_and_without_ocr(loaded):
    bench, samples = loaded("textvqa")
    assert samples[0].prompt == "What brand is the phone?" + SHORT  # lmms-eval capitalizes the question
    _, ocr = loaded("textvqa_ocr")
    assert ocr[0].prompt == "What brand is the phone?\nReference OCR token: nokia, connecting, people" + SHORT
    out = bench.evaluate(samples, ["Nokia", "twenty three", "stop"])
    assert out["vqa_accuracy"] == pytest.approx((1 + 2 / 3 * 0.8 + 1 / 3 * 0.2 + 1) / 3)


def test_pope_splits_limit_and_full_config(loaded):
    bench, samples = loaded("pope")
    assert [s.id for s in samples][:2] == ["adversarial/1", "adversarial/2"]
    assert samples[0].prompt == "Is there a dog in the image?" + SHORT and samples[0].target == "yes"
    preds = ["Yes, there is a dog.", "No.", "yes", "yes", "no", "There is no snowboard."]
    out = bench.evaluate(samples, preds)
    assert out["splits"]["adversarial"]["f1"] == 1.0
    assert out["splits"]["popular"]["f1"] == pytest.approx(2 / 3)
    assert out["splits"]["random"]["f1"] == 0.0
    assert out["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert out["pooled_accuracy"] == pytest.approx(4 / 6) and out["yes_ratio"] == 0.5
    limited = get_benchmark("pope").load(source=HUB / "lmms-lab__POPE", limit=3)  # round-robin over splits
    assert [s.meta["category"] for s in limited] == ["adversarial", "popular", "random"]
    full = get_benchmark("pope").load(source=HUB / "lmms-lab__POPE", config="Full")
    assert [s.id for s in full] == [s.id for s in samples]
    assert [
        s.prompt
        for s in get_benchmark("pope").load(source=HUB / "lmms-lab__POPE", config="Full", split="random")
    ] == [s.prompt for s in samples[4:]]


def test_mme_pairs_and_scores(loaded):
    bench, samples = loaded("mme")
    assert samples[0].id == "existence/000000006040.jpg#0" and samples[1].id == "existence/000000006040.jpg#1"
    assert (
        samples[0].prompt == "Is there a train in this image?" + SHORT
    )  # " Please answer yes or no." replaced
    assert [s.target for s in samples[:2]] == ["yes", "no"]
    preds = ["Yes", "No", "Yes", "Yes", "yes", "no", "No", "No"]
    out = bench.evaluate(samples, preds)
    assert out["subtasks"]["existence"]["score"] == 125.0  # mean over images of (acc + acc+): (200 + 50) / 2
    assert out["subtasks"]["OCR"]["score"] == 200.0
    assert out["subtasks"]["code_reasoning"] == pytest.approx(
        {"score": 50.0, "acc": 0.5, "acc_plus": 0.0, "images": 1, "incomplete_images": 0}
    )
    assert (out["perception"], out["cognition"], out["total"]) == (325.0, 50.0, 375.0)


def test_scienceqa_prompts_and_letters(loaded):
    bench, samples = loaded("scienceqa_img")
    assert samples[0].prompt == (
        "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma"
        + LETTER
    )
    assert samples[1].prompt.startswith("Context: The passage below describes an experiment.\nIdentify the")
    assert [s.target for s in samples] == ["A", "B", "B"]
    out = bench.evaluate(samples, ["A", "B. Do ping pong balls travel farther?", "The answer is B."])
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["by_subject"] == {"natural science": 0.5, "social science": 1.0}


def test_mmbench_prompt_circular_and_limit(loaded):
    bench, samples = loaded("mmbench_en")
    assert [s.id for s in samples] == ["0", "1", "1000000", "1000001", "2000000", "3000000"]
    assert samples[0].prompt == (
        "What is the main object in the image? There are several options:\n"
        "A. teddy bear\nB. rabbit\nC. cat\nD. dog"
        "\n" + LETTER
    )
    assert samples[1].prompt == (
        "The picture shows a road sign. Which direction is the arrow pointing? There are several options:\n"
        "A. left\nB. right\n" + LETTER
    )
    truths = [s.target for s in samples]
    assert bench.evaluate(samples, truths)["accuracy"] == 1.0
    one_wrong = list(truths)
    one_wrong[4] = "A" if truths[4] != "A" else "B"  # a circular variant of question 0
    out = bench.evaluate(samples, one_wrong)
    assert out["accuracy"] == 0.5 and out["vanilla_accuracy"] == pytest.approx(5 / 6)
    assert out["by_category"] == {"image_scene": 0.0, "spatial_relationship": 1.0}
    by_text = bench.evaluate(
        samples, ["teddy bear", "right", "teddy bear", "It points right.", "teddy", "bear"]
    )
    assert by_text["accuracy"] == 0.5  # "teddy" / "bear" alone name no option
    limited = get_benchmark("mmbench_en").load(source=HUB / "lmms-lab__MMBench", limit=1)
    assert [s.id for s in limited] == ["0", "1000000", "2000000", "3000000"]  # whole circular group


def test_synthetic_first_word_and_default_folder(loaded, monkeypatch, tmp_path):
    bench, samples = loaded("synthetic")
    assert samples[0].prompt == "what color is the circle ?" and samples[0].target == "red"
    out = bench.evaluate(samples, ["Red.", "square", "two", "bottom-right"])
    assert out["exact_match"] == 0.75 and out["by_type"]["count"] == 0.0
    monkeypatch.setattr(synthetic_module, "SYNTHETIC_DIR", tmp_path / "missing")
    with pytest.raises(BenchmarkLoadError, match="python -m vtprune.toy.synthetic"):
        get_benchmark("synthetic").load()
    shutil.copytree(HUB / SOURCES["synthetic"], tmp_path / "shipped")
    monkeypatch.setattr(synthetic_module, "SYNTHETIC_DIR", tmp_path / "shipped")
    assert len(get_benchmark("synthetic").load(limit=2)) == 2


def _copy_without(src: Path, dst: Path, parquet: str, drop: str | None = None, transform=None) -> Path:
    shutil.copytree(src, dst)
    ds = datasets.Dataset.from_parquet(str(src / parquet))
    ds = ds.remove_columns(drop) if drop else transform(ds)
    ds.to_parquet(str(dst / parquet))
    readme = dst / "README.md"
    readme.write_text(
        readme.read_text().split("dataset_info:")[0] + "---\n"
    )  # keep configs, drop stale features
    return dst


def test_missing_column_is_a_clear_error(tmp_path):
    folder = _copy_without(
        HUB / "lmms-lab__MME", tmp_path / "mme", "data/test-00000-of-00001.parquet", "category"
    )
    with pytest.raises(SchemaError, match=r"benchmark 'mme': column 'category' is missing"):
        get_benchmark("mme").load(source=folder)
    folder = _copy_without(
        HUB / "lmms-lab__GQA",
        tmp_path / "gqa",
        "testdev_balanced_instructions/testdev-00000-of-00001.parquet",
        "imageId",
    )
    with pytest.raises(SchemaError, match=r"benchmark 'gqa': column 'imageId' is missing"):
        get_benchmark("gqa").load(source=folder)
    with pytest.raises(SchemaError, match=r"benchmark 'textvqa_ocr': column 'ocr_tokens'"):
        folder = _copy_without(
            HUB / "lmms-lab__textvqa", tmp_path / "tv", "data/validation-00000-of-00001.parquet", "ocr_tokens"
        )
        get_benchmark("textvqa_ocr").load(source=folder)
    assert len(get_benchmark("textvqa").load(source=folder)) == 3  # plain TextVQA does not read ocr_tokens

    def rename_answer_field(ds):
        answers = [[{"text": a["answer"], "answer_id": a["answer_id"]} for a in row] for row in ds["answers"]]
        feature = datasets.List({"text": datasets.Value("string"), "answer_id": datasets.Value("int64")})
        return ds.remove_columns("answers").add_column("answers", answers, feature=feature)

    folder = _copy_without(
        HUB / "lmms-lab__VQAv2",
        tmp_path / "vqa",
        "data/validation-00000-of-00001.parquet",
        transform=rename_answer_field,
    )
    with pytest.raises(SchemaError, match=r"benchmark 'vqav2': column 'answers'.*lacks the field 'answer'"):
        get_benchmark("vqav2").load(source=folder)


def test_images_are_decoded_lazily_and_null_images_dropped(loaded, tmp_path):
    _, samples = loaded("vqav2")
    assert isinstance(samples[0].images, B.LazyImages) and len(samples[0].images) == 1
    first, again = samples[0].images[0], list(samples[0].images)[0]
    assert first is not again and first.tobytes() == again.tobytes()  # decoded on each access, not kept

    def drop_first_image(ds):
        images = [None] + list(ds.cast_column("image", datasets.Image(decode=False))["image"][1:])
        return ds.remove_columns("image").add_column("image", images, feature=datasets.Image())

    folder = _copy_without(
        HUB / "lmms-lab__ScienceQA",
        tmp_path / "sqa",
        "ScienceQA-IMG/test-00000-of-00001.parquet",
        transform=drop_first_image,
    )
    samples = get_benchmark("scienceqa_img").load(source=folder)
    assert [len(s.images) for s in samples] == [0, 1, 1]


def test_bad_sources_and_splits(tmp_path):
    with pytest.raises(BenchmarkLoadError, match="no such folder"):
        get_benchmark("mme").load(source=str(tmp_path / "nope"))
    with pytest.raises(BenchmarkLoadError, match="split 'validation'"):
        get_benchmark("mme").load(source=HUB / "lmms-lab__MME", split="validation")


def test_hub_loading_uses_lmms_eval_ids_then_legacy(monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    calls = []
    fixture = datasets.load_dataset(str(HUB / "lmms-lab__ScienceQA"), "ScienceQA-IMG", split="test")

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path.startswith("lmms-lab-encoder/"):
            raise DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return fixture

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bench = get_benchmark("scienceqa_img")
    assert len(bench.load()) == 3
    assert calls == [
        ("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"),
        ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test"),
    ]
    assert bench.protocol["loaded"]["source"] == "lmms-lab/ScienceQA"
    calls.clear()
    get_benchmark("scienceqa_img").load(source="lmms-lab/ScienceQA")  # the older id, given explicitly
    assert calls == [("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")]

    def offline(path, name=None, split=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        BenchmarkLoadError, match=r"could not reach 'lmms-lab-encoder/MME'.*--benchmarks mme="
    ):
        get_benchmark("mme").load()


def test_through_the_harness(loaded, tmp_path):
    """Records written as JSONL by ``run_eval`` and read back aggregate to the same metrics."""
    from eval_stubs import StubAnswerer, StubSample

    from vtprune.eval.harness import EvalRun, parse_settings, run_eval
    from vtprune.testing import tiny_llava

    class TruthAnswerer:  # timing and token counts from the stub, ground truth as the answers
        def __init__(self):
            self.stub = StubAnswerer()

        def __call__(self, samples, model, generation_kwargs=None):
            stubs = [StubSample(id=s.id, prompt="", target="", seed=i) for i, s in enumerate(samples)]
            _, stats = self.stub(stubs, model, {"max_new_tokens": 2})
            return [truth(s) for s in samples], stats

    benches = {name: loaded(name) for name in ("mme", "pope", "mmbench_en")}
    run = EvalRun(
        model=tiny_llava(),
        answer=TruthAnswerer(),
        benchmarks=benches,
        settings=parse_settings(["none"]),
        out=tmp_path,
        batch_size=4,
        warmup=0,
    )
    rows = {r["benchmark"]: r for r in run_eval(run, progress=False)}
    assert rows["mme"]["perception"] == 400.0 and rows["mme"]["samples"] == 8
    assert rows["pope"]["f1"] == 1.0 and rows["mmbench_en"]["accuracy"] == 1.0
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["benchmarks"]["mme"]["loaded"]["samples"] == 8


def test_package_layout_and_reentrant_loading():
    """One module per benchmark under vtprune.eval.benchmarks (issue 9); loading keeps no state between rows
    (MME numbered an image's questions in an attribute that ``make_sample`` mutated)."""
    import importlib

    from vtprune.errors import UsageError

    for module in ("base", "vqav2", "textvqa", "gqa", "pope", "mme", "scienceqa", "mmbench", "synthetic"):
        importlib.import_module(f"vtprune.eval.benchmarks.{module}")
    assert B.Benchmark.__module__ == "vtprune.eval.benchmarks.base"
    assert B.MME.__module__ == "vtprune.eval.benchmarks.mme"
    assert all(issubclass(e, UsageError) for e in (SchemaError, BenchmarkLoadError, UnknownBenchmarkError))
    bench = get_benchmark("mme")
    first = bench.load(source=HUB / SOURCES["mme"])
    assert set(vars(bench)) == {"source", "loaded"}  # nothing left from the load itself
    again = bench.load(source=HUB / SOURCES["mme"], limit=3)
    assert [s.id for s in again] == [s.id for s in first[:3]]
    row = {"question_id": "x.jpg", "question": "Is it red? Please answer yes or no.", "answer": "Yes"}
    sample = get_benchmark("mme").make_sample(row | {"category": "color"}, 0, [])  # no load() first
    assert sample.id == "x.jpg#0" and sample.prompt == "Is it red?" + SHORT
    assert get_benchmark("mme").make_sample(row | {"category": "color"}, 1, [], occurrence=1).id == "x.jpg#1"
