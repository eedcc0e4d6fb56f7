"""Benchmark metrics as pure functions, each reproducing a named reference implementation.

The reference for every function is the evaluation code that the LLaVA papers and lmms-eval 0.7.x use, so
that a score computed here can be compared with published numbers:

- VQAv2: :func:`vqa_accuracy` (``style="vqav2"``), the official VQA evaluation (``vqaEval.py`` answer
  normalisation; accuracy averaged over the 10 leave-one-out subsets of min(1, #matches / 3)) exactly as
  lmms-eval's ``vqav2_process_results`` applies it.
- TextVQA: :func:`vqa_accuracy` (``style="textvqa"``), the EvalAI answer processor on both sides, as lmms-eval
  ``textvqa_process_results`` and LLaVA's ``m4c_evaluator.TextVQAAccuracyEvaluator``.
- GQA and the synthetic benchmark: :func:`exact_match` (lmms-eval ``exact_match`` with ``ignore_case`` and
  ``ignore_punctuation``), :func:`gqa_llava_match` (LLaVA ``convert_gqa_for_submission.py`` + the GQA
  ``eval.py`` comparison), :func:`first_word_match` (the toy benchmark's ``normalize_answer``).
- POPE: :func:`parse_yes_no` (LLaVA ``eval_pope.py``), :func:`pope_metrics`, :func:`pope_report`.
- MME: :func:`parse_mme_answer`, :func:`mme_scores` (lmms-eval ``mme`` utils, after the official MME
  ``calculation.py``).
- ScienceQA-IMG: :func:`scienceqa_option` / :func:`scienceqa_correct` (lmms-eval ``sqa_process_results``).
- MMBench: :func:`mmbench_extract` (VLMEvalKit's ``can_infer`` prefetch, then lmms-eval's
  ``extract_mcq_answer``: lmms-eval's offline ``mmbench_en_dev_static`` evaluation, no GPT judge) and
  :func:`circular_eval` (CircularEval: a question counts only if all its circular shifts are right).

``tests/test_metrics.py::test_parity_with_lmms_eval_*`` checks equality with lmms-eval's own code when it is
installed. Accuracies are fractions in [0, 1]; MME scores are in MME's points (at most 2000 / 800).
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "vqa_process_punctuation",
    "vqa_process_digit_article",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "normalize_exact",
    "exact_match",
    "gqa_llava_match",
    "first_word",
    "first_word_match",
    "parse_yes_no",
    "pope_metrics",
    "pope_report",
    "POPE_SPLITS",
    "MME_PERCEPTION",
    "MME_COGNITION",
    "parse_mme_answer",
    "mme_correct",
    "mme_scores",
    "OPTION_LETTERS",
    "scienceqa_option",
    "scienceqa_correct",
    "mmbench_choices",
    "mmbench_can_infer_option",
    "mmbench_can_infer_text",
    "extract_mcq_answer",
    "mmbench_extract",
    "circular_eval",
    "CIRCULAR_OFFSET",
]

# ------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (official VQA evaluation / EvalAI answer processor)
# ------------------------------------------------------------------------------------------------------------

# The official evaluation's contraction table, entry for entry (including its oddities such as
# "somebody'd" -> "somebodyd" and keys with capitals, which never match after lower-casing).
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've
it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've
oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll
thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's
theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all
yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
"""
_CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")  # fmt: skip
# As written upstream: "(?!<=\d)" is a (vacuous) look-ahead, so this removes every "." not before a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_process_punctuation(text: str) -> str:
    """``processPunctuation`` of the official VQA evaluation: each punctuation mark is deleted when it
    touches a space somewhere in the text (or when the text has a comma between digits), otherwise replaced
    by a space; then periods not followed by a digit are removed (at most 32 of them: upstream passes
    ``re.UNICODE`` where ``re.sub`` takes its ``count``)."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        if digit_comma or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def vqa_process_digit_article(text: str) -> str:
    """``processDigitArticle`` of the official VQA evaluation: lower-case, number words zero..ten to digits
    ("none" -> "0"), drop the articles a/an/the, then map contractions written without apostrophe."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer processor (``EvalAIAnswerProcessor.__call__`` in LLaVA's ``m4c_evaluator`` and in
    lmms-eval): lower-case, drop "," and "?", split off "'s", whitespace to spaces, then punctuation and
    digit/article processing."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _vqav2_normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, style: str = "vqav2") -> float:
    """VQA accuracy of one prediction against the (usually 10) human answers.

    Averaged over the leave-one-out subsets of the answers: for each answer left out, ``min(1, n / 3)`` where
    ``n`` counts the remaining answers equal to the prediction after normalisation.

    ``style="vqav2"``: prediction and answers get ``processPunctuation`` + ``processDigitArticle`` after
    whitespace cleanup, as lmms-eval ``vqav2_process_results`` does. The official ``vqaEval.py`` processes the
    prediction the same way and the answers only with ``processPunctuation`` (and only when they disagree);
    on the VQAv2 annotations, which are already normalised, the two coincide.

    ``style="textvqa"``: the full EvalAI processor (:func:`normalize_vqa_answer`) on both sides, as lmms-eval
    ``textvqa_process_results`` and LLaVA's TextVQA evaluator do.

    No answers (test splits) gives 0.0, as in lmms-eval.
    """
    if style == "vqav2":
        norm = _vqav2_normalize
    elif style == "textvqa":
        norm = normalize_vqa_answer
    else:
        raise ValueError(f"unknown VQA accuracy style {style!r}: expected 'vqav2' or 'textvqa'")
    if not answers:
        return 0.0
    gts = [norm(a) for a in answers]
    pred = norm(prediction)
    accs = []
    for left_out in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != left_out and gt == pred)
        accs.append(min(1, float(matches) / 3))
    return statistics.mean(accs)


# ------------------------------------------------------------------------------------------------------------
# Exact match
# ------------------------------------------------------------------------------------------------------------

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """Lower-case and delete ASCII punctuation (lmms-eval ``exact_match`` with ``ignore_case=True,
    ignore_punctuation=True``)."""
    return text.lower().translate(_PUNCTUATION_TABLE)


def exact_match(prediction: str, target: str) -> float:
    """lmms-eval's ``exact_match`` as configured for GQA (``ignore_case``, ``ignore_punctuation``): the
    generation is stripped, then both sides are lower-cased and cleared of ``string.punctuation``."""
    return float(normalize_exact(prediction.strip()) == normalize_exact(target))


def gqa_llava_match(prediction: str, target: str) -> float:
    """LLaVA's GQA protocol: ``convert_gqa_for_submission.py`` submits ``text.rstrip('.').lower()`` and the
    official GQA ``eval.py`` compares it with the answer verbatim."""
    return float(prediction.strip().rstrip(".").lower() == target)


def first_word(text: str) -> str:
    """The first word, lower-cased, without surrounding ``.,!?;:`` (``vtprune.toy.normalize_answer``)."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


def first_word_match(prediction: str, target: str) -> float:
    """Exact match of :func:`first_word` of the prediction with the (single-word) answer: the synthetic
    benchmark's metric, the same rule ``vtprune demo`` scores with."""
    return float(first_word(prediction) == target.strip().lower())


# ------------------------------------------------------------------------------------------------------------
# POPE
# ------------------------------------------------------------------------------------------------------------

POPE_SPLITS = ("adversarial", "popular", "random")


def parse_yes_no(text: str) -> str:
    """LLaVA ``eval_pope.py``: keep the first sentence, drop commas, split on spaces; "no" if one of the words
    is ``No``, ``no`` or ``not``, else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], targets: Sequence[str], *, parse: bool = True) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no predictions ("yes" is the positive class).

    ``parse=True`` (default): predictions go through :func:`parse_yes_no`, as in LLaVA's ``eval_pope.py``.
    ``parse=False``: lmms-eval's ``pope`` aggregation: the prediction is only lower-cased and stripped, so an
    answer other than exactly "yes"/"no" is wrong and neither a positive nor a negative.

    ``yes_ratio`` is the fraction of predicted "yes" (the POPE paper's and LLaVA's "yes ratio");
    ``gt_yes_ratio`` is the fraction of "yes" answers, which is what lmms-eval reports as ``pope_yes_ratio``.
    Also returns the confusion counts ``tp, fp, tn, fn`` and ``n``. Division by zero gives 0, as upstream.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    preds = [parse_yes_no(p) if parse else p.lower().strip() for p in predictions]
    gts = [t.lower().strip() for t in targets]
    bad = sorted({g for g in gts if g not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE answers must be yes/no, got {bad}")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))
    n = len(gts)
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / (tp + fn) if tp + fn > 0 else 0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0
    return {
        "accuracy": sum(p == g for p, g in zip(preds, gts)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
        "gt_yes_ratio": sum(g == "yes" for g in gts) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def pope_report(rows: Iterable[tuple[str, str, str]], *, parse: bool = True) -> dict:
    """POPE per split and overall from ``(category, prediction, target)`` rows.

    Returns ``{"splits": {category: pope_metrics}, "f1_avg": mean F1 over the splits present (the number
    the LLaVA-1.5 paper reports for POPE), "accuracy_avg": mean accuracy over the splits, "pooled":
    pope_metrics of all rows together}``. Splits are ordered adversarial, popular, random, then others.
    """
    by_split: dict[str, tuple[list, list]] = {}
    preds_all, gts_all = [], []
    for category, pred, gt in rows:
        bucket = by_split.setdefault(category, ([], []))
        bucket[0].append(pred)
        bucket[1].append(gt)
        preds_all.append(pred)
        gts_all.append(gt)
    order = [s for s in POPE_SPLITS if s in by_split] + sorted(s for s in by_split if s not in POPE_SPLITS)
    splits = {s: pope_metrics(*by_split[s], parse=parse) for s in order}
    return {
        "splits": splits,
        "f1_avg": statistics.fmean(m["f1"] for m in splits.values()) if splits else 0.0,
        "accuracy_avg": statistics.fmean(m["accuracy"] for m in splits.values()) if splits else 0.0,
        "pooled": pope_metrics(preds_all, gts_all, parse=parse),
    }


# ------------------------------------------------------------------------------------------------------------
# MME
# ------------------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """lmms-eval ``mme`` ``parse_pred_ans`` (from Otter's MME evaluation, after the official
    ``calculation.py``): lower-case, strip, drop periods; exactly yes/no, or y/n, or else "yes"/"no" found in
    the first 4 characters (yes first); otherwise "other"."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_correct(prediction: str, answer: str) -> float:
    """1.0 when :func:`parse_mme_answer` equals the answer (lower-cased, stripped, periods removed)."""
    return float(parse_mme_answer(prediction) == answer.lower().strip().replace(".", ""))


def mme_scores(items: Iterable[tuple[str, str, float]]) -> dict:
    """MME scores from ``(category, image_id, correct)`` items (``image_id`` is MME's ``question_id``,
    shared by the two questions of an image).

    Per subtask: ``acc`` (mean over images of the fraction of its questions right), ``acc_plus`` (fraction
    of images whose two questions are both right) and ``score = 100 * (acc + acc_plus)``, computed image by
    image as lmms-eval's ``mme_aggregate_results``. ``perception`` / ``cognition`` sum the scores of the
    perception / cognition subtasks present (at most 2000 / 800 with all 10 / 4 subtasks); ``total`` is
    their sum. An image with other than two questions (a ``--limit`` cut) never counts for acc+ and is
    counted in ``incomplete_images``; lmms-eval refuses such input.
    """
    by_cat: dict[str, dict[str, list[float]]] = {}
    for category, image_id, correct in items:
        by_cat.setdefault(category, {}).setdefault(image_id, []).append(float(correct))
    subtasks = {}
    for category, images in by_cat.items():
        total = 0.0
        accs, plus, incomplete = [], 0, 0
        for scores in images.values():
            acc = sum(scores) / len(scores) * 100.0
            both = len(scores) == 2 and sum(scores) == 2
            incomplete += len(scores) != 2
            total += both * 100.0 + acc
            accs.append(acc / 100.0)
            plus += both
        subtasks[category] = {
            "score": total / len(images),
            "acc": statistics.fmean(accs),
            "acc_plus": plus / len(images),
            "images": len(images),
            "incomplete_images": incomplete,
        }
    perception = sum(s["score"] for c, s in subtasks.items() if c in MME_PERCEPTION)
    cognition = sum(s["score"] for c, s in subtasks.items() if c in MME_COGNITION)
    return {
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "subtasks": subtasks,
    }


# ------------------------------------------------------------------------------------------------------------
# Multiple choice: ScienceQA-IMG and MMBench
# ------------------------------------------------------------------------------------------------------------

OPTION_LETTERS = string.ascii_uppercase
CIRCULAR_OFFSET = 1_000_000  # MMBench: circular variants of question i have index i + k * 1e6


def scienceqa_option(prediction: str, num_choices: int) -> str | None:
    """The option letter lmms-eval's ``sqa_process_results`` (after LLaVA) reads from a generation: the whole
    stripped answer is one letter (any case), or it starts with an upper-case letter followed by ".";
    ``None`` otherwise or when the letter is not one of the ``num_choices`` options."""
    pred = prediction.strip()
    letters = OPTION_LETTERS[:num_choices]
    if len(pred) == 1:
        letter = pred.upper()
        return letter if letter.lower() == pred.lower() and letter in letters else None
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0] if pred[0] in letters else None
    return None


def scienceqa_correct(prediction: str, answer_index: int, num_choices: int) -> float:
    """1.0 when :func:`scienceqa_option` gives the letter of ``answer_index``."""
    return float(scienceqa_option(prediction, num_choices) == OPTION_LETTERS[answer_index])


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def mmbench_choices(row: Mapping) -> dict[str, str]:
    """``{letter: option}`` for the options A-D that a row has (``None``/NaN are absent), as lmms-eval's
    ``MMBench_Evaluator.build_choices``."""
    return {ch: row[ch] for ch in "ABCD" if ch in row and not _is_missing(row[ch])}


def mmbench_can_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """VLMEvalKit / lmms-eval ``can_infer_option``: a letter among the first ``num_choice`` that stands
    alone as a word (unless an "A" might be an article in a longer answer), or appears exactly once in one of
    the forms ``X. X, X: X) X). (X) (X). :X :X, :X. :X) :X).``."""
    if "Failed to obtain answer via API" in answer:
        return None
    letters = OPTION_LETTERS[:num_choice]
    words = [w.strip() for w in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + ch + suffix in words for ch in letters)

    if count() == 1 and not ("A" in words and len(words) > 3):
        for ch in letters:
            if ch in words:
                return ch
    forms = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
             (":", ","), (":", "."), (":", ")"), (":", ").")]  # fmt: skip
    for prefix, suffix in forms:
        if count(prefix, suffix) == 1:
            for ch in letters:
                if prefix + ch + suffix in words:
                    return ch
    return None


def mmbench_can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit / lmms-eval ``can_infer_text``: the one option whose text (lower-cased) is in the answer."""
    answer = answer.lower()
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
_MCQ_FORMS = (("parentheses", "({})", 6), ("period", "{}.", 5), ("colon", "{}:", 4),
              ("right_paren", "{})", 3), ("space", "{} ", 2))  # fmt: skip


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """lmms-eval ``_task_utils.mcq_extract.extract_mcq_answer``: collect the choice letters found in formats
    of decreasing confidence (standalone at the start 10, at the end 9, after an answer phrase 7, ``(X)`` 6,
    ``X.`` 5, ``X:`` 4, ``X)`` 3, ``X `` 2, anywhere 0 as a last resort) and return the highest-ranked one,
    the later occurrence winning ties; ``""`` when none is found. ``choices`` defaults to A-H."""
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list("ABCDEFGH")
    text = response.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for _, form, priority in _MCQ_FORMS:
        for ch in letters:
            token = form.format(ch)
            if token in text:
                found.append((priority, text.rfind(token), ch))
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for ch in letters:
                pos = text.find(ch, at + len(phrase))
                if pos != -1:
                    found.append((7, pos, ch))
    core = text.strip()
    for ch in letters:
        if core.startswith(ch) and (len(core) == 1 or not core[1].isalpha()):
            found.append((10, 0, ch))
    for ch in letters:
        if core.endswith(ch) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((9, len(text) - 1, ch))
    if not found:
        found = [(0, text.rfind(ch), ch) for ch in letters if ch in text]
    if not found:
        return ""
    return max(found, key=lambda c: (c[0], c[1]))[2]


def mmbench_extract(prediction: str, choices: Mapping[str, str]) -> str | None:
    """The option an MMBench prediction picks without a GPT judge, as lmms-eval's static evaluation
    (``mmbench_en_dev_static``): ``can_infer`` (:func:`mmbench_can_infer_option`, then
    :func:`mmbench_can_infer_text`), else :func:`extract_mcq_answer` over the row's option letters;
    ``None`` when nothing is found."""
    prediction = str(prediction).strip()
    letter = mmbench_can_infer_option(prediction) or mmbench_can_infer_text(prediction, choices)
    if letter:
        return letter
    return extract_mcq_answer(prediction, choices=sorted(choices)) or None


def circular_eval(rows: Iterable[tuple[int, bool]]) -> dict:
    """MMBench CircularEval from ``(index, correct)`` rows.

    Rows whose index differ by a multiple of 1e6 are circular shifts of one question (index < 1e6 is the
    original). A question counts as right only when all its rows are right; questions whose original row is
    absent are ignored, as in lmms-eval's ``eval_result``. Returns ``{"accuracy": fraction of questions right,
    "questions": number of questions, "hits": {question index: 0/1}}``.
    """
    groups: dict[int, list[bool]] = {}
    mains = set()
    for index, correct in rows:
        index = int(index)
        groups.setdefault(index % CIRCULAR_OFFSET, []).append(bool(correct))
        if index < CIRCULAR_OFFSET:
            mains.add(index)
    hits = {i: int(all(groups[i])) for i in sorted(mains)}
    return {"accuracy": sum(hits.values()) / len(hits) if hits else 0.0, "questions": len(hits), "hits": hits}
