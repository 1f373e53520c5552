"""Resumable, worker-count-independent training streams.

Batch ``b`` of rank ``r`` is a pure function of ``(seed, b, r)``: which samples it holds (a seeded
permutation per epoch, or seeded sampling of several weighted sources) and every random number the
mapper draws (the global ``random`` / ``numpy`` / ``torch`` generators are seeded per sample).
So a run resumed at iteration ``N`` sees exactly the batches an uninterrupted run sees, with any
number of loader workers, and nothing needs to be stored in the checkpoint but the iteration.
"""
import copy
import hashlib
import random
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


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

    sources: one or more lists of dataset dicts. With one source, epochs are seeded permutations
    (every sample once per epoch, re-sampled forever). With several, each sample position draws its
    source with probability ``weights`` and a uniform sample of that source (with replacement).
    """

    def __init__(
        self,
        sources: Sequence[List[dict]],
        mapper: Callable[[dict], dict],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Optional[Sequence[float]] = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch size per rank must be positive, got {batch_size}")
        self.sources = [list(s) for s in sources]
        for i, s in enumerate(self.sources):
            if not s:
                raise ValueError(f"training source #{i} is empty")
        if weights is not None and len(weights) != len(self.sources):
            raise ValueError(f"{len(weights)} sampling weights for {len(self.sources)} sources")
        w = np.asarray(weights if weights is not None else [len(s) for s in self.sources], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"sampling weights must be non-negative with a positive sum, got {list(w)}")
        self.cum_weights = np.cumsum(w / w.sum())
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start_batch = 0
        self._perm_cache = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng(_mix_seed(self.seed, epoch, 17)).permutation(
                len(self.sources[0]))}
        return self._perm_cache[epoch]

    def position(self, batch: int, j: int) -> int:
        """Global sample position of item ``j`` of batch ``batch`` on this rank."""
        return (batch * self.world_size + self.rank) * self.batch_size + j

    def record(self, pos: int) -> dict:
        """The dataset dict at stream position ``pos`` (before mapping)."""
        if len(self.sources) == 1:
            n = len(self.sources[0])
            return self.sources[0][int(self._permutation(pos // n)[pos % n])]
        rng = np.random.default_rng(_mix_seed(self.seed, pos, 29))
        src = int(np.searchsorted(self.cum_weights, rng.random(), side="right"))
        src = min(src, len(self.sources) - 1)
        return self.sources[src][int(rng.integers(len(self.sources[src])))]

    def sample(self, pos: int) -> dict:
        with seeded_global_rng(_mix_seed(self.seed, pos, 43)):
            return self.mapper(copy.deepcopy(self.record(pos)))

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
    ``set_start(iteration)`` before iterating resumes at that batch.
    """

    def __init__(self, streams: Sequence[SeededBatchStream], num_workers: int = 0):
        self.streams = list(streams)
        self.num_workers = num_workers

    def set_start(self, batch: int) -> None:
        for s in self.streams:
            s.start_batch = int(batch)

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
            yield batches[0] if len(batches) == 1 else tuple(batches)
