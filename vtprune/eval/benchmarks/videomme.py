"""Video-MME (lmms-eval ``videomme``, without subtitles): four-option questions on videos, frames sampled
uniformly (:mod:`vtprune.eval.video`), the option letter read as lmms-eval's ``extract_characters_regex``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .base import LMMS_EVAL, Benchmark, BenchmarkLoadError, Sample, _mean, _mean_by

__all__ = ["VideoMME", "VIDEOMME_OPTION_PROMPT", "VIDEOMME_POST_PROMPT", "extract_option_letter"]

# lmms-eval tasks/videomme/utils.py videomme_doc_to_text, and videomme.yaml's default post_prompt
VIDEOMME_OPTION_PROMPT = (
    "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
    "Respond with only the letter (A, B, C, or D) of the correct option."
)
VIDEOMME_POST_PROMPT = "\nAnswer the question with A, B, C, or D."
# lmms-eval's list, including its two pairs joined by missing commas (so those four prefixes are not removed
# on their own): kept as is, the scores match lmms-eval's.
_ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",  # noqa: ISC001
    "Best answer:Best option:",  # noqa: ISC001
)
_VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")  # tried in this order, as lmms-eval's videomme_doc_to_visual


def extract_option_letter(text: str) -> str:
    """The first of A-D in ``text`` after removing the answer prefixes; ``""`` when there is none, or when a
    reply of more than 10 words holds none (lmms-eval ``extract_characters_regex``)."""
    s = text.strip()
    for prefix in _ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return match[0] if match else ""


def _lmms_eval_cache() -> Path:
    """Where lmms-eval unpacks Video-MME's video zips: ``$HF_HOME/videomme`` (its ``cache_dir``)."""
    return Path(os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface/"))) / "videomme"


class VideoMME(Benchmark):
    """Video-MME test (2,700 questions on 900 videos), frames only (no subtitles): lmms-eval ``videomme``.

    The videos are not in the parquet: they are ``<root>/data/<videoID>.mp4`` (``.MP4``, ``.mkv``), with
    ``root`` the local mirror folder when one is given, else lmms-eval's cache ``$HF_HOME/videomme``, or
    ``video_dir``. Each sample's images are ``num_frames`` frames sampled uniformly (lmms-eval's
    ``read_video_pyav``), given to the model as one image each: a model that takes ``videos=`` inputs
    (Qwen-VL) gets them as images here."""

    name = "videomme"
    description = "Video-MME (frames, no subtitles): 4-option video QA, accuracy"
    hub_ids = ("lmms-lab/Video-MME",)
    config = "videomme"
    split = "test"
    columns = ("videoID", "question_id", "duration", "domain", "sub_category", "task_type", "question",
               "options", "answer")  # fmt: skip
    prompt_template = (
        VIDEOMME_OPTION_PROMPT + "\\n{question}\\n{options, one per line}\\n" + VIDEOMME_POST_PROMPT
    )
    generation_kwargs = {"max_new_tokens": 16, "do_sample": False}
    metric = "accuracy: the option letter read as lmms-eval extract_characters_regex equals the answer"
    main_metric = "accuracy"
    reference = (
        f"{LMMS_EVAL} tasks/videomme (videomme.yaml, utils.videomme_doc_to_text / process_results); frames: "
        "models/model_utils/load_video.read_video_pyav"
    )

    def __init__(self, num_frames: int = 32, video_dir: str | Path | None = None):
        super().__init__()
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise BenchmarkLoadError(
                f"benchmark 'videomme': num_frames must be an int >= 1, got {num_frames!r}"
            )
        self.num_frames = num_frames
        self.video_dir = None if video_dir is None else Path(video_dir)
        self._video_root: Path | None = None

    @property
    def protocol(self) -> dict:
        return {**super().protocol, "num_frames": self.num_frames, "frame_sampling": "uniform (lmms-eval)"}

    def _open(self, source, config, split):
        ds, origin = super()._open(source, config, split)
        if self.video_dir is not None:
            self._video_root = self.video_dir
        elif Path(origin).is_dir():
            self._video_root = Path(origin) / "data"
        else:
            self._video_root = _lmms_eval_cache() / "data"
        return ds, origin

    def _video(self, video_id: str) -> Path:
        for suffix in _VIDEO_SUFFIXES:
            path = self._video_root / f"{video_id}{suffix}"
            if path.is_file():
                return path
        raise BenchmarkLoadError(
            f"benchmark 'videomme': no video {video_id!r} ({'/'.join(_VIDEO_SUFFIXES)}) in {self._video_root}; "
            "unpack the dataset's videos_chunked_*.zip there (lmms-eval's layout) or pass the folder as video_dir"
        )

    def make_sample(self, row, index, images):
        from ..video import VideoFrames

        question = row["question"] + "\n" + "\n".join(row["options"])
        return Sample(
            id=str(row["question_id"]),
            images=VideoFrames(self._video(row["videoID"]), self.num_frames),
            prompt=VIDEOMME_OPTION_PROMPT + "\n" + question + "\n" + VIDEOMME_POST_PROMPT,
            target=row["answer"],
            meta={k: row[k] for k in ("videoID", "duration", "domain", "sub_category", "task_type")},
        )

    def score_sample(self, sample, prediction):
        letter = extract_option_letter(prediction)
        return {
            "target": sample.target,
            "pred_letter": letter,
            **sample.meta,
            "score": float(letter.lower() == str(sample.target).lower()),
        }

    def aggregate(self, records):
        return {
            "accuracy": _mean(r["score"] for r in records),
            "by_duration": _mean_by(records, "duration"),
            "by_domain": _mean_by(records, "domain"),
            "by_task_type": _mean_by(records, "task_type"),
        }
