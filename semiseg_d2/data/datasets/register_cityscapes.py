"""Cityscapes fine (19 train ids): ``cityscapes_fine_{train,val}`` and the shipped ``_train_{N}_{labeled,unlabeled}``.

Layout under ``root``::

    cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (preferred)
                                          <city>_<seq>_<frame>_gtFine_labelIds.png        (mapped on load)

Names avoid detectron2's builtin ``cityscapes_fine_sem_seg_*`` (those use its Cityscapes evaluator).
Which label file a split uses is decided when it is registered: ``labelTrainIds`` if the first city folder
has any (``tools/prepare_cityscapes.py`` writes them), else ``labelIds`` with metadata ``label_id_map``.
"""
import os
from typing import List, Optional

from ..splits.splits import SHIPPED_SPLITS_DIR
from .common import labeled_unlabeled_dirs, records_from_list, register_sem_seg, require_dir

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_COLORS = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
]  # fmt: skip
# Cityscapes labelId -> trainId (cityscapesScripts labels.py); every other labelId 0..33 is ignored.
_LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def cityscapes_label_id_map(unknown_to_ignore: bool = False) -> List[int]:
    """256-entry labelId -> trainId list. Ids 0..33 not in the 19 classes -> 255. Raw values above 33 stay
    themselves (so label_io rejects them) unless ``unknown_to_ignore`` (GTA5, whose maps carry a few)."""
    lut = [255 if (i <= 33 or unknown_to_ignore) else i for i in range(256)]
    for raw, train in _LABEL_ID_TO_TRAIN_ID.items():
        lut[raw] = train
    lut[255] = 255
    return lut


def _label_kind(gt_split_dir: str) -> str:
    """'labelTrainIds' when the first city folder has converted files (or nothing is there yet), else 'labelIds'."""
    if not os.path.isdir(gt_split_dir):
        return "labelTrainIds"
    cities = sorted(d for d in os.listdir(gt_split_dir) if os.path.isdir(os.path.join(gt_split_dir, d)))
    if not cities:
        return "labelTrainIds"
    names = os.listdir(os.path.join(gt_split_dir, cities[0]))
    if any(n.endswith("_gtFine_labelTrainIds.png") for n in names):
        return "labelTrainIds"
    if any(n.endswith("_gtFine_labelIds.png") for n in names):
        return "labelIds"
    return "labelTrainIds"


def _cityscapes_loader(name: str, city_root: str, split: str, kind: str, list_path: Optional[str], labeled: bool):
    def record_for_id(image_id: str):
        city = image_id.split("_")[0]
        return {
            "file_name": os.path.join(city_root, "leftImg8bit", split, city, f"{image_id}_leftImg8bit.png"),
            "image_id": image_id,
            "sem_seg_file_name": os.path.join(city_root, "gtFine", split, city, f"{image_id}_gtFine_{kind}.png"),
        }

    def load():
        require_dir(city_root, f"Cityscapes root of '{name}'")
        if list_path is not None:
            return records_from_list(list_path, name, record_for_id, labeled)
        image_dir = require_dir(os.path.join(city_root, "leftImg8bit", split), f"Cityscapes images of '{name}'")
        records = []
        for city in sorted(os.listdir(image_dir)):
            for fname in sorted(os.listdir(os.path.join(image_dir, city))):
                if not fname.endswith("_leftImg8bit.png"):
                    continue
                rec = record_for_id(fname[: -len("_leftImg8bit.png")])
                if not os.path.isfile(rec["sem_seg_file_name"]):
                    raise FileNotFoundError(
                        f"'{name}': image {rec['file_name']} has no label {rec['sem_seg_file_name']} "
                        f"(run tools/prepare_cityscapes.py to write *_gtFine_labelTrainIds.png)"
                    )
                rec["dataset_name"] = name
                records.append(rec)
        if not records:
            raise FileNotFoundError(f"'{name}': no *_leftImg8bit.png under {image_dir}")
        return records

    return load


def register_all_cityscapes(root: str, splits_dir: Optional[str] = None, prefix: str = "") -> List[str]:
    """Register Cityscapes fine train/val and every labeled/unlabeled split under ``splits_dir``
    (default: the shipped ``data/splits/cityscapes``). Returns the registered names."""
    city_root = os.path.join(root, "cityscapes")
    splits_dir = splits_dir or os.path.join(SHIPPED_SPLITS_DIR, "cityscapes")
    names = []
    for split in ("train", "val"):
        kind = _label_kind(os.path.join(city_root, "gtFine", split))
        meta = dict(
            stuff_classes=list(CITYSCAPES_CLASSES),
            stuff_colors=[list(c) for c in CITYSCAPES_COLORS],
            label_id_map=cityscapes_label_id_map() if kind == "labelIds" else None,
            dataset_root=city_root,
        )
        jobs = [(f"{prefix}cityscapes_fine_{split}", None, True)]
        if split == "train":
            for n in labeled_unlabeled_dirs(splits_dir):
                for part in ("labeled", "unlabeled"):
                    list_path = os.path.join(splits_dir, n, f"{part}.txt")
                    jobs.append((f"{prefix}cityscapes_fine_train_{n}_{part}", list_path, part == "labeled"))
        for name, list_path, labeled in jobs:
            loader = _cityscapes_loader(name, city_root, split, kind, list_path, labeled)
            names.append(register_sem_seg(name, loader, **meta))
    return names
