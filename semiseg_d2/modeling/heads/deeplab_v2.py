"""DeepLabV2 head: four dilated 3x3 classifiers on res5 whose logits are summed (Chen et al. 2017)."""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .aux_fcn import AuxFCNHead, build_aux_head
from .spec import HeadSpec

__all__ = ["DeepLabV2Head"]


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV2Head(nn.Module):
    """ASPP-L of DeepLabV2: one 3x3 conv to class logits per dilation, outputs summed.

    The reference code of Alonso et al. returns the sum of only the first two branches; we sum all of them,
    as the DeepLabV2 paper does. ``forward(features)`` returns
      "logits":   [B, num_classes, h, w] at the backbone's output stride
      "features": [B, C_in, h, w] the input feature itself (2048-d res5 for ResNet-50/101)
      "aux_logits" only with an aux head and in training mode.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_feature: str = "res5",
        dilations: Sequence[int] = (6, 12, 18, 24),
        aux_head: Optional[AuxFCNHead] = None,
        aux_in_feature: str = "res4",
    ):
        super().__init__()
        if in_feature not in input_shape:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES: {in_feature!r} is not a backbone output {sorted(input_shape)}"
            )
        if len(dilations) == 0:
            raise ValueError("MODEL.SEM_SEG_HEAD.V2_DILATIONS: need at least one dilation")
        self.in_feature = in_feature
        self.aux_in_feature = aux_in_feature
        self.num_classes = num_classes
        self.feature_dim = input_shape[in_feature].channels
        self.branches = nn.ModuleList(
            nn.Conv2d(self.feature_dim, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.constant_(conv.bias, 0)
        self.aux_head = aux_head

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "num_classes": head.NUM_CLASSES,
            "in_feature": head.IN_FEATURES[-1],
            "dilations": head.V2_DILATIONS,
            "aux_head": build_aux_head(cfg, input_shape),
            "aux_in_feature": head.AUX_IN_FEATURE,
        }

    def spec(self) -> HeadSpec:
        """What the loss terms read from this head: no re-runnable decoder, the input feature as "features"."""
        return HeadSpec(type(self).__name__, self.num_classes, self.feature_dim)

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = features[self.in_feature]
        logits = self.branches[0](x)
        for conv in self.branches[1:]:
            logits = logits + conv(x)
        out = {"logits": logits, "features": x}
        if self.aux_head is not None and self.training:
            out["aux_logits"] = self.aux_head(features[self.aux_in_feature])
        return out
