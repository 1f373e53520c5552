from .build import build_backbone_checked, check_registered
from .dinov2 import D2DinoV2, convert_official_dinov2, is_official_dinov2
from .resnet import build_semiseg_resnet_backbone, output_stride_to_dilations

__all__ = [
    "D2DinoV2",
    "convert_official_dinov2",
    "is_official_dinov2",
    "build_backbone_checked",
    "check_registered",
    "build_semiseg_resnet_backbone",
    "output_stride_to_dilations",
]
