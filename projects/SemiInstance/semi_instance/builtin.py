"""Dataset names the configs use, registered on demand from ``$DETECTRON2_DATASETS`` (default ``./datasets``).

Registration validates the COCO json (a full parse), so names are registered only when a config asks for them
(:func:`register_datasets_for_config`, called by train_net.py), never at import:
  ``coco_2017_train_{P}pct_fold{F}_{labeled,unlabeled}``  coco/annotations/instances_train2017.json + train2017/,
        labeled ids from coco/semi_splits/{P}pct/fold{F}/labeled.txt (``tools/make_splits.py coco``)
  ``synthetic_shapes_{train,val}``, ``synthetic_shapes_train_{labeled,unlabeled}``  synthetic_shapes/ (``python -m
        semi_instance.synthetic --out datasets/synthetic_shapes``; labeled ids from synthetic_shapes/labeled.txt)
COCO val: detectron2's own ``coco_2017_val``.
"""
import os
import re
from typing import Iterable, Optional

from detectron2.data import DatasetCatalog

from .data import register_coco_semi

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
        register_coco_semi(
            f"coco_2017_train_{m['pct']}pct_fold{m['fold']}",
            os.path.join(coco, "annotations", "instances_train2017.json"),
            os.path.join(coco, "train2017"),
            labeled_ids=os.path.join(coco, "semi_splits", f"{m['pct']}pct", f"fold{m['fold']}", "labeled.txt"),
        )
        return True
    m = _SYNTH.match(name)
    if m:
        d = os.path.join(root, "synthetic_shapes")
        split = m.group(1)
        ids = os.path.join(d, "labeled.txt") if m.group(2) else None
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
