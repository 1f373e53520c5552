"""Shared pieces of the dataset registrations: root checks, split-list loading, (un)registering."""
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..label_io import datasets_env_hint
from ..splits.splits import entry_id, read_list

__all__ = [
    "require_dir",
    "require_file",
    "records_from_list",
    "records_from_entries",
    "register_sem_seg",
    "unregister",
    "labeled_unlabeled_dirs",
    "identity_label_map",
]


def require_dir(path: str, what: str) -> str:
    """``path`` if it is a directory, else FileNotFoundError naming it and DETECTRON2_DATASETS."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder not found: {path}; {datasets_env_hint()}")
    return path


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path}; {datasets_env_hint()}")
    return path


def records_from_list(
    list_path: str,
    dataset_name: str,
    record_for_id: Callable[[str], Dict],
    labeled: bool,
) -> List[Dict]:
    """Dataset dicts for the entries of a split list (any format :func:`entry_id` understands).

    ``record_for_id(image_id)`` gives ``{"file_name", "image_id", "sem_seg_file_name"}``; an entry whose image
    (or, when ``labeled``, label) file is missing raises FileNotFoundError naming the entry and the list.
    Unlabeled records carry no ``sem_seg_file_name``: their labels are never read.
    """
    require_file(list_path, f"split list of '{dataset_name}'")
    return records_from_entries(read_list(list_path), f"split list {list_path}", dataset_name, record_for_id, labeled)


def records_from_entries(
    entries: Sequence[str],
    source: str,
    dataset_name: str,
    record_for_id: Callable[[str], Dict],
    labeled: bool,
) -> List[Dict]:
    """As :func:`records_from_list` for entries that came from ``source`` (named in errors)."""
    records = []
    for entry in entries:
        rec = record_for_id(entry_id(entry))
        if not os.path.isfile(rec["file_name"]):
            raise FileNotFoundError(
                f"{source}: entry '{entry}' has no image file {rec['file_name']}; {datasets_env_hint()}"
            )
        if labeled:
            if not os.path.isfile(rec["sem_seg_file_name"]):
                raise FileNotFoundError(
                    f"{source}: entry '{entry}' has no label file {rec['sem_seg_file_name']}; {datasets_env_hint()}"
                )
        else:
            rec.pop("sem_seg_file_name", None)
        rec["dataset_name"] = dataset_name
        records.append(rec)
    return records


def register_sem_seg(name: str, loader: Callable[[], List[Dict]], **metadata) -> str:
    """Register ``name`` in DatasetCatalog (lazy ``loader``) with sem_seg metadata; returns ``name``."""
    DatasetCatalog.register(name, loader)
    metadata.setdefault("ignore_label", 255)
    metadata.setdefault("evaluator_type", "sem_seg")
    metadata.setdefault("label_id_map", None)
    MetadataCatalog.get(name).set(**metadata)
    return name


def unregister(names: Iterable[str]) -> None:
    """Remove registered datasets (tests register synthetic trees under a prefix and clean up)."""
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def labeled_unlabeled_dirs(splits_dir: str) -> List[str]:
    """Sub-folders ``N`` of ``splits_dir`` holding ``labeled.txt`` + ``unlabeled.txt``, sorted by N."""
    if not os.path.isdir(splits_dir):
        return []
    out = [
        d
        for d in os.listdir(splits_dir)
        if os.path.isfile(os.path.join(splits_dir, d, "labeled.txt"))
        and os.path.isfile(os.path.join(splits_dir, d, "unlabeled.txt"))
    ]
    return sorted(out, key=lambda d: (len(d), d))


def identity_label_map(overrides: Optional[Dict[int, int]] = None) -> List[int]:
    """256-entry raw->train-id list: identity except ``overrides`` (unknown raw ids stay themselves and are
    rejected by label_io when they are not a class id)."""
    lut = list(range(256))
    for raw, train in (overrides or {}).items():
        lut[raw] = train
    return lut
