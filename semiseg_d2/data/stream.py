"""Resumable, worker-count-independent training streams.

Batch ``b`` of rank ``r`` is a pure function of ``(seed, b, r)``: which samples it holds (a seeded
permutation per epoch) and every random number the mapper draws (the global ``random`` / ``numpy`` / ``torch`` generators are seeded per sample).
So a run resumed at iteration ``N`` sees exactly the batches an uninterrupted run sees, with any
number of loader workers, and nothing needs to be stored in the checkpoint but the iteration.

Unreadable files (``DATALOADER.UNREADABLE_UNLABELED "skip"``, set on the unlabeled stream only): a sample whose
image cannot be decoded (:class:`.io.UnreadableFileError`) is replaced by replacement draw ``a = 1, 2, ...`` of
its position, a uniform sample of the stream's dataset seeded by ``(seed, pos, a)`` and mapped under a seed of
``(seed, pos, a)``: a pure function of the position again, so skipping keeps resume exact. The replacement
carries the skipped ``(file, message)`` pairs under ``"unreadable"``; :class:`StreamLoader` (main process)
removes them, logs each file once, counts distinct files and stops past ``max_unreadable``.
"""
import copy
import hashlib
import logging
import random
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .io import UnreadableFileError

logger = logging.getLogger(__name__)
UNREADABLE_KEY = "unreadable"  # key of a replacement sample: the skipped [(file_name, message)]
MAX_REPLACEMENT_DRAWS = 20  # a position whose draws are all unreadable stops the run (the data set is mostly broken)


def _mix_seed(*values: int) -> int:
    digest = hashlib.blake2b(",".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


@contextmanager
def seeded_global_rng(seed: int):
    """Seed python/numpy/torch(CPU) RNGs for the block and restore their previous states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededBatchStream(IterableDataset):
    """An infinite stream of mapped batches (lists of dicts) for one rank.

    dataset: the dataset dicts; epochs are seeded permutations (every sample once per epoch, re-sampled forever).
    Several labeled sources are several streams, composed batch by batch (data/build.py).
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        mapper: Callable[[dict], dict],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        max_unreadable: Optional[int] = None,
    ):
        """``max_unreadable``: None = an unreadable file is an error; an int = skip unreadable files (replaced
        deterministically, see the module docstring) and stop once more than this many distinct files were bad."""
        if batch_size <= 0:
            raise ValueError(f"batch size per rank must be positive, got {batch_size}")
        self.dataset = list(dataset)
        if not self.dataset:
            raise ValueError("training stream: the dataset is empty")
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start_batch = 0
        self.max_unreadable = max_unreadable
        self._perm_cache = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng(_mix_seed(self.seed, epoch, 17)).permutation(
                len(self.dataset))}
        return self._perm_cache[epoch]

    def position(self, batch: int, j: int) -> int:
        """Global sample position of item ``j`` of batch ``batch`` on this rank."""
        return (batch * self.world_size + self.rank) * self.batch_size + j

    def record(self, pos: int, draw: int = 0) -> dict:
        """The dataset dict at stream position ``pos`` (before mapping); ``draw > 0``: the replacement draw
        ``draw`` of that position (a seeded uniform sample of the dataset)."""
        n = len(self.dataset)
        if draw == 0:
            return self.dataset[int(self._permutation(pos // n)[pos % n])]
        rng = np.random.default_rng(_mix_seed(self.seed, pos, draw, 31))
        return self.dataset[int(rng.integers(n))]

    def _map(self, pos: int, draw: int) -> dict:
        seed = _mix_seed(self.seed, pos, 43) if draw == 0 else _mix_seed(self.seed, pos, draw, 47)
        with seeded_global_rng(seed):
            return self.mapper(copy.deepcopy(self.record(pos, draw)))

    def sample(self, pos: int) -> dict:
        """The mapped sample at ``pos``; unreadable ones are replaced when ``max_unreadable`` is set."""
        if self.max_unreadable is None:
            return self._map(pos, 0)
        skipped = []
        for draw in range(MAX_REPLACEMENT_DRAWS + 1):
            try:
                out = self._map(pos, draw)
            except UnreadableFileError as e:
                skipped.append((self.record(pos, draw)["file_name"], str(e)))
                continue
            if skipped:
                out[UNREADABLE_KEY] = skipped
            return out
        raise UnreadableFileError(
            f"stream position {pos}: the sample and its {MAX_REPLACEMENT_DRAWS} replacement draws are all unreadable: "
            + "; ".join(sorted({m for _, m in skipped}))
        )

    def batches(self, start: int, step: int = 1):
        b = start
        while True:
            yield [self.sample(self.position(b, j)) for j in range(self.batch_size)]
            b += step

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(self.start_batch + wid, nw)


def _keep_list(batch):
    return batch


class StreamLoader:
    """Iterates one or more :class:`SeededBatchStream` in lock-step (a DataLoader each).

    Yields a batch (one stream) or a tuple of batches (several: e.g. labeled and unlabeled).
    ``set_start(iteration)`` before iterating resumes at that batch. ``unreadable`` maps each file skipped so far
    by a stream with ``max_unreadable`` to its error message (part of the trainer checkpoint, so a resumed run
    keeps counting); ``skips_unreadable`` tells whether any stream skips.
    """

    def __init__(self, streams: Sequence[SeededBatchStream], num_workers: int = 0):
        self.streams = list(streams)
        self.num_workers = num_workers
        self.unreadable = {}

    @property
    def skips_unreadable(self) -> bool:
        return any(s.max_unreadable is not None for s in self.streams)

    def set_start(self, batch: int) -> None:
        for s in self.streams:
            s.start_batch = int(batch)

    def _note_unreadable(self, stream: SeededBatchStream, batch: List[dict]) -> None:
        """Take the skipped files out of ``batch``; log each new one; stop past ``stream.max_unreadable``."""
        for sample in batch:
            for path, message in sample.pop(UNREADABLE_KEY, ()):
                if path in self.unreadable:
                    continue
                self.unreadable[path] = message
                logger.warning("skipping %s (replaced by another sample of the same stream; %d unreadable file(s) so "
                               "far, at most %d allowed)", message, len(self.unreadable), stream.max_unreadable)
        if len(self.unreadable) > stream.max_unreadable:
            raise UnreadableFileError(
                f"{len(self.unreadable)} unreadable unlabeled file(s), more than the {stream.max_unreadable} that "
                "DATALOADER.MAX_UNREADABLE allows: " + "; ".join(sorted(self.unreadable.values()))
            )

    def __iter__(self):
        loaders = [
            DataLoader(
                s,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_keep_list,
                worker_init_fn=None,
                persistent_workers=False,
                pin_memory=False,
                # A private generator: creating the iterator must not draw from the global torch RNG,
                # or a resumed run (which creates it later) would shift every random number after it.
                generator=torch.Generator().manual_seed(s.seed),
            )
            for s in self.streams
        ]
        iters = [iter(dl) for dl in loaders]
        while True:
            batches = [next(it) for it in iters]
            for stream, batch in zip(self.streams, batches):
                if stream.max_unreadable is not None:
                    self._note_unreadable(stream, batch)
            yield batches[0] if len(batches) == 1 else tuple(batches)
