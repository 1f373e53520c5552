"""DeepLabV3+ head that also returns the decoder feature and the decoder input (for DGCL / DDFP)."""
from typing import Dict, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ASPP, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .aux_fcn import AuxFCNHead, build_aux_head
from .spec import HeadSpec

__all__ = ["DeepLabV3PlusFeatHead", "check_in_features", "v3plus_kwargs_from_config"]


def check_in_features(input_shape: Dict[str, ShapeSpec], names: Sequence[str]) -> None:
    """A clear error for a head input that the backbone does not produce."""
    for name in names:
        if name not in input_shape:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES: {name!r} is not a backbone output {sorted(input_shape)}"
            )


def v3plus_kwargs_from_config(cfg, input_shape: Dict[str, ShapeSpec], head_name: str) -> Dict:
    """The constructor arguments of a DeepLabV3+ head (this one and U2PLDeepLabV3PlusHead) from
    ``MODEL.SEM_SEG_HEAD``."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if len(head.IN_FEATURES) != 2:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES: {head_name} needs [low_level, high_level], "
            f"got {list(head.IN_FEATURES)}"
        )
    if len(head.PROJECT_CHANNELS) != 1:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS: one width expected, got {list(head.PROJECT_CHANNELS)}"
        )
    return {
        "input_shape": input_shape,
        "num_classes": head.NUM_CLASSES,
        "low_level_feature": head.IN_FEATURES[0],
        "in_feature": head.IN_FEATURES[-1],
        "project_channels": head.PROJECT_CHANNELS[0],
        "aspp_channels": head.ASPP_CHANNELS,
        "aspp_dilations": head.ASPP_DILATIONS,
        "aspp_dropout": head.ASPP_DROPOUT,
        "convs_dim": head.CONVS_DIM,
        "decoder_dropout": head.DECODER_DROPOUT,
        "norm": head.NORM,
        "aux_head": build_aux_head(cfg, input_shape),
        "aux_in_feature": head.AUX_IN_FEATURE,
    }


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3PlusFeatHead(nn.Module):
    """ASPP on the high-level feature + 1x1 projection of the low-level feature + two 3x3 decoder convs.

    ``forward(features)`` returns (shapes for low-level stride 4, h = H/4):
      "logits":        [B, num_classes, h, w]
      "features":      [B, convs_dim, h, w]                      decoder output that feeds the classifier
      "decoder_input": [B, aspp_channels + project_channels, h, w]  upsampled ASPP output || projection
      "aux_logits":    [B, num_classes, h', w']                  only with an aux head and in training mode
    The ASPP image-pooling branch has no norm (detectron2's ASPP), so batch 1 and any input size work.
    Decoder convs and norms are separate modules; ``decode(x, norms=...)`` can run them with another norm set
    (DDFP's perturbed-feature BN).
    """


    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        low_level_feature: str = "res2",
        in_feature: str = "res5",
        project_channels: int = 48,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        convs_dim: int = 256,
        decoder_dropout: float = 0.1,
        norm: str = "BN",
        aux_head: Optional[AuxFCNHead] = None,
        aux_in_feature: str = "res4",
    ):
        super().__init__()
        check_in_features(input_shape, (low_level_feature, in_feature))
        self.low_level_feature = low_level_feature
        self.in_feature = in_feature
        self.aux_in_feature = aux_in_feature
        self.num_classes = num_classes
        self.feature_dim = convs_dim
        self.decoder_input_dim = aspp_channels + project_channels
        use_bias = norm == ""
        self.aspp = ASPP(
            input_shape[in_feature].channels,
            aspp_channels,
            list(aspp_dilations),
            norm=norm,
            activation=F.relu,
            dropout=aspp_dropout,
        )
        self.project = Conv2d(
            input_shape[low_level_feature].channels,
            project_channels,
            1,
            bias=use_bias,
            norm=get_norm(norm, project_channels),
            activation=F.relu,
        )
        weight_init.c2_xavier_fill(self.project)
        self.decoder_convs = nn.ModuleList()
        self.decoder_norms = nn.ModuleList()
        in_ch = self.decoder_input_dim
        for _ in range(2):
            conv = nn.Conv2d(in_ch, convs_dim, 3, padding=1, bias=use_bias)
            weight_init.c2_msra_fill(conv)
            self.decoder_convs.append(conv)
            self.decoder_norms.append(get_norm(norm, convs_dim) or nn.Identity())
            in_ch = convs_dim
        self.dropout = nn.Dropout2d(decoder_dropout)
        self.predictor = nn.Conv2d(convs_dim, num_classes, 1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)
        self.aux_head = aux_head

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return v3plus_kwargs_from_config(cfg, input_shape, cls.__name__)

    def spec(self) -> HeadSpec:
        """What the loss terms read from this head: its widths and its ``decode``."""
        return HeadSpec(type(self).__name__, self.num_classes, self.feature_dim, self.decoder_input_dim, self.decode,
                        len(self.decoder_norms))

    def decode(self, decoder_input: torch.Tensor, norms: Optional[Sequence[nn.Module]] = None):
        """``decoder_input: [B, decoder_input_dim, h, w]`` -> ``(features [B, D, h, w], logits [B, C, h, w])``.

        ``norms`` replaces ``self.decoder_norms`` (same length), e.g. a second BN set for perturbed inputs.
        """
        norms = self.decoder_norms if norms is None else norms
        x = decoder_input
        for conv, norm in zip(self.decoder_convs, norms):
            x = F.relu(norm(conv(x)))
        return x, self.predictor(self.dropout(x))

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        low = self.project(features[self.low_level_feature])
        high = self.aspp(features[self.in_feature])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        decoder_input = torch.cat([high, low], dim=1)
        feats, logits = self.decode(decoder_input)
        out = {"logits": logits, "features": feats, "decoder_input": decoder_input}
        if self.aux_head is not None and self.training:
            out["aux_logits"] = self.aux_head(features[self.aux_in_feature])
        return out
