"""DPT head (Ranftl et al. 2021) as UniMatch V2 uses it on DINOv2 (LiheYoung/UniMatch-V2 model/semseg/dpt.py).

Four ViT maps at stride 14 are reassembled to four resolutions (1x1 projection, then 4x / 2x transposed conv,
identity, stride-2 conv), brought to ``features`` channels by 3x3 convs, fused coarse to fine by four
RefineNet-style fusion blocks (two residual conv units, bilinear upsampling with ``align_corners=True``, 1x1 conv)
and classified by a 3x3 conv + ReLU + 1x1 conv. UniMatch V2's widths: S: 64, [48, 96, 192, 384];
B: 128, [96, 192, 384, 768]; L: 256, [256, 512, 1024, 1024].
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .spec import HeadSpec

__all__ = ["DPTHead", "ResidualConvUnit", "FusionBlock"]


def _norm_or_identity(norm: str, channels: int) -> nn.Module:
    return get_norm(norm, channels) or nn.Identity()


class ResidualConvUnit(nn.Module):
    """``x + conv(act(norm(conv(act(x)))))``-style unit: ReLU, 3x3 conv (+ norm), ReLU, 3x3 conv (+ norm), skip."""

    def __init__(self, channels: int, norm: str = ""):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.norm1 = _norm_or_identity(norm, channels)
        self.norm2 = _norm_or_identity(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official unit uses ReLU(inplace=False) on its input: x itself is not modified.
        out = self.norm1(self.conv1(F.relu(x)))
        out = self.norm2(self.conv2(F.relu(out)))
        return out + x


class FusionBlock(nn.Module):
    """``out_conv(upsample(unit2(x + unit1(skip))))``; upsampled to ``size`` or by 2 (bilinear, align_corners).

    ``with_skip=False`` (the coarsest block, which has no skip input) builds no ``unit1``: the official code builds
    one and never uses it (hence its DDP ``find_unused_parameters=True``).
    """

    def __init__(self, channels: int, norm: str = "", with_skip: bool = True):
        super().__init__()
        self.unit1 = ResidualConvUnit(channels, norm) if with_skip else None
        self.unit2 = ResidualConvUnit(channels, norm)
        self.out_conv = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, size=None) -> torch.Tensor:
        if skip is not None:
            if self.unit1 is None:
                raise ValueError("FusionBlock built with with_skip=False got a skip input")
            x = x + self.unit1(skip)
        x = self.unit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


@SEM_SEG_HEADS_REGISTRY.register()
class DPTHead(nn.Module):
    """DPT decoder on 4 same-stride ViT maps; logits and decoder features at 8x the token grid.

    ``forward(features)`` (token grid ``h x w`` = input / 14) returns
      "logits":        [B, num_classes, 8h, 8w]   (stride 1.75; the losses upsample them to the label size)
      "features":      [B, features, 8h, 8w]      the ReLU'd 3x3 conv output that feeds the 1x1 classifier
      "decoder_input": [B, features, 8h, 8w]      the fused map that enters that 3x3 conv (DDFP perturbs it)
    ``decode(decoder_input, norms=None) -> (features, logits)`` runs the 3x3 conv (+ norm) + ReLU and the
    classifier, like ``DeepLabV3PlusFeatHead.decode``; ``decoder_norms`` has one entry (Identity without a norm).
    :meth:`spec` tells a loss term its widths, ``decode`` and how many norms ``decode`` takes.
    ``norm=""`` is UniMatch V2's ``use_bn=False``; "BN"/"SyncBN" add a norm after every 3x3 conv of the units
    and after the decoder conv.
    """


    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
        features: int = 128,
        out_channels: Sequence[int] = (96, 192, 384, 768),
        norm: str = "",
    ):
        super().__init__()
        if len(in_features) != 4 or len(out_channels) != 4:
            raise ValueError(
                f"DPTHead needs 4 input features and 4 widths: MODEL.SEM_SEG_HEAD.IN_FEATURES={list(in_features)}, "
                f"PROJECT_CHANNELS={list(out_channels)}"
            )
        for name in in_features:
            if name not in input_shape:
                raise ValueError(
                    f"MODEL.SEM_SEG_HEAD.IN_FEATURES: {name!r} is not a backbone output {sorted(input_shape)}"
                )
        strides = {input_shape[n].stride for n in in_features}
        if len(strides) != 1:
            raise ValueError(f"DPTHead: input features need one stride, got {sorted(strides)}")
        self.in_features = tuple(in_features)
        self.num_classes = num_classes
        self.feature_dim = features
        self.decoder_input_dim = features
        c = list(out_channels)
        self.projects = nn.ModuleList(nn.Conv2d(input_shape[n].channels, w, 1) for n, w in zip(in_features, c))
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
        ])
        self.layer_rn = nn.ModuleList(nn.Conv2d(w, features, 3, padding=1, bias=False) for w in c)
        # [0] finest .. [3] coarsest (official refinenet1 .. refinenet4)
        self.refinenets = nn.ModuleList(FusionBlock(features, norm, with_skip=i < 3) for i in range(4))
        self.decoder_convs = nn.ModuleList([nn.Conv2d(features, features, 3, padding=1)])
        self.decoder_norms = nn.ModuleList([_norm_or_identity(norm, features)])
        self.predictor = nn.Conv2d(features, num_classes, 1)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "num_classes": head.NUM_CLASSES,
            "in_features": head.IN_FEATURES,
            "features": head.CONVS_DIM,
            "out_channels": head.PROJECT_CHANNELS,
            "norm": head.NORM,
        }

    def spec(self) -> HeadSpec:
        """What the loss terms read from this head: its widths and its ``decode``."""
        return HeadSpec(type(self).__name__, self.num_classes, self.feature_dim, self.decoder_input_dim, self.decode,
                        len(self.decoder_norms))

    def decode(self, decoder_input: torch.Tensor, norms: Optional[Sequence[nn.Module]] = None):
        """``decoder_input: [B, features, h, w]`` -> ``(features [B, features, h, w], logits [B, C, h, w])``."""
        norms = self.decoder_norms if norms is None else norms
        x = decoder_input
        for conv, norm in zip(self.decoder_convs, norms):
            x = F.relu(norm(conv(x)))
        return x, self.predictor(x)

    def fuse(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The four maps -> the fused map ``[B, features, 8h, 8w]`` (the decoder input)."""
        layers = [
            rn(resize(project(features[name])))
            for name, project, resize, rn in zip(self.in_features, self.projects, self.resize_layers, self.layer_rn)
        ]
        r = self.refinenets
        path = r[3](layers[3], size=layers[2].shape[-2:])
        path = r[2](path, layers[2], size=layers[1].shape[-2:])
        path = r[1](path, layers[1], size=layers[0].shape[-2:])
        return r[0](path, layers[0])

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        decoder_input = self.fuse(features)
        feats, logits = self.decode(decoder_input)
        return {"logits": logits, "features": feats, "decoder_input": decoder_input}
