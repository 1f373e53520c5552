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

The pairing itself is task-agnostic: :func:`build_paired_loader` takes the two mappers, the record keys that are
labels (dropped from unlabeled records) and the metadata that defines the label space; projects/SemiInstance
builds its Mask R-CNN loader with it (``annotations`` dropped, ``thing_classes`` compared).

Training streams are :class:`~semiseg_d2.data.stream.SeededBatchStream`: batch ``b`` is a pure function of
``(SEED, b, rank)``, so ``loader.set_start(iteration)`` resumes exactly, whatever ``DATALOADER.NUM_WORKERS``.
An unreadable image stops the run naming file and dataset, except unlabeled ones under
``DATALOADER.UNREADABLE_UNLABELED "skip"`` (:func:`max_unreadable`; replaced deterministically, see data/stream.py).
"""
import logging
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import build_detection_test_loader
from detectron2.utils import comm

from ..config import check_ranges
from .mapper import SemSegDatasetMapper, UnlabeledDatasetMapper
from .stream import SeededBatchStream, StreamLoader

__all__ = [
    "build_sem_seg_train_loader",
    "build_semi_train_loader",
    "build_paired_loader",
    "semi_dataset_names",
    "build_sem_seg_test_loader",
    "load_dataset_dicts",
    "split_batch",
    "max_unreadable",
    "SemiTrainLoader",
]
logger = logging.getLogger(__name__)


def load_dataset_dicts(
    names: Sequence[str], key: str, unlabeled: bool = False, label_keys: Sequence[str] = ("sem_seg_file_name",)
) -> List[Dict]:
    """Concatenated dicts of ``names`` (config key ``key`` named in errors); ``unlabeled`` drops ``label_keys``
    (``sem_seg_file_name`` for segmentation, ``annotations`` for detection / instance segmentation)."""
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
            dicts = [{k: v for k, v in d.items() if k not in label_keys} for d in dicts]
        out.extend(dicts)
    return out


def check_same_label_space(names: Sequence[str], attrs: Sequence[str] = ("stuff_classes", "ignore_label")) -> None:
    """Raise ValueError listing the differences when ``names`` disagree on the metadata ``attrs``
    (``stuff_classes``/``ignore_label`` for segmentation, ``thing_classes`` for instances)."""
    ref = names[0]
    ref_meta = MetadataCatalog.get(ref)
    diffs = []
    for name in names[1:]:
        meta = MetadataCatalog.get(name)
        for attr in attrs:
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
        dicts,
        mapper,
        per_rank_batch,
        seed=seed * 1000 + stream_id,
        rank=comm.get_rank(),
        world_size=comm.get_world_size(),
    )


# Stream ids (one run's streams are independent). A semi-supervised run's single labeled stream is the supervised
# loader's: for one SEED its labeled batches are those of the supervised run on the same set (same frames, same
# augmentation), so the burn-in trains the student exactly as the supervised baseline and a paired difference
# between the two measures the unlabeled part, not another data order.
_SUPERVISED_STREAM, _UNLABELED_STREAM, _FIRST_LABELED_SOURCE_STREAM = 0, 1, 2


def max_unreadable(cfg, num_unlabeled: int) -> Optional[int]:
    """How many distinct unreadable unlabeled files a run skips before it stops (``DATALOADER.UNREADABLE_UNLABELED
    "skip"``: ``floor(MAX_UNREADABLE * num_unlabeled)``); None for "error" (the first one stops it). Labeled and
    test images are never skipped: a bad one always stops the run, naming it."""
    check_ranges(cfg, ("DATALOADER.UNREADABLE_UNLABELED", "DATALOADER.MAX_UNREADABLE"))
    if cfg.DATALOADER.UNREADABLE_UNLABELED != "skip":
        return None
    return int(cfg.DATALOADER.MAX_UNREADABLE * num_unlabeled)


def build_sem_seg_train_loader(cfg) -> StreamLoader:
    """Supervised loader: ``DATASETS.TRAIN`` through ``SemSegDatasetMapper(cfg, True)``; yields lists of dicts."""
    dicts = load_dataset_dicts(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    batch = _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    stream = _stream(cfg, dicts, SemSegDatasetMapper(cfg, True), batch, _SUPERVISED_STREAM)
    return StreamLoader([stream], cfg.DATALOADER.NUM_WORKERS)


class SemiTrainLoader(StreamLoader):
    """Iterable of ``(labeled, unlabeled)`` batches: labeled source stream(s), then the unlabeled stream."""

    def __iter__(self) -> Iterator[Tuple[List[Dict], List[Dict]]]:
        for batches in super().__iter__():
            yield [d for b in batches[:-1] for d in b], batches[-1]


def semi_dataset_names(cfg) -> Tuple[List[str], str, List[str]]:
    """``(labeled names, the config key they come from, unlabeled names)``, each registered (else an error)."""
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
    return labeled_names, labeled_key, unlabeled_names


def build_paired_loader(
    cfg,
    labeled_mapper: Callable[[Dict], Dict],
    unlabeled_mapper: Callable[[Dict], Dict],
    *,
    label_keys: Sequence[str] = ("sem_seg_file_name",),
    label_space_attrs: Sequence[str] = ("stuff_classes", "ignore_label"),
    labeled_filter: Optional[Callable[[List[Dict]], List[Dict]]] = None,
) -> "SemiTrainLoader":
    """Task-agnostic paired loader: yields ``(labeled: list[dict], unlabeled: list[dict])`` forever.

    Labeled records (``DATASETS.TRAIN_LABELED``, or ``DATASETS.TRAIN``; several sources composed by
    ``DATASETS.TRAIN_LABELED_RATIOS``) go through ``labeled_mapper``; unlabeled ones (``DATASETS.TRAIN_UNLABELED``)
    are stripped of ``label_keys`` and go through ``unlabeled_mapper``. All sets must agree on the metadata
    ``label_space_attrs``; ``labeled_filter`` (optional) prunes each labeled source's records (e.g. detectron2's
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``). Batches per rank: ``SOLVER.IMS_PER_BATCH // world``, ``SOLVER.IMS_PER_BATCH_UNLABELED
    // world``; every stream is a seeded :class:`SeededBatchStream` (``set_start`` resumes exactly).
    """
    labeled_names, labeled_key, unlabeled_names = semi_dataset_names(cfg)
    check_same_label_space(labeled_names + unlabeled_names, label_space_attrs)
    lab_batch = _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    unl_batch = _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH_UNLABELED, "SOLVER.IMS_PER_BATCH_UNLABELED")
    workers = cfg.DATALOADER.NUM_WORKERS

    unlabeled = load_dataset_dicts(unlabeled_names, "DATASETS.TRAIN_UNLABELED", unlabeled=True, label_keys=label_keys)
    unlabeled_stream = _stream(cfg, unlabeled, unlabeled_mapper, unl_batch, _UNLABELED_STREAM)
    unlabeled_stream.max_unreadable = max_unreadable(cfg, len(unlabeled))

    def labeled_dicts(names):
        dicts = load_dataset_dicts(names, labeled_key)
        if labeled_filter is not None:
            dicts = labeled_filter(dicts)
            if not dicts:
                raise ValueError(f"{labeled_key}: no usable labeled record left in {list(names)} after filtering")
        return dicts

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
            streams.append(_stream(cfg, labeled_dicts([name]), labeled_mapper, n, _FIRST_LABELED_SOURCE_STREAM + i))
        logger.info("labeled batch composition: %s", dict(zip(labeled_names, counts)))
    else:
        streams = [_stream(cfg, labeled_dicts(labeled_names), labeled_mapper, lab_batch, _SUPERVISED_STREAM)]
    return SemiTrainLoader(streams + [unlabeled_stream], workers)


def build_semi_train_loader(cfg) -> SemiTrainLoader:
    """Semantic segmentation: :func:`build_paired_loader` with ``SemSegDatasetMapper`` (labeled) and
    ``UnlabeledDatasetMapper`` (weak + strong views); unlabeled records lose ``sem_seg_file_name``."""
    labeled_names, _, unlabeled_names = semi_dataset_names(cfg)
    check_same_label_space(labeled_names + unlabeled_names)
    _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    _per_rank_batch(cfg.SOLVER.IMS_PER_BATCH_UNLABELED, "SOLVER.IMS_PER_BATCH_UNLABELED")
    return build_paired_loader(cfg, SemSegDatasetMapper(cfg, True), _unlabeled_mapper(cfg, unlabeled_names))


def _unlabeled_mapper(cfg, unlabeled_names: Sequence[str]):
    """``UnlabeledDatasetMapper(cfg)``; with ``SEMI.DIAGNOSTICS.ENABLED`` wrapped to add each frame's ground truth
    from ``SEMI.DIAGNOSTICS.GT_DATASETS`` (measurements only, see evaluation/pseudo_label_diagnostics.py)."""
    mapper = UnlabeledDatasetMapper(cfg)
    d = cfg.SEMI.DIAGNOSTICS
    if not d.ENABLED:
        return mapper
    from ..evaluation.pseudo_label_diagnostics import WithDiagnosticGT, diagnostic_gt_files

    names = list(d.GT_DATASETS)
    if not names:
        raise ValueError("SEMI.DIAGNOSTICS.ENABLED needs SEMI.DIAGNOSTICS.GT_DATASETS: the labeled dataset(s) holding "
                         f"the ground truth of the unlabeled frames of {list(unlabeled_names)} (e.g. camvid_train)")
    check_same_label_space(list(unlabeled_names) + names)
    wrapped = WithDiagnosticGT(
        mapper, diagnostic_gt_files(load_dataset_dicts(names, "SEMI.DIAGNOSTICS.GT_DATASETS")),
        f"SEMI.DIAGNOSTICS.GT_DATASETS {names}",
    )
    wrapped.check(load_dataset_dicts(unlabeled_names, "DATASETS.TRAIN_UNLABELED"))
    return wrapped


def build_sem_seg_test_loader(cfg, dataset_name: str):
    """Batch-1 loader of ``dataset_name`` through ``SemSegDatasetMapper(cfg, False)`` (original-size images)."""
    dicts = load_dataset_dicts([dataset_name], f"test dataset '{dataset_name}'")
    return build_detection_test_loader(
        dicts, mapper=SemSegDatasetMapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
