"""Auxiliary FCN head on res4 (PSPNet / DGCL style deep supervision)."""
from typing import Dict, Optional

import fvcore.nn.weight_init as weight_init
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

__all__ = ["AuxFCNHead", "build_aux_head"]


class AuxFCNHead(nn.Module):
    """3x3 conv (``channels``) + norm + ReLU + dropout 0.1 + 1x1 classifier.

    ``forward(x: [B, in_channels, h, w]) -> [B, num_classes, h, w]`` at the stride of its input feature.
    """

    @configurable
    def __init__(self, in_channels: int, *, num_classes: int, channels: int = 256, norm: str = "BN",
                 dropout: float = 0.1):
        super().__init__()
        self.conv = Conv2d(in_channels, channels, 3, padding=1, bias=norm == "", norm=get_norm(norm, channels))
        weight_init.c2_msra_fill(self.conv)
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        if head.AUX_IN_FEATURE not in input_shape:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE: {head.AUX_IN_FEATURE!r} is not a backbone output "
                f"{sorted(input_shape)}; add it to MODEL.RESNETS.OUT_FEATURES"
            )
        return {
            "in_channels": input_shape[head.AUX_IN_FEATURE].channels,
            "num_classes": head.NUM_CLASSES,
            "channels": head.AUX_CHANNELS,
            "norm": head.NORM,
        }

    def forward(self, x):
        return self.predictor(self.dropout(F.relu(self.conv(x))))


def build_aux_head(cfg, input_shape: Dict[str, ShapeSpec]) -> Optional[AuxFCNHead]:
    """The aux head when ``MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT > 0``, else ``None`` (not built at all)."""
    if cfg.MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT <= 0:
        return None
    return AuxFCNHead(cfg, input_shape)
