"""Video frames for the harness: uniform sampling as lmms-eval's ``read_video_pyav`` does it, decoded with PyAV
(``pip install vtprune[video]``), imported only when a video is read.

lmms-eval (``models/model_utils/load_video.py``): ``num = min(total_frames, num_frm)``, indices
``np.linspace(0, total_frames - 1, num, dtype=int)`` over the stream's frame count, frames decoded from the
start and kept where their index is in that set. Containers whose header has no frame count (webm, mkv) are
decoded whole and sampled from the decoded list, as lmms-eval does for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = ["uniform_indices", "read_frames", "VideoFrames"]


def _av():
    try:
        import av
    except ImportError as err:  # an optional dependency: say which extra brings it
        raise UsageError(
            "reading video benchmarks needs PyAV: pip install 'vtprune[video]' (or pip install av)"
        ) from err
    return av


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """lmms-eval's uniform sample: ``min(total, num_frames)`` indices from ``linspace(0, total - 1)``
    truncated to int (so the first and last frames are always in)."""
    if num_frames < 1:
        raise UsageError(f"num_frames must be >= 1, got {num_frames}")
    if total < 1:
        raise UsageError("the video has no frames")
    return np.linspace(0, total - 1, min(total, num_frames), dtype=int).tolist()


def read_frames(path: str | Path, num_frames: int) -> list:
    """``num_frames`` (or all, when fewer) uniformly sampled frames of ``path`` as RGB PIL images."""
    av = _av()
    path = str(path)
    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames
        if total and not path.lower().endswith((".webm", ".mkv")):
            wanted = uniform_indices(total, num_frames)
            keep, frames = set(wanted), []
            for i, frame in enumerate(container.decode(stream)):
                if i > wanted[-1]:
                    break
                if i in keep:
                    frames.append(frame.to_image())
            return frames
        decoded = [frame.to_image() for frame in container.decode(stream)]
    return [decoded[i] for i in uniform_indices(len(decoded), num_frames)]


class VideoFrames(Sequence):
    """The sampled frames of one video as a sequence of RGB images, decoded when iterated (all at once: a
    video decodes from its start) and not kept, so that a benchmark's samples can be held in memory.
    ``len`` reads only the container's header where it has a frame count."""

    __slots__ = ("path", "num_frames", "_count")

    def __init__(self, path: str | Path, num_frames: int):
        self.path, self.num_frames, self._count = Path(path), num_frames, None

    def __len__(self) -> int:
        if self._count is None:
            total = 0
            if not str(self.path).lower().endswith((".webm", ".mkv")):
                with _av().open(str(self.path)) as container:
                    total = container.streams.video[0].frames
            self._count = min(total, self.num_frames) if total else len(list(self))
        return self._count

    def __iter__(self):
        frames = read_frames(self.path, self.num_frames)
        self._count = len(frames)
        return iter(frames)

    def __getitem__(self, k):
        return list(self)[k]

    def __repr__(self) -> str:
        return f"VideoFrames({str(self.path)!r}, num_frames={self.num_frames})"
