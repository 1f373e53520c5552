"""Data loaders: supervised train, semi-supervised (labeled + unlabeled pairs) train, and test.

``build_semi_train_loader(cfg)`` yields ``(labeled: list[dict], unlabeled: list[dict])`` forever:
- labeled from ``DATASETS.TRAIN_LABELED`` (``DATASETS.TRAIN`` when that is empty), mapped by
  :class:`SemSegDatasetMapper`; unlabeled from ``DATASETS.TRAIN_UNLABELED`` by :class:`UnlabeledDatasetMapper`.
  Unlabeled records are stripped of ``sem_seg_file_name`` first, so a labeled dataset (e.g. the
  ``*_unlabeled`` half of a split, or a full train set) can serve as unlabeled data: its labels are never read.
- several labeled sources with ``DATASETS.TRAIN_LABELED_RATIOS``: every labeled batch has the same composition,
  source i contributing ``n_i`` images, ``n_i`` = ratio_i / sum(ratios) * per-rank batch rounded by largest
  remainder (e.g. GTA5 + Cityscapes with [1, 1] and a batch of 4: 2 + 2), each source drawn from its own
  infinite shuffled stream. Without ratios the sources are concatenated into one pool.
- per-rank batch sizes ``SOLVER.IMS_PER_BATCH // world`` and ``SOLVER.IMS_PER_BATCH_UNLABELED // world``.

Training streams are :class:`~semiseg_d2.data.stream.SeededBatchStream`: batch ``b`` is a pure function of
``(SEED, b, rank)``, so ``loader.set_start(iteration)`` resumes exactly, whatever ``DATALOADER.NUM_WORKERS``.
"""
import logging
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import build_detection_test_loader
from detectron2.utils import comm

from .mapper import SemSegDatasetMapper, UnlabeledDatasetMapper
from .stream import SeededBatchStream, StreamLoader

__all__ = [
    "build_sem_seg_train_loader",
    "build_semi_train_loader",
    "build_sem_seg_test_loader",
    "load_dataset_dicts",
    "split_batch",
    "SemiTrainLoader",
]
logger = logging.getLogger(__name__)


def load_dataset_dicts(names: Sequence[str], key: str, unlabeled: bool = False) -> List[Dict]:
    """Concatenated dicts of ``names`` (config key ``key`` named in errors); ``unlabeled`` drops labels."""
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError(f"{key} is empty: name at least one registered dataset")
    out = []
    for name in names:
        if name not in DatasetCatalog:
            raise KeyError(f"{key}: dataset '{name}' is not registered; known datasets include {DatasetCatalog.list()[-12:]}")
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise ValueError(f"{key}: dataset '{name}' is empty")
        if unlabeled:
            dicts = [{k: v for k, v in d.items() if k != "sem_seg_file_name"} for d in dicts]
        out.extend(dicts)
    return out


def check_same_label_space(names: Sequence[str]) -> None:
    """Raise ValueError listing the differences when ``names`` disagree on stuff_classes or ignore_label."""
    ref = names[0]
    ref_meta = MetadataCatalog.get(ref)
    diffs = []
    for name in names[1:]:
        meta = MetadataCatalog.get(name)
        for attr in ("stuff_classes", "ignore_label"):
            a, b = ref_meta.get(attr, None), meta.get(attr, None)
            if a != b:
                diffs.append(f"{attr}: '{ref}' has {a}, '{name}' has {b}")
    if diffs:
        raise ValueError("labeled and unlabeled datasets must share one label space; differences:\n  " + "\n  ".join(diffs))


def _per_rank_batch(total: int, key: str) -> int:
    world = comm.get_world_size()
    if total <= 0 or total % world != 0:
        raise ValueError(f"{key}={total} must be a positive multiple of the number of processes ({world})")
    return total // world


def split_batch(batch: int, ratios: Sequence[float]) -> List[int]:
    """Largest-remainder split of ``batch`` images over sources with weights ``ratios``."""
    r = np.asarray(ratios, dtype=float)
    if (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"DATASETS.TRAIN_LABELED_RATIOS must be non-negative with a positive sum, got {list(ratios)}")
    exact = r / r.sum() * batch
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: batch - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _stream(cfg, dicts: List[Dict], mapper, per_rank_batch: int, stream_id: int) -> SeededBatchStream:
    """One rank's seeded infinite stream; ``stream_id`` keeps the streams of one run independent."""
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    return SeededBatchStream(
        [dicts],
        mapper,
        per_rank_batch,
        seed=seed * 1000 + stream_id,
        rank=comm.get_rank(),
        world_size=comm.get_world_size(),
    )


def build_sem_seg_train_loader(cfg) -> StreamLoader:
    """Supervised loader: ``DATASETS.TRAIN`` through ``SemSegDatasetMapper(cfg, True)``; yields lists of dicts."""
    dicts = load_dataset_dicts(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    batch = _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    return StreamLoader([_stream(cfg, dicts, SemSegDatasetMapper(cfg, True), batch, 0)], cfg.DATALOADER.NUM_WORKERS)


class SemiTrainLoader(StreamLoader):
    """Iterable of ``(labeled, unlabeled)`` batches: labeled source stream(s), then the unlabeled stream."""

    def __iter__(self) -> Iterator[Tuple[List[Dict], List[Dict]]]:
        for batches in super().__iter__():
            yield [d for b in batches[:-1] for d in b], batches[-1]


def build_semi_train_loader(cfg) -> SemiTrainLoader:
    labeled_names = list(cfg.DATASETS.TRAIN_LABELED) or list(cfg.DATASETS.TRAIN)
    labeled_key = "DATASETS.TRAIN_LABELED" if cfg.DATASETS.TRAIN_LABELED else "DATASETS.TRAIN"
    unlabeled_names = list(cfg.DATASETS.TRAIN_UNLABELED)
    if not labeled_names:
        raise ValueError("DATASETS.TRAIN_LABELED (and DATASETS.TRAIN) are empty: name the labeled training set(s)")
    if not unlabeled_names:
        raise ValueError("DATASETS.TRAIN_UNLABELED is empty: name the unlabeled training set(s)")
    for name in labeled_names + unlabeled_names:
        if name not in DatasetCatalog:
            raise KeyError(f"dataset '{name}' (DATASETS.TRAIN_LABELED / TRAIN_UNLABELED) is not registered")
    check_same_label_space(labeled_names + unlabeled_names)
    lab_batch = _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    unl_batch = _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH_UNLABELED, "SOLVER.IMS_PER_BATCH_UNLABELED")
    workers = cfg.DATALOADER.NUM_WORKERS

    unlabeled = load_dataset_dicts(unlabeled_names, "DATASETS.TRAIN_UNLABELED", unlabeled=True)
    unlabeled_stream = _stream(cfg, unlabeled, UnlabeledDatasetMapper(cfg), unl_batch, 1)

    mapper = SemSegDatasetMapper(cfg, True)
    ratios = list(cfg.DATASETS.TRAIN_LABELED_RATIOS)
    if len(labeled_names) > 1 and ratios:
        if len(ratios) != len(labeled_names):
            raise ValueError(
                f"DATASETS.TRAIN_LABELED_RATIOS has {len(ratios)} entries for {len(labeled_names)} "
                f"DATASETS.TRAIN_LABELED sets {labeled_names}"
            )
        counts = split_batch(lab_batch, ratios)
        streams = []
        for i, (name, n) in enumerate(zip(labeled_names, counts)):
            if n == 0:
                raise ValueError(
                    f"DATASETS.TRAIN_LABELED_RATIOS {ratios}: '{name}' gets 0 of the {lab_batch} labeled images per "
                    "batch; raise SOLVER.IMS_PER_BATCH or its ratio"
                )
            streams.append(_stream(cfg, load_dataset_dicts([name], labeled_key), mapper, n, 2 + i))
        logger.info("labeled batch composition: %s", dict(zip(labeled_names, counts)))
    else:
        streams = [_stream(cfg, load_dataset_dicts(labeled_names, labeled_key), mapper, lab_batch, 2)]
    return SemiTrainLoader(streams + [unlabeled_stream], workers)


def build_sem_seg_test_loader(cfg, dataset_name: str):
    """Batch-1 loader of ``dataset_name`` through ``SemSegDatasetMapper(cfg, False)`` (original-size images)."""
    dicts = load_dataset_dicts([dataset_name], f"test dataset '{dataset_name}'")
    return build_detection_test_loader(
        dicts, mapper=SemSegDatasetMapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
