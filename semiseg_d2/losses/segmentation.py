"""Pixel-wise segmentation losses (pure functions, shared by Segmentor and the semi-supervised terms).

Both functions upsample ``logits`` (bilinear, align_corners=False) to the label size first and compute the
loss in float32; a batch without any kept pixel gives 0 (with a graph), never NaN.
"""
from typing import Optional

import torch
from torch.nn import functional as F

from ..utils.dtype import upcast

__all__ = ["upsample_logits", "sem_seg_cross_entropy", "ohem_cross_entropy"]


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """``logits: [B, C, h, w]`` -> ``[B, C, *size]`` float32 (no-op resize when the size already matches)."""
    logits = upcast(logits)
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def sem_seg_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_value: int = 255,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored pixels.

    Args:
        logits: ``[B, C, h, w]`` float, any stride (upsampled to the target size).
        target: ``[B, H, W]`` long, ``ignore_value`` marks pixels without a label.
        weight: optional ``[B, H, W]`` float per-pixel weight; the loss is
            ``sum(weight * ce over valid) / #valid`` (confidence-weighted pseudo-labels keep the plain count).
    Returns:
        scalar tensor; 0 when every pixel is ignored.
    """
    logits = upsample_logits(logits, target.shape[-2:])
    valid = target != ignore_value
    ce = F.cross_entropy(logits, target.masked_fill(~valid, 0), reduction="none")
    if weight is not None:
        ce = ce * weight.to(ce.dtype)
    ce = ce * valid
    return ce.sum() / valid.sum().clamp(min=1)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_value: int = 255,
    thresh: float = 0.7,
    min_kept: int = 100000,
) -> torch.Tensor:
    """Online hard example mining cross-entropy (PSPNet / U2PL / DGCL ``OhemCrossEntropy2d`` semantics).

    A valid pixel is kept when the softmax probability of its ground-truth class is below ``thresh``,
    or when it is among the ``min_kept`` lowest such probabilities of the batch (ties at the cut-off are
    kept); with fewer than ``min_kept`` valid pixels every valid pixel is kept. The loss is the mean CE over
    kept pixels. Selection uses one ``kthvalue`` and no host synchronisation.

    Args:
        logits: ``[B, C, h, w]`` float; target: ``[B, H, W]`` long.
    Returns:
        scalar tensor; 0 when no pixel is valid.
    """
    logits = upsample_logits(logits, target.shape[-2:])
    valid = target != ignore_value
    safe_target = target.masked_fill(~valid, 0)
    ce = F.cross_entropy(logits, safe_target, reduction="none")
    with torch.no_grad():
        # p(gt) = exp(-ce); invalid pixels get 2 so that they sort after every valid one.
        gt_prob = torch.exp(-ce.detach()).masked_fill(~valid, 2.0)
        keep = gt_prob < thresh
        k = min(int(min_kept), gt_prob.numel())
        if k > 0:
            kth = gt_prob.flatten().kthvalue(k).values
            keep = keep | (gt_prob <= kth)
        keep = keep & valid
    return (ce * keep).sum() / keep.sum().clamp(min=1)
