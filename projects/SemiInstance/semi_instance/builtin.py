"""Dataset names the configs use, registered on demand from ``$DETECTRON2_DATASETS`` (default ``./datasets``).

Registration validates the COCO json (a full parse), so names are registered only when a config asks for them
(:func:`register_datasets_for_config`, called by train_net.py), never at import:
  ``coco_2017_train_{P}pct_fold{F}_{labeled,unlabeled}``  coco/annotations/instances_train2017.json + train2017/,
        labeled ids from coco/semi_splits/{P}pct/fold{F}/labeled.txt (``tools/make_splits.py coco``)
  ``synthetic_shapes_{train,val}``, ``synthetic_shapes_train_{labeled,unlabeled}``  synthetic_shapes/ (``python -m
        semi_instance.synthetic --out datasets/synthetic_shapes``; labeled ids from synthetic_shapes/labeled.txt)
COCO val: detectron2's own ``coco_2017_val``. A name whose files are missing is a FileNotFoundError naming them,
``DETECTRON2_DATASETS`` and the layout expected under it, before any model is built.
"""
import os
import re
from typing import Iterable, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from semiseg_d2.data.label_io import datasets_env_hint

from .data import register_coco_semi

# What register_dataset / detectron2's coco_2017_val read, under $DETECTRON2_DATASETS.
COCO_LAYOUT = """  coco/annotations/instances_train2017.json   COCO 2017 train annotations
  coco/train2017/<id>.jpg                       COCO 2017 train images
  coco/semi_splits/{P}pct/fold{F}/labeled.txt   labeled image ids (python tools/make_splits.py coco --json \
datasets/coco/annotations/instances_train2017.json --percent 1 5 10 --folds 1 2 3 4 5 --out datasets/coco/semi_splits)
  coco/annotations/instances_val2017.json + coco/val2017/   coco_2017_val (evaluation)"""
SYNTHETIC_LAYOUT = """  synthetic_shapes/{train,val}.json + synthetic_shapes/{train,val}/ + synthetic_shapes/labeled.txt
  (written by: python -m semi_instance.synthetic --out datasets/synthetic_shapes, from projects/SemiInstance)"""


def require_dataset_files(name: str, paths: Sequence[str], layout: str) -> None:
    """FileNotFoundError naming the missing files of dataset ``name``, DETECTRON2_DATASETS and the expected layout."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"dataset '{name}': not found: {', '.join(missing)}; {datasets_env_hint()}. Expected under it:\n{layout}"
        )

_COCO = re.compile(r"^coco_2017_train_(?P<pct>[0-9.]+)pct_fold(?P<fold>\d+)_(labeled|unlabeled)$")
_SYNTH = re.compile(r"^synthetic_shapes_(train|val)(_labeled|_unlabeled)?$")


def _root(root: Optional[str]) -> str:
    return root or os.getenv("DETECTRON2_DATASETS", "datasets")


def register_dataset(name: str, root: Optional[str] = None) -> bool:
    """Register ``name`` (and its sibling split) if it is a builtin pattern; False when it is not one."""
    root = _root(root)
    m = _COCO.match(name)
    if m:
        coco = os.path.join(root, "coco")
        json_file = os.path.join(coco, "annotations", "instances_train2017.json")
        images = os.path.join(coco, "train2017")
        ids = os.path.join(coco, "semi_splits", f"{m['pct']}pct", f"fold{m['fold']}", "labeled.txt")
        require_dataset_files(name, [json_file, images, ids], COCO_LAYOUT)
        register_coco_semi(f"coco_2017_train_{m['pct']}pct_fold{m['fold']}", json_file, images, labeled_ids=ids)
        return True
    m = _SYNTH.match(name)
    if m:
        d = os.path.join(root, "synthetic_shapes")
        split = m.group(1)
        ids = os.path.join(d, "labeled.txt") if m.group(2) else None
        require_dataset_files(name, [os.path.join(d, f"{split}.json"), os.path.join(d, split)] + ([ids] if ids else []),
                              SYNTHETIC_LAYOUT)
        register_coco_semi(f"synthetic_shapes_{split}", os.path.join(d, f"{split}.json"), os.path.join(d, split), ids)
        return True
    return False


def register_datasets_for_config(cfg, root: Optional[str] = None) -> None:
    """Register every builtin name in DATASETS.TRAIN_LABELED / TRAIN_UNLABELED / TRAIN / TEST not registered yet."""
    names: Iterable[str] = (list(cfg.DATASETS.TRAIN_LABELED) + list(cfg.DATASETS.TRAIN_UNLABELED)
                            + list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    for name in names:
        if name not in DatasetCatalog:
            register_dataset(name, root)
        elif name.startswith("coco_2017_") and MetadataCatalog.get(name).get("json_file"):
            # detectron2's builtin COCO (coco_2017_val) is registered at import, whether or not it is on disk
            meta = MetadataCatalog.get(name)
            require_dataset_files(name, [meta.json_file, meta.image_root], COCO_LAYOUT)
