from .build import build_backbone_checked, check_registered
from .resnet import build_semiseg_resnet_backbone, output_stride_to_dilations

__all__ = [
    "build_backbone_checked",
    "check_registered",
    "build_semiseg_resnet_backbone",
    "output_stride_to_dilations",
]
