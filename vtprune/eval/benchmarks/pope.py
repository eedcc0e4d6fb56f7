"""POPE (lmms-eval ``pope`` data and prompt, LLaVA ``eval_pope.py`` scoring): yes/no F1 per split."""

from __future__ import annotations

from ..metrics import POPE_SPLITS, parse_yes_no, pope_metrics, pope_report
from .base import LMMS_EVAL, SHORT_ANSWER_PROMPT, Benchmark, Sample

__all__ = ["POPE"]


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
            for part in POPE_SPLITS:
                samples += super().load(source, split=part, limit=limit, config=config)
                loaded.append(self.loaded)
            self.loaded = {**loaded[0], "split": list(POPE_SPLITS), "samples": len(samples)}
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
        label = parse_yes_no(prediction)
        return {
            "target": sample.target,
            "category": sample.meta["category"],
            "pred_label": label,
            "score": float(label == sample.target),
        }

    def aggregate(self, records):
        rows = [(r["category"], r["prediction"], r["target"]) for r in records]
        report = pope_report(rows)
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
            "lmms_eval_unparsed": pope_metrics([r[1] for r in rows], [r[2] for r in rows], parse=False),
        }
