"""The shipped toy model and synthetic benchmark: deterministic data, offline loading, accuracy, and pruning
that keeps the right tokens beating pruning that keeps random ones."""

import random

import datasets
import pytest
import torch

import vtprune
from vtprune.toy import TOY_DATASET_DIR, TOY_MODEL_DIR, answer_questions, load_toy_benchmark, load_toy_model
from vtprune.toy.synthetic import generate, make_scene, questions_for, render

SUBSET = 200


@pytest.fixture(scope="module")
def toy():
    model, processor = load_toy_model()
    data = load_toy_benchmark("test").select(range(SUBSET))
    return model, processor, data


def _accuracy(model, processor, data):
    answers = answer_questions(model, processor, data["image"], data["question"])
    return sum(a == t for a, t in zip(answers, data["answer"])) / len(answers)


def test_generator_is_deterministic_and_splits_are_disjoint():
    a = [(s.key(), qa) for s, _, qa in generate("test", 20)]
    b = [(s.key(), qa) for s, _, qa in generate("test", 20)]
    assert a == b
    scene = make_scene(random.Random(3))
    assert render(scene).tobytes() == render(scene).tobytes()
    train = {s.key() for s, _, _ in generate("train", 4000)}
    regenerated = list(generate("test", 160, exclude=train))
    assert not {s.key() for s, _, _ in regenerated} & train
    # The shipped split is exactly what the generator writes.
    shipped = load_toy_benchmark("test")
    expected = [(q, a) for _, _, qas in regenerated for _, q, a in qas]
    assert list(zip(shipped["question"], shipped["answer"])) == expected
    assert shipped[0]["image"].tobytes() == regenerated[0][1].tobytes()


def test_questions_cover_every_type():
    types = {t for _, _, qas in generate("test", 50) for t, _, _ in qas}
    assert types == {"color", "shape", "count", "exists", "position"}
    scene = make_scene(random.Random(0))
    assert all(len(a.split()) == 1 for _, _, a in questions_for(scene, random.Random(0)))


def test_benchmark_folder_loads_like_a_hub_repo():
    ds = datasets.load_dataset(str(TOY_DATASET_DIR), split="test")
    assert ds.column_names == ["question_id", "image", "question", "answer", "question_type"]
    assert isinstance(ds.features["image"], datasets.Image)


def test_model_loads_offline_with_from_pretrained(toy):
    model, processor, _ = toy
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    again = LlavaForConditionalGeneration.from_pretrained(TOY_MODEL_DIR, local_files_only=True)
    assert again.config.vision_config.model_type == "clip_vision_model"
    assert (
        AutoProcessor.from_pretrained(TOY_MODEL_DIR, local_files_only=True).tokenizer.padding_side == "left"
    )
    assert sum(p.numel() for p in model.parameters()) < 5e6


def test_accuracy_with_all_tokens(toy):
    """The shipped model answers from the image: >= 90% on the fixed subset (the issue's target; measured on
    the full test split: 92.9%), and no question type is left near its chance level (position, the weakest
    type, is 78% on the full split; chance is 1/9)."""
    model, processor, data = toy
    answers = answer_questions(model, processor, data["image"], data["question"])
    per_type = {}
    for answer, target, qtype in zip(answers, data["answer"], data["question_type"]):
        per_type.setdefault(qtype, []).append(answer == target)
    overall = sum(map(sum, per_type.values())) / len(answers)
    assert overall >= 0.90
    assert set(per_type) == {"color", "shape", "count", "exists", "position"}
    for qtype, right in per_type.items():
        assert sum(right) / len(right) >= 0.75, qtype


def test_fastervlm_beats_random_at_keep_25_percent(toy):
    model, processor, data = toy
    results = {}
    for method in ("fastervlm", "random"):
        vtprune.wrap(model, method, keep_ratio=0.25)
        try:
            results[method] = _accuracy(model, processor, data)
        finally:
            vtprune.unwrap(model)
    full = _accuracy(model, processor, data)
    assert results["random"] < full
    assert results["fastervlm"] > results["random"]
    torch.testing.assert_close(torch.tensor(full), torch.tensor(_accuracy(model, processor, data)))


def test_dyvte_with_shipped_gates_exits_per_sample_and_beats_static_exit(toy):
    model, processor, data = toy
    assert (TOY_MODEL_DIR / "vtprune_dyvte" / "gates.safetensors").is_file()
    vtprune.wrap(model, "dyvte")  # gates found beside the model
    try:
        exits, answers = [], []
        for start in range(0, len(data), 50):
            part = data.select(range(start, min(start + 50, len(data))))
            answers += answer_questions(model, processor, part["image"], part["question"], batch_size=50)
            exits += [s.exit_layer for s in vtprune.get_pruner(model).last]
        dyvte = sum(a == t for a, t in zip(answers, data["answer"])) / len(answers)
    finally:
        vtprune.unwrap(model)
    assert len(exits) == len(data) and len(set(exits)) > 1  # the decision is per sample
    vtprune.wrap(model, "static_exit", layer=2)
    try:
        static = _accuracy(model, processor, data)
    finally:
        vtprune.unwrap(model)
    assert dyvte > static


def test_shuffled_caption_names_every_cell_once_and_leaves_position_words_unlearned():
    from vtprune.toy.model import build_tokenizer
    from vtprune.toy.synthetic import POSITIONS
    from vtprune.toy.train import CAPTION_QUESTION, _encode_conversation, caption

    scene = make_scene(random.Random(5))
    reading = caption(scene).split()
    assert [reading[3 * k] for k in range(9)] == list(POSITIONS)
    shuffled = caption(scene, random.Random(1)).split()
    assert [shuffled[3 * k] for k in range(9)] != list(POSITIONS)
    triples = {tuple(shuffled[3 * k : 3 * k + 3]) for k in range(9)}
    assert triples == {tuple(reading[3 * k : 3 * k + 3]) for k in range(9)}  # same facts, other order
    for item in scene.items:
        assert (POSITIONS[item.cell], item.color, item.shape) in triples

    tokenizer = build_tokenizer()
    positions = frozenset(tokenizer.convert_tokens_to_ids(list(POSITIONS)))
    ids, labels = _encode_conversation(tokenizer, [(CAPTION_QUESTION, " ".join(shuffled))], 4, positions)
    learned = [t for t in labels if t != -100]
    assert not positions & set(learned)
    assert len(learned) == 2 * 9 + 1  # colour and shape of each cell, then </s>
    assert learned[-1] == tokenizer.eos_token_id


def test_training_command_is_deterministic_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtprune.toy.train import train

    small = dict(images=12, vision_steps=2, vlm_steps=2, batch_size=4, log_every=1000)
    reports = [train(tmp_path / name, **small) for name in ("a", "b")]
    assert reports[0]["caption_order"] == "shuffled"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a", local_files_only=True).eval()
    a = model.state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b", local_files_only=True).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    processor = AutoProcessor.from_pretrained(tmp_path / "a", local_files_only=True)
    _, image, qas = next(generate("test", 1))
    assert len(answer_questions(model, processor, [image], [qas[0][1]])) == 1
    with pytest.raises(ValueError, match="caption_order"):
        train(tmp_path / "c", caption_order="random", **small)
