"""Registers every dataset of semiseg_d2 under ``$DETECTRON2_DATASETS`` (default ``./datasets``) at import.

Registration is lazy: nothing is read until ``DatasetCatalog.get(name)``, which raises a FileNotFoundError
naming the missing path and DETECTRON2_DATASETS when the data is not there.
"""
import os

from .register_camvid import register_all_camvid
from .register_cityscapes import register_all_cityscapes
from .register_gta5 import register_all_gta5
from .register_voc import register_all_voc


def datasets_root() -> str:
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


_root = datasets_root()
BUILTIN_DATASETS = (
    register_all_voc(_root)
    + register_all_cityscapes(_root)
    + register_all_gta5(_root)
    + register_all_camvid(_root)
)
