"""PASCAL VOC 2012 (+ SBD "aug" labels), 21 classes.

Layout under ``root`` (the one U2PL/DGCL/UniMatch use, inside the usual VOCdevkit folder)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      fine VOC labels (train 1464 + val 1449), palette PNG
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png   SBD-augmented labels for all 10582 train_aug ids (optional:
                                                      without it, SegmentationClass must hold them, as in U2PL's
                                                      and UniMatch's merged folder)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,train_aug}.txt   (optional)

Names (``voc_2012_seg_*``: detectron2 already registers ``voc_2012_{train,val}`` as detection sets):
``voc_2012_seg_train`` (1464; ImageSets train.txt, else the shipped ``1464/labeled.txt``), ``voc_2012_seg_val``
(1449, shipped ``val.txt``), ``voc_2012_seg_train_aug`` (10582; ImageSets train_aug.txt, else the union of the
shipped labeled+unlabeled lists: each shipped split partitions the same 10582 ids), and
``voc_2012_seg_train_aug_{N}_{labeled,unlabeled}`` for every shipped folder ``N``.
Train/val sets read ``SegmentationClass``; train_aug and its splits read ``SegmentationClassAug`` when present.
"""
import os
from typing import List, Optional

from ..splits.splits import SHIPPED_SPLITS_DIR, entry_id, read_list
from .common import (
    labeled_unlabeled_dirs,
    records_from_entries,
    records_from_list,
    register_sem_seg,
    require_dir,
)

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def voc_colors(n: int = 21) -> List[List[int]]:
    """The VOC palette (bit-interleaved colour map of the devkit)."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append([r, g, b])
    return colors


def _voc_loader(name, voc_root, splits_dir, set_kind, list_candidates, labeled):
    """set_kind: 'train' / 'val' (SegmentationClass) or 'aug' (SegmentationClassAug when present).
    list_candidates: split lists tried in order at load time; None = the union of the shipped partitions."""

    def load():
        require_dir(voc_root, f"PASCAL VOC root of '{name}'")
        label_dir = "SegmentationClass"
        if set_kind == "aug" and os.path.isdir(os.path.join(voc_root, "SegmentationClassAug")):
            label_dir = "SegmentationClassAug"

        def record_for_id(image_id):
            return {
                "file_name": os.path.join(voc_root, "JPEGImages", image_id + ".jpg"),
                "image_id": image_id,
                "sem_seg_file_name": os.path.join(voc_root, label_dir, image_id + ".png"),
            }

        for list_path in list_candidates:
            if list_path is not None and (os.path.isfile(list_path) or list_path == list_candidates[-1]):
                return records_from_list(list_path, name, record_for_id, labeled)
            if list_path is None:
                break
        # train_aug without ImageSets/Segmentation/train_aug.txt: union of the shipped partitions.
        ids = set()
        for n in labeled_unlabeled_dirs(splits_dir):
            for part in ("labeled", "unlabeled"):
                ids.update(entry_id(e) for e in read_list(os.path.join(splits_dir, n, f"{part}.txt")))
        if not ids:
            raise FileNotFoundError(f"'{name}': no train_aug.txt and no split lists under {splits_dir}")
        source = f"union of the split lists under {splits_dir}"
        return records_from_entries(sorted(ids), source, name, record_for_id, labeled)

    return load


def register_all_voc(root: str, splits_dir: Optional[str] = None, prefix: str = "") -> List[str]:
    """Register VOC 2012 train/val/train_aug and the splits under ``splits_dir`` (default: shipped ``pascal``)."""
    voc_root = os.path.join(root, "VOCdevkit", "VOC2012")
    splits_dir = splits_dir or os.path.join(SHIPPED_SPLITS_DIR, "pascal")
    image_sets = os.path.join(voc_root, "ImageSets", "Segmentation")

    meta = dict(stuff_classes=list(VOC_CLASSES), stuff_colors=voc_colors(), dataset_root=voc_root)
    jobs = [
        ("voc_2012_seg_train", "train", [os.path.join(image_sets, "train.txt"), os.path.join(splits_dir, "1464", "labeled.txt")], True),
        ("voc_2012_seg_val", "val", [os.path.join(splits_dir, "val.txt")], True),
        ("voc_2012_seg_train_aug", "aug", [os.path.join(image_sets, "train_aug.txt"), None], True),
    ]
    for n in labeled_unlabeled_dirs(splits_dir):
        for part in ("labeled", "unlabeled"):
            list_path = os.path.join(splits_dir, n, f"{part}.txt")
            jobs.append((f"voc_2012_seg_train_aug_{n}_{part}", "aug", [list_path], part == "labeled"))
    names = []
    for name, kind, list_path, labeled in jobs:
        name = prefix + name
        names.append(register_sem_seg(name, _voc_loader(name, voc_root, splits_dir, kind, list_path, labeled), **meta))
    return names
