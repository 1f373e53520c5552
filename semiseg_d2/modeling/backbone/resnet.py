"""DeepLab ResNet backbone with an output stride instead of raw dilations.

The ResNet itself is detectron2's (``detectron2.projects.deeplab.build_resnet_deeplab_backbone``, which
supports the deep 3x(3x3) DeepLab stem, the torchvision 7x7 stem, res4/res5 dilation and res5 multi-grid);
this module only translates ``MODEL.RESNETS.OUTPUT_STRIDE`` into those dilations and validates the config.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.projects.deeplab import build_resnet_deeplab_backbone

__all__ = ["build_semiseg_resnet_backbone", "output_stride_to_dilations", "STEM_TYPES"]

# output stride -> (res4 dilation, res5 dilation); strides of res4/res5 are replaced by these dilations.
_DILATIONS = {8: (2, 4), 16: (1, 2)}
STEM_TYPES = ("deeplab", "basic")


def output_stride_to_dilations(output_stride: int):
    """8 -> (2, 4), 16 -> (1, 2); anything else is a ValueError naming MODEL.RESNETS.OUTPUT_STRIDE."""
    if output_stride not in _DILATIONS:
        raise ValueError(
            f"MODEL.RESNETS.OUTPUT_STRIDE: unsupported value {output_stride!r}; known: {sorted(_DILATIONS)}"
        )
    return _DILATIONS[output_stride]


@BACKBONE_REGISTRY.register()
def build_semiseg_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet-50/101 at ``MODEL.RESNETS.OUTPUT_STRIDE`` (8 or 16), stem ``MODEL.RESNETS.STEM_TYPE``.

    Output features are ``MODEL.RESNETS.OUT_FEATURES`` with strides res2: 4, res3: 8, res4: min(16, OS),
    res5: OS. Multi-grid ``RES5_MULTI_GRID`` multiplies the res5 dilation per block.
    """
    res = cfg.MODEL.RESNETS
    res4_dilation, res5_dilation = output_stride_to_dilations(res.OUTPUT_STRIDE)
    if res.STEM_TYPE not in STEM_TYPES:
        raise ValueError(f"MODEL.RESNETS.STEM_TYPE: unknown stem {res.STEM_TYPE!r}; known: {list(STEM_TYPES)}")
    if res.DEPTH not in (50, 101, 152):
        raise ValueError(f"MODEL.RESNETS.DEPTH: unsupported depth {res.DEPTH!r}; known: [50, 101, 152]")
    if len(res.RES5_MULTI_GRID) != 3:
        raise ValueError(
            f"MODEL.RESNETS.RES5_MULTI_GRID: need one factor per res5 block (3), got {list(res.RES5_MULTI_GRID)}"
        )
    known = ("res2", "res3", "res4", "res5")
    bad = [f for f in res.OUT_FEATURES if f not in known]
    if bad:
        raise ValueError(f"MODEL.RESNETS.OUT_FEATURES: unknown features {bad}; known: {list(known)}")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.RES4_DILATION = res4_dilation
    cfg.MODEL.RESNETS.RES5_DILATION = res5_dilation
    return build_resnet_deeplab_backbone(cfg, input_shape)
