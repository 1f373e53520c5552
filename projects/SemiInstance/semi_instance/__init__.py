"""SemiInstance: semi-supervised Mask R-CNN on the semiseg_d2 engine (see ../README.md).

Importing registers ``SemiRCNN`` (META_ARCH_REGISTRY) and the ``"instance"`` loss terms (SEMI_LOSS_REGISTRY).
"""
import semiseg_d2  # noqa: F401  engine registries, loss terms

from .config import add_semi_instance_config, get_semi_instance_cfg
from .data import build_semi_instance_train_loader, register_coco_semi, validate_coco_json
from .semi_rcnn import InstanceStep, SemiRCNN, pseudo_instances_from_predictions
from . import losses  # noqa: F401  registers rcnn_supervised, rcnn_pseudo_label, roi_memory_contrast
from .trainer import SemiInstanceTrainer

__all__ = [
    "add_semi_instance_config",
    "get_semi_instance_cfg",
    "build_semi_instance_train_loader",
    "register_coco_semi",
    "validate_coco_json",
    "InstanceStep",
    "SemiRCNN",
    "pseudo_instances_from_predictions",
    "SemiInstanceTrainer",
]
