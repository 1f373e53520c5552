"""GTA5 (Richter et al. 2016), 24966 frames labeled with Cityscapes label ids -> the 19 Cityscapes train ids.

Layout under ``root``::

    gta5/images/<nnnnn>.png
    gta5/labels/<nnnnn>.png     Cityscapes labelIds (palette PNG); mapped by metadata ``label_id_map``

``gta5_train`` = every image, sorted. Classes and colours are Cityscapes', so GTA5 and Cityscapes sets can be
mixed in one run (DATASETS.TRAIN_LABELED). A few official label maps differ in size from their image:
``tools/prepare_gta5.py`` lists (and with ``--fix`` resizes) them; the mappers reject such pairs.
"""
import os
from typing import List

from .common import register_sem_seg, require_dir
from .register_cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_COLORS, cityscapes_label_id_map


def _gta5_loader(name: str, gta_root: str):
    def load():
        image_dir = require_dir(os.path.join(gta_root, "images"), f"GTA5 images of '{name}'")
        label_dir = require_dir(os.path.join(gta_root, "labels"), f"GTA5 labels of '{name}'")
        records = []
        for fname in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in (".png", ".jpg"):
                continue
            label = os.path.join(label_dir, stem + ".png")
            if not os.path.isfile(label):
                raise FileNotFoundError(f"'{name}': image {os.path.join(image_dir, fname)} has no label {label}")
            records.append(
                {"file_name": os.path.join(image_dir, fname), "image_id": stem, "sem_seg_file_name": label,
                 "dataset_name": name}
            )
        if not records:
            raise FileNotFoundError(f"'{name}': no images under {image_dir}")
        return records

    return load


def register_all_gta5(root: str, prefix: str = "") -> List[str]:
    gta_root = os.path.join(root, "gta5")
    name = prefix + "gta5_train"
    register_sem_seg(
        name,
        _gta5_loader(name, gta_root),
        stuff_classes=list(CITYSCAPES_CLASSES),
        stuff_colors=[list(c) for c in CITYSCAPES_COLORS],
        label_id_map=cityscapes_label_id_map(unknown_to_ignore=True),
        dataset_root=gta_root,
    )
    return [name]
