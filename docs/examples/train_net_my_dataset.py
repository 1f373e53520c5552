"""tools/train_net.py for a dataset registered in Python (docs/getting_started.md, "Python API").

    MY_DATA=/data/my python docs/examples/train_net_my_dataset.py --config-file my_config.yaml [--resume] [KEY VALUE ...]

``my_config.yaml`` names ``my_train`` / ``my_val`` in DATASETS.TRAIN / DATASETS.TEST (or TRAIN_LABELED /
TRAIN_UNLABELED). The registration runs in every training process, after the YAML and the overrides are merged.
"""
import glob
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

import semiseg_d2  # noqa: F401  (registers the builtin datasets, models and loss terms)
from semiseg_d2.data.datasets import register_folder_datasets_from_cfg
from semiseg_d2.engine.cli import cli

CLASSES = ["background", "crack"]


def my_dicts(root: str, split: str, name: str):
    """detectron2 dataset dicts: ``root/<split>/images/<stem>.jpg`` with ``root/<split>/masks/<stem>.png``."""
    records = []
    for image in sorted(glob.glob(os.path.join(root, split, "images", "*.jpg"))):
        stem = os.path.splitext(os.path.basename(image))[0]
        records.append({"file_name": image, "image_id": stem, "dataset_name": name,
                        "sem_seg_file_name": os.path.join(root, split, "masks", stem + ".png")})
    if not records:
        raise FileNotFoundError(f"{name}: no images in {os.path.join(root, split, 'images')} (MY_DATA={root})")
    return records


def register_my_datasets(cfg) -> None:
    """``cli(register=...)`` calls this with the merged config; registering twice is a no-op."""
    root = os.environ.get("MY_DATA", "datasets/my_data")
    for name, split in (("my_train", "train"), ("my_val", "val")):
        if name in DatasetCatalog:
            continue
        DatasetCatalog.register(name, lambda split=split, name=name: my_dicts(root, split, name))
        MetadataCatalog.get(name).set(stuff_classes=CLASSES, stuff_colors=[[0, 0, 0], [255, 0, 0]],
                                      ignore_label=255, evaluator_type="sem_seg")


def main(argv=None):
    # DATASETS.FOLDERS keeps working beside the Python-registered datasets.
    return cli(argv, register=(register_folder_datasets_from_cfg, register_my_datasets))


if __name__ == "__main__":
    main()
