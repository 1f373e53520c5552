"""Split lists: read any of the common formats, write one, make seeded labeled/unlabeled partitions.

Formats (one entry per line; ``#`` lines and blank lines are skipped when reading):
  ``id``        image id only: ``2007_000033`` (U2PL/DGCL VOC lists), ``0001TP_006690`` (CamVid)
  ``path``      image path relative to the dataset root: ``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``
                (U2PL/DGCL Cityscapes lists)
  ``unimatch``  ``<image> <label>`` separated by one space: ``JPEGImages/x.jpg SegmentationClass/x.png``
  ``cps``       ``<image>\\t<label>`` separated by a tab (CPS/TorchSemiSeg lists, e.g. ``train_aug_labeled_1-8.txt``)
Reading accepts all four: an entry is identified by its image file's stem (``_leftImg8bit`` removed for
Cityscapes), which is the ``image_id`` of the registered dataset dicts.
"""
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "SHIPPED_SPLITS_DIR",
    "FORMATS",
    "read_list",
    "parse_entry",
    "entry_id",
    "format_record",
    "write_list",
    "make_partition",
    "partition_dataset",
    "convert_list",
    "class_pixel_stats",
]

SHIPPED_SPLITS_DIR = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("id", "path", "unimatch", "cps")
_ID_SUFFIXES = ("_leftImg8bit",)  # Cityscapes: the image stem carries the modality suffix


def read_list(path: str) -> List[str]:
    """Non-empty, non-comment lines of a split list, stripped (the last line may lack a newline)."""
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def parse_entry(entry: str) -> Tuple[str, Optional[str]]:
    """``(image, label or None)`` of one entry: a tab or any whitespace separates an image-label pair."""
    parts = entry.strip().split("\t") if "\t" in entry else entry.strip().split()
    parts = [p.strip() for p in parts if p.strip()]
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(f"split entry '{entry}': expected 'image' or 'image label', got {len(parts)} fields")


def entry_id(entry: str) -> str:
    """The image id an entry refers to: stem of its image path (``_leftImg8bit`` removed)."""
    image, _ = parse_entry(entry)
    stem = os.path.splitext(os.path.basename(image))[0] if ("/" in image or "." in image) else image
    for suffix in _ID_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem


def format_record(record: Dict, fmt: str, root: str) -> str:
    """One line of format ``fmt`` for a dataset dict; paths are written relative to ``root``."""
    if fmt == "id":
        return record["image_id"]
    image = os.path.relpath(record["file_name"], root)
    if fmt == "path":
        return image
    if fmt in ("unimatch", "cps"):
        if "sem_seg_file_name" not in record:
            raise ValueError(f"format '{fmt}' needs labels, but record {record['image_id']} has no sem_seg_file_name")
        label = os.path.relpath(record["sem_seg_file_name"], root)
        return f"{image} {label}" if fmt == "unimatch" else f"{image}\t{label}"
    raise ValueError(f"unknown split format '{fmt}'; known: {', '.join(FORMATS)}")


def write_list(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(ln + "\n" for ln in lines))


def make_partition(
    ids: Sequence[str], labeled: Optional[int] = None, ratio: Optional[float] = None, seed: int = 0
) -> Tuple[List[str], List[str]]:
    """Seeded partition of ``ids`` into (labeled, unlabeled), each in the input's sorted order.

    Give ``labeled`` (a count) or ``ratio`` (labeled fraction, rounded to the nearest count, at least 1).
    The same ids, count and seed give the same split whatever the input order (ids are sorted first).
    """
    if (labeled is None) == (ratio is None):
        raise ValueError("make_partition: give exactly one of labeled (count) or ratio")
    pool = sorted(set(ids))
    if len(pool) != len(ids):
        raise ValueError(f"make_partition: {len(ids) - len(pool)} duplicate id(s) in the input")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"make_partition: ratio must be in (0, 1], got {ratio}")
        labeled = max(1, int(round(ratio * len(pool))))
    if not 0 < labeled <= len(pool):
        raise ValueError(f"make_partition: labeled count {labeled} not in [1, {len(pool)}]")
    chosen = set(random.Random(seed).sample(pool, labeled))
    return [i for i in pool if i in chosen], [i for i in pool if i not in chosen]


def _dataset_records(dataset_name: str) -> Tuple[List[Dict], str]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if dataset_name not in DatasetCatalog:
        raise KeyError(f"dataset '{dataset_name}' is not registered (import semiseg_d2 registers the builtin ones)")
    return DatasetCatalog.get(dataset_name), MetadataCatalog.get(dataset_name).dataset_root


def partition_dataset(
    dataset_name: str,
    out_dir: str,
    labeled: Optional[int] = None,
    ratio: Optional[float] = None,
    seed: int = 0,
    fmt: str = "id",
) -> Tuple[List[str], List[str]]:
    """Write ``out_dir/{labeled,unlabeled}.txt``: a seeded partition of a registered dataset, in format ``fmt``.

    Returns the (labeled, unlabeled) image ids.
    """
    records, root = _dataset_records(dataset_name)
    by_id = {r["image_id"]: r for r in records}
    lab, unl = make_partition([r["image_id"] for r in records], labeled=labeled, ratio=ratio, seed=seed)
    write_list(os.path.join(out_dir, "labeled.txt"), [format_record(by_id[i], fmt, root) for i in lab])
    write_list(os.path.join(out_dir, "unlabeled.txt"), [format_record(by_id[i], fmt, root) for i in unl])
    return lab, unl


def convert_list(in_path: str, out_path: str, fmt: str, dataset_name: Optional[str] = None) -> int:
    """Rewrite a split list in format ``fmt``; returns the number of entries.

    ``id`` needs nothing else. Path formats are built from the entries themselves when they already carry the
    needed paths (``unimatch`` <-> ``cps``, pair -> ``path``); otherwise (e.g. ids -> ``unimatch``) the entries
    are looked up in the registered ``dataset_name``, whose files must exist.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown split format '{fmt}'; known: {', '.join(FORMATS)}")
    entries = read_list(in_path)
    out = []
    if dataset_name is None:
        for e in entries:
            image, label = parse_entry(e)
            if fmt == "id":
                out.append(entry_id(e))
            elif fmt == "path" and ("/" in image or "." in image):
                out.append(image.lstrip("/"))
            elif fmt in ("unimatch", "cps") and label is not None:
                sep = " " if fmt == "unimatch" else "\t"
                out.append(f"{image.lstrip('/')}{sep}{label.lstrip('/')}")
            else:
                raise ValueError(
                    f"{in_path}: entry '{e}' lacks the paths format '{fmt}' needs; pass the dataset name "
                    "(--dataset) so they can be looked up"
                )
    else:
        records, root = _dataset_records(dataset_name)
        by_id = {r["image_id"]: r for r in records}
        for e in entries:
            key = entry_id(e)
            if key not in by_id:
                raise KeyError(f"{in_path}: entry '{e}' (id '{key}') is not in dataset '{dataset_name}'")
            out.append(format_record(by_id[key], fmt, root))
    write_list(out_path, out)
    return len(out)


def class_pixel_stats(dataset_name: str, min_share: float = 0.01) -> Dict:
    """Per class of a registered semantic-segmentation dataset: its share of the labeled pixels (ignore left out)
    and how many images hold at least ``min_share`` of their pixels of it — to see whether a labeled split
    represents the classes as the full set and the val set do. Labels are read as training reads them
    (``load_sem_seg``: label maps applied, values checked, errors name the file).

    Returns ``{"dataset", "images", "labeled_pixels", "min_share", "classes": {class: {"share", "images"}}}``
    (share in [0, 1]).
    """
    import numpy as np

    from ..label_io import load_sem_seg
    from detectron2.data import MetadataCatalog

    records, _ = _dataset_records(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    classes = list(meta.stuff_classes)
    missing = [r.get("file_name", "?") for r in records if not r.get("sem_seg_file_name")]
    if missing:
        raise ValueError(f"dataset '{dataset_name}' has {len(missing)} image(s) without sem_seg_file_name "
                         f"(e.g. {missing[0]}): class statistics need labels")
    totals = np.zeros(len(classes), dtype=np.int64)
    holding = np.zeros(len(classes), dtype=np.int64)
    for r in records:
        label = load_sem_seg(r["sem_seg_file_name"], dataset_name)
        counts = np.bincount(label.ravel(), minlength=256)[: len(classes)]
        totals += counts
        holding += counts >= min_share * label.size
    n = int(totals.sum())
    return {
        "dataset": dataset_name,
        "images": len(records),
        "labeled_pixels": n,
        "min_share": min_share,
        "classes": {c: {"share": (float(totals[i]) / n if n else 0.0), "images": int(holding[i])}
                    for i, c in enumerate(classes)},
    }
