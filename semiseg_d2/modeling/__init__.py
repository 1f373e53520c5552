"""Models: importing this package registers the backbone, heads and meta-architectures."""
from . import backbone, heads, meta_arch  # noqa: F401

from .backbone import build_semiseg_resnet_backbone
from .heads import AuxFCNHead, DeepLabV2Head, DeepLabV3PlusFeatHead
from .meta_arch import Segmentor, TeacherStudent, is_semi_supervised

__all__ = ["build_semiseg_resnet_backbone", "AuxFCNHead", "DeepLabV2Head", "DeepLabV3PlusFeatHead", "Segmentor",
           "TeacherStudent", "is_semi_supervised"]
