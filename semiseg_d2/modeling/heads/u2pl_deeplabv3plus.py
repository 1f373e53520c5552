"""DeepLabV3+ decoder of U2PL (``u2pl/models/decoder.py: dec_deeplabv3_plus``), as DGCL and DDFP train it.

It differs from :class:`DeepLabV3PlusFeatHead` (Alonso et al.'s / detectron2's shape) where the DGCL and DDFP
terms read their tensors: the 5 ASPP branches (image pooling with BN, 1x1, three dilated 3x3) are concatenated and
reduced by a 3x3 conv + BN + ReLU + Dropout2d "head" (no 1x1 projection), the 48-d low-level projection comes
FIRST in the decoder input, and each of the two 3x3 classifier blocks ends in Dropout2d, so the "features"
(U2PL/DGCL ``fts``, DDFP's flow input) are taken after dropout in training mode.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .aux_fcn import AuxFCNHead
from .deeplab_v3plus import check_in_features, v3plus_kwargs_from_config
from .spec import HeadSpec

__all__ = ["U2PLASPP", "U2PLDeepLabV3PlusHead"]


def _conv_norm_relu(in_ch: int, out_ch: int, kernel: int, norm: str, *, dilation: int = 1, bias: bool = False):
    pad = dilation * (kernel // 2)
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=bias or norm == "")
    return nn.Sequential(conv, get_norm(norm, out_ch) or nn.Identity(), nn.ReLU(inplace=True))


class U2PLASPP(nn.Module):
    """U2PL's ASPP: image pooling (1x1 conv + norm + ReLU on the pooled map), 1x1, and one dilated 3x3 per
    dilation, each conv + norm + ReLU without bias, concatenated in that order (no projection).

    ``forward(x: [B, in_channels, h, w]) -> [B, (len(dilations) + 2) * channels, h, w]``. With plain BN the
    pooling branch's norm sees one value per image and channel: training needs a batch of at least 2 per process.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int], norm: str):
        super().__init__()
        self.pool = _conv_norm_relu(in_channels, channels, 1, norm)
        self.branches = nn.ModuleList(
            [_conv_norm_relu(in_channels, channels, 1, norm)]
            + [_conv_norm_relu(in_channels, channels, 3, norm, dilation=d) for d in dilations]
        )
        self.out_channels = (len(dilations) + 2) * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        # align_corners is immaterial here: a 1x1 map upsamples to a constant either way
        out = [F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)]
        out += [branch(x) for branch in self.branches]
        return torch.cat(out, dim=1)


@SEM_SEG_HEADS_REGISTRY.register()
class U2PLDeepLabV3PlusHead(nn.Module):
    """U2PL / DGCL / DDFP DeepLabV3+ decoder (module names map 1:1 onto ``dec_deeplabv3_plus``):

      aspp (U2PLASPP) -> aspp_head: 3x3 conv (no bias) + norm + ReLU + Dropout2d(ASPP_DROPOUT)      ``head``
      project: 1x1 conv (bias, as the official) + norm + ReLU on the low-level feature              ``low_conv``
      decoder_input = cat(project(low), upsample(aspp_head(...), align_corners=True))
      2 x [3x3 conv (bias) + norm + ReLU + Dropout2d(DECODER_DROPOUT)] -> "features"                ``classifier``
      predictor: 1x1 conv -> "logits"                                                              ``final``

    Outputs as :class:`DeepLabV3PlusFeatHead` ("logits", "features", "decoder_input", "aux_logits"), and the
    same ``decode(x, norms=None)`` / ``decoder_convs`` / ``decoder_norms`` for DDFP's perturbed-BN pass. The
    official initialisation is PyTorch's default (no init code in the decoder), kept here.
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
        self.decoder_input_dim = project_channels + convs_dim
        self.norm = norm
        self.aspp = U2PLASPP(input_shape[in_feature].channels, aspp_channels, aspp_dilations, norm)
        self.aspp_head = nn.Sequential(
            *_conv_norm_relu(self.aspp.out_channels, convs_dim, 3, norm), nn.Dropout2d(aspp_dropout)
        )
        self.project = _conv_norm_relu(input_shape[low_level_feature].channels, project_channels, 1, norm, bias=True)
        self.decoder_convs = nn.ModuleList()
        self.decoder_norms = nn.ModuleList()
        in_ch = self.decoder_input_dim
        for _ in range(2):
            self.decoder_convs.append(nn.Conv2d(in_ch, convs_dim, 3, padding=1, bias=True))
            self.decoder_norms.append(get_norm(norm, convs_dim) or nn.Identity())
            in_ch = convs_dim
        self.dropout = nn.Dropout2d(decoder_dropout)  # stateless: one module serves both blocks
        self.predictor = nn.Conv2d(convs_dim, num_classes, 1)
        self.aux_head = aux_head

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return v3plus_kwargs_from_config(cfg, input_shape, cls.__name__)

    def spec(self) -> HeadSpec:
        """What the loss terms read from this head: its widths and its ``decode``."""
        return HeadSpec(type(self).__name__, self.num_classes, self.feature_dim, self.decoder_input_dim, self.decode,
                        len(self.decoder_norms))

    def decode(self, decoder_input: torch.Tensor, norms: Optional[Sequence[nn.Module]] = None):
        """``decoder_input: [B, decoder_input_dim, h, w]`` -> ``(features [B, D, h, w], logits [B, C, h, w])``;
        the features are the second block's output after its dropout (U2PL's ``fts``)."""
        norms = self.decoder_norms if norms is None else norms
        x = decoder_input
        for conv, norm in zip(self.decoder_convs, norms):
            x = self.dropout(F.relu(norm(conv(x))))
        return x, self.predictor(x)

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = features[self.in_feature]
        if self.training and self.norm == "BN" and x.shape[0] < 2:
            raise ValueError(
                "U2PLDeepLabV3PlusHead: the ASPP image-pooling branch has BN (as U2PL's), so training needs at "
                "least 2 images per process with MODEL.SEM_SEG_HEAD.NORM 'BN' (got 1); raise the batch or use SyncBN"
            )
        low = self.project(features[self.low_level_feature])
        high = self.aspp_head(self.aspp(x))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        decoder_input = torch.cat([low, high], dim=1)
        feats, logits = self.decode(decoder_input)
        out = {"logits": logits, "features": feats, "decoder_input": decoder_input}
        if self.aux_head is not None and self.training:
            out["aux_logits"] = self.aux_head(features[self.aux_in_feature])
        return out
