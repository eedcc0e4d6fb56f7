"""vtprune's shipped synthetic video QA (the video toy's benchmark): clips of 4 frames fed as one image per
frame, questions about what changes, first-word exact match."""

from __future__ import annotations

from pathlib import Path

from .base import BenchmarkLoadError
from .synthetic import Synthetic

__all__ = ["SyntheticVideo", "SYNTHETIC_VIDEO_DIR"]

SYNTHETIC_VIDEO_DIR = Path(__file__).resolve().parents[2] / "toy" / "assets" / "synthetic_video_qa"


class SyntheticVideo(Synthetic):
    """vtprune's shipped synthetic video QA: each sample's images are its clip's frames in order (the frame
    columns ``frame_0`` .. ``frame_3``), the question as-is, first-word exact match."""

    name = "synthetic_video"
    description = (
        "vtprune's synthetic shapes video QA: 4-frame clips, one image per frame (test split shipped in "
        "vtprune/toy/assets/synthetic_video_qa)"
    )
    columns = (
        "question_id",
        "frame_0",
        "frame_1",
        "frame_2",
        "frame_3",
        "question",
        "answer",
        "question_type",
    )
    reference = "vtprune.toy.synthetic_video (normalize_answer); answers are single words"

    def _default_sources(self):
        if not (SYNTHETIC_VIDEO_DIR / "README.md").is_file():
            raise BenchmarkLoadError(
                f"benchmark 'synthetic_video': no data at {SYNTHETIC_VIDEO_DIR}; generate it with "
                f"`python -m vtprune.toy.synthetic_video --out {SYNTHETIC_VIDEO_DIR}`"
            )
        return (str(SYNTHETIC_VIDEO_DIR),)

    def make_sample(self, row, index, images):
        if len(images) != len(self.columns) - 4:  # a null frame would silently shorten the clip
            raise BenchmarkLoadError(
                f"benchmark 'synthetic_video': row {row['question_id']!r} has {len(images)} frames, expected 4"
            )
        return super().make_sample(row, index, images)
