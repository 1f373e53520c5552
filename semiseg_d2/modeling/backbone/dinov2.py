"""DINOv2 ViT backbone (Oquab et al. 2023) on timm, tapping the blocks UniMatch V2's DPT head reads.

* :class:`D2DinoV2` (``MODEL.BACKBONE.NAME: "D2DinoV2"``, keys ``MODEL.DINOV2.*``): ViT-S/B/L with patch 14, with or without 4 registers
  (timm's ``vit_{small,base,large}_patch14[_reg4]_dinov2``). ``forward(x: float[B, 3, H, W])`` with ``H, W``
  multiples of 14 returns ``{"layer1".."layer4": float[B, D, H/14, W/14]}``: the patch tokens after the final
  LayerNorm of the tapped blocks (UniMatch V2 / DINOv2 ``get_intermediate_layers(x, idx, norm=True)``).
  ``size_divisibility`` is 14: the meta-architecture pads to it (Mask2Former's contract).
* Position embeddings are resampled to the input grid exactly as the official code does (bicubic with
  ``scale_factor = (grid + offset) / sqrt(N)``, offset 0.1, no antialiasing), not with timm's size-based resampling:
  at any grid other than the 37 x 37 of pre-training the two differ.
* :func:`convert_official_dinov2` is the one place where official ``dinov2_vit*14[_reg4]_pretrain.pth`` keys become
  ours; ``SemiSegCheckpointer`` calls it when ``MODEL.WEIGHTS`` is such a file.
"""
import math
import re
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = [
    "D2DinoV2",
    "DINOV2_SIZES",
    "TAPPED_BLOCKS",
    "convert_official_dinov2",
    "is_official_dinov2",
    "resample_patch_pos_embed",
    "timm_model_name",
]

PATCH_SIZE = 14
DINOV2_SIZES = ("small", "base", "large")
# Blocks whose outputs feed the DPT head (UniMatch V2 model/semseg/dpt.py: intermediate_layer_idx).
TAPPED_BLOCKS = {"small": (2, 5, 8, 11), "base": (2, 5, 8, 11), "large": (4, 11, 17, 23)}
FEATURE_NAMES = ("layer1", "layer2", "layer3", "layer4")
# Prefix of the timm ViT's parameters inside a Segmentor (D2DinoV2.vit under Segmentor.backbone).
SEGMENTOR_VIT_PREFIX = "backbone.vit."


def timm_model_name(size: str, registers: bool) -> str:
    """``("base", False) -> "vit_base_patch14_dinov2"``; unknown sizes name MODEL.DINOV2.SIZE."""
    if size not in DINOV2_SIZES:
        raise ValueError(f"MODEL.DINOV2.SIZE: unknown size {size!r}; known: {list(DINOV2_SIZES)}")
    return f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2"


def resample_patch_pos_embed(pos: torch.Tensor, grid: Sequence[int], offset: float = 0.1,
                             antialias: bool = False) -> torch.Tensor:
    """Official DINOv2 ``interpolate_pos_encoding`` for the patch part of the position embedding.

    ``pos: [1, N, D]`` on a square ``sqrt(N)`` grid -> ``[1, gh * gw, D]`` for ``grid = (gh, gw)``; identity when
    the grid is the pre-training one. Bicubic with ``scale_factor = (g + offset) / sqrt(N)`` as the official code
    (offset 0.1 avoids a floor error; registered models of the hub use 0.0 with antialiasing).
    """
    n, dim = pos.shape[1], pos.shape[2]
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    gh, gw = int(grid[0]), int(grid[1])
    if (gh, gw) == (side, side):
        return pos
    src = pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        src, scale_factor=((gh + offset) / side, (gw + offset) / side), mode="bicubic", antialias=antialias
    )
    if tuple(out.shape[-2:]) != (gh, gw):
        raise ValueError(
            f"MODEL.DINOV2.INTERPOLATE_OFFSET: {offset} resamples the position grid to {tuple(out.shape[-2:])}, "
            f"not {(gh, gw)}"
        )
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos.dtype)


def is_official_dinov2(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for a state dict in the layout of the official ``dinov2_vit*14*_pretrain.pth`` files."""
    return "mask_token" in state_dict and "patch_embed.proj.weight" in state_dict and "cls_token" in state_dict


def convert_official_dinov2(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Official DINOv2 keys -> timm ``VisionTransformer`` keys (with ``prefix`` prepended).

    ``mask_token`` (iBOT masking, unused downstream) is dropped. With registers, timm's layout has no class
    position: the class token absorbs its position embedding (``cls + pos[:, 0]``, the sum the official code
    adds) and ``pos_embed`` keeps the patch part; ``register_tokens`` becomes ``reg_token``. SwiGLU ``w12``/``w3``
    (ViT-g) become ``fc1``/``fc2``. Every other key is shared.
    """
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        pos = sd.pop("pos_embed")
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", key)
        out[prefix + key] = value
    return out


@BACKBONE_REGISTRY.register()
class D2DinoV2(Backbone):
    """A timm DINOv2 ViT as a detectron2 backbone: 4 tapped blocks as stride-14 maps ``layer1..layer4``.

    Args:
        vit: a timm ``VisionTransformer`` with patch 14, built with ``dynamic_img_size=True``.
        taps: indices of the 4 blocks whose (normed) patch tokens are returned, increasing.
        grad_checkpoint: recompute each block in backward (activation memory of one block instead of all).
        freeze: no gradient for the encoder (UniMatch V2's ``lock_backbone``).
        interpolate_offset / interpolate_antialias: see :func:`resample_patch_pos_embed`.
    """

    @configurable
    def __init__(self, *, vit: nn.Module, taps: Sequence[int], grad_checkpoint: bool = False, freeze: bool = False,
                 interpolate_offset: float = 0.1, interpolate_antialias: bool = False):
        super().__init__()
        depth = len(vit.blocks)
        taps = tuple(int(t) for t in taps)
        if len(taps) != len(FEATURE_NAMES) or list(taps) != sorted(set(taps)) or not 0 <= taps[0] <= taps[-1] < depth:
            raise ValueError(
                f"MODEL.DINOV2.OUT_INDICES: need 4 increasing block indices in [0, {depth}), got {list(taps)}"
            )
        if tuple(vit.patch_embed.patch_size) != (PATCH_SIZE, PATCH_SIZE):
            raise ValueError(f"DINOv2 backbone: patch size {vit.patch_embed.patch_size}, expected 14")
        self.vit = vit
        self.taps = taps
        self.grad_checkpoint = grad_checkpoint
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.embed_dim = vit.embed_dim
        self._out_features = list(FEATURE_NAMES)
        self._out_feature_channels = {n: self.embed_dim for n in FEATURE_NAMES}
        self._out_feature_strides = {n: PATCH_SIZE for n in FEATURE_NAMES}
        if freeze:
            for p in self.vit.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec = None):
        c = cfg.MODEL.DINOV2
        if input_shape is not None and input_shape.channels not in (None, 3):
            raise ValueError(f"DINOv2 backbone: needs 3 input channels, got {input_shape.channels}")
        return {
            "vit": build_dinov2_vit(cfg),
            "taps": tuple(c.OUT_INDICES) if len(c.OUT_INDICES) else TAPPED_BLOCKS[c.SIZE],
            "grad_checkpoint": c.GRAD_CHECKPOINT,
            "freeze": c.FREEZE,
            "interpolate_offset": c.INTERPOLATE_OFFSET,
            "interpolate_antialias": c.INTERPOLATE_ANTIALIAS,
        }

    @property
    def size_divisibility(self) -> int:
        return PATCH_SIZE

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": PATCH_SIZE, "square_size": 0}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self.embed_dim, stride=PATCH_SIZE) for n in FEATURE_NAMES}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, 3, H, W]`` -> ``[B, P + gh * gw, D]`` (``P`` prefix tokens: class [+ 4 registers]) with
        position embeddings added as the official ``prepare_tokens_with_masks``."""
        vit = self.vit
        patches = vit.patch_embed(x)  # [B, gh, gw, D] (dynamic_img_size)
        B, gh, gw, D = patches.shape
        pos = vit.pos_embed
        if vit.no_embed_class:  # timm's registered layout: pos_embed holds only the patch grid
            patch_pos, cls = pos, vit.cls_token
        else:
            patch_pos, cls = pos[:, vit.num_prefix_tokens:], vit.cls_token + pos[:, :1]
        patch_pos = resample_patch_pos_embed(patch_pos, (gh, gw), self.interpolate_offset, self.interpolate_antialias)
        prefix = [cls.expand(B, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(B, -1, -1))
        return torch.cat(prefix + [patches.reshape(B, gh * gw, D) + patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        H, W = x.shape[-2:]
        if H % PATCH_SIZE or W % PATCH_SIZE:
            raise ValueError(
                f"DINOv2 backbone: input {H}x{W} is not a multiple of {PATCH_SIZE}; the meta-architecture pads "
                "to backbone.size_divisibility"
            )
        gh, gw = H // PATCH_SIZE, W // PATCH_SIZE
        t = self.vit.norm_pre(self.tokens(x))
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        out = {}
        for i, block in enumerate(self.vit.blocks[: self.taps[-1] + 1]):
            t = checkpoint(block, t, use_reentrant=False) if use_ckpt else block(t)
            if i in self.taps:
                name = FEATURE_NAMES[self.taps.index(i)]
                patches = self.vit.norm(t)[:, self.vit.num_prefix_tokens:]
                out[name] = patches.transpose(1, 2).reshape(t.shape[0], self.embed_dim, gh, gw)
        return out


def build_dinov2_vit(cfg) -> nn.Module:
    """The timm ViT for ``MODEL.DINOV2`` (architecture overrides for tests; timm pretrained download if asked)."""
    import timm

    c = cfg.MODEL.DINOV2
    name = timm_model_name(c.SIZE, c.REGISTERS)  # validates SIZE before TAPPED_BLOCKS[SIZE] is read
    overrides = {k: v for k, v in (("embed_dim", c.EMBED_DIM), ("depth", c.DEPTH), ("num_heads", c.NUM_HEADS)) if v > 0}
    return timm.create_model(
        name,
        pretrained=c.TIMM_PRETRAINED,
        num_classes=0,
        dynamic_img_size=True,
        drop_path_rate=c.DROP_PATH_RATE,
        **overrides,
    )

