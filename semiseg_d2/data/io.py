"""Reading image files: the one image reader of every mapper, and the parallel full-decode scan of a dataset.

Every image semiseg_d2 trains, tests or predicts on is read by :func:`read_image` (mappers, tools/demo.py,
tools/feature_stats.py); labels go through :func:`..label_io.load_sem_seg`, whose decode uses
:func:`decode_errors` too. A file that cannot be decoded (truncated JPEG, zero-byte file, a text file named
``.jpg``, a missing file) raises :class:`UnreadableFileError` naming the file and its dataset, e.g.
``unreadable image '/data/unlabeled/0001TP_006690.jpg' of dataset 'camvid_folders_unlabeled': image file is
truncated``. The error takes its message as its only argument, so PyTorch's DataLoader re-raises it from a worker
process with the same type and message.
"""
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import detection_utils as d2_utils

__all__ = ["UnreadableFileError", "decode_errors", "read_image", "find_unreadable", "default_num_workers"]
logger = logging.getLogger(__name__)


class UnreadableFileError(ValueError):
    """An image or label file that cannot be decoded; the message names the file and the dataset."""


def _where(kind: str, path: str, dataset: Optional[str]) -> str:
    return f"unreadable {kind} '{path}'" + (f" of dataset '{dataset}'" if dataset else "")


@contextmanager
def decode_errors(kind: str, path: str, dataset: Optional[str] = None) -> Iterator[None]:
    """Turn any exception of the block into :class:`UnreadableFileError` naming ``kind`` ("image", "label"),
    ``path`` and ``dataset``; an UnreadableFileError from inside passes unchanged."""
    try:
        yield
    except UnreadableFileError:
        raise
    except Exception as e:  # noqa: BLE001  PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, ...
        reason = str(e) or type(e).__name__
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
        raise UnreadableFileError(f"{_where(kind, path, dataset)}: {reason}") from e


def read_image(path: str, dataset: Optional[str] = None, format: str = "RGB") -> np.ndarray:
    """``uint8[H, W, 3]`` in ``format`` ("RGB" or "BGR"; EXIF orientation applied, as detectron2's read_image),
    fully decoded. Raises :class:`UnreadableFileError` naming ``path`` and ``dataset`` on any failure."""
    with decode_errors("image", path, dataset):
        image = d2_utils.read_image(path, format=format)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise UnreadableFileError(f"{_where('image', path, dataset)}: decoded to shape {image.shape}")
    return image


def _decode_one(job: Tuple[str, str, Optional[str]]) -> Optional[str]:
    """The error message of one ``(kind, path, dataset)`` full decode, None when the file decodes."""
    from .label_io import load_sem_seg

    kind, path, dataset = job
    try:
        if kind == "image":
            read_image(path, dataset)
        else:
            load_sem_seg(path, dataset)
    except (UnreadableFileError, ValueError, OSError) as e:
        return str(e)
    return None


def find_unreadable(
    jobs: Sequence[Tuple[str, str, Optional[str]]],
    num_workers: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> List[Tuple[str, str]]:
    """Fully decode every ``(kind, path, dataset)`` of ``jobs`` (kind "image" or "label"; labels are also checked
    against the dataset's classes) on ``num_workers`` processes (0: this process); ``progress(n)`` is called as
    files finish. Returns ``[(path, message)]`` of every file that fails, in ``jobs`` order."""
    jobs = list(jobs)
    if num_workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            results = []
            for message in pool.map(_decode_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * num_workers)))):
                results.append(message)
                if progress is not None:
                    progress(1)
    else:
        results = []
        for job in jobs:
            results.append(_decode_one(job))
            if progress is not None:
                progress(1)
    return [(path, message) for (_, path, _), message in zip(jobs, results) if message is not None]


def default_num_workers() -> int:
    """Processes for a decode scan: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
