"""Tensor ops on label maps shared by the loss terms and the meta-architecture: nearest resizing of labels and
masks, the softmax entropy, and the pseudo-label filters (FixMatch/UniMatch confidence threshold, U2PL/DGCL
entropy quantile, CBST-style class-wise confidence quantile). Pure functions, no host syncs.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from ..utils.dtype import upcast

__all__ = ["resize_labels", "softmax_entropy", "threshold_keep_mask", "entropy_keep_mask", "class_quantile_thresholds",
           "class_balanced_keep_mask"]


def resize_labels(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a label map or mask ``[B, H, W]`` (long, bool, ...) to ``size`` -> ``[B, h, w]``, same dtype:
    Alonso et al., DGCL and DDFP compare features at the head's stride and down-sample the labels this way, never
    the reverse. Ignore values survive unchanged; no-op when the size already matches."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)


def softmax_entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy ``-sum p log p`` over ``dim`` (``probs [B,C,H,W]`` -> ``[B,H,W]``), computed in fp32."""
    p = upcast(probs)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def threshold_keep_mask(confidence: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep valid pixels whose teacher confidence is ``>= threshold`` (FixMatch/UniMatch).

    confidence: [B,H,W] float; valid: [B,H,W] bool -> [B,H,W] bool.
    """
    return valid & (confidence >= threshold)


def entropy_keep_mask(entropy: torch.Tensor, valid: torch.Tensor, drop_percent) -> torch.Tensor:
    """Drop the ``drop_percent`` % highest-entropy valid pixels of the whole batch (U2PL/DGCL).

    Exactly ``floor(n_valid * drop_percent / 100)`` pixels are dropped (ties broken by position), so a
    constant map is handled like any other. U2PL thresholds at ``np.percentile`` with ``>=``, which drops
    the maximum pixel(s) even at 0 %; the rank form here drops none at 0 % and needs no host sync.

    entropy: [B,H,W] float; valid: [B,H,W] bool; drop_percent: float or 0-d tensor -> [B,H,W] bool.
    """
    entropy = upcast(entropy)
    flat = torch.where(valid, entropy, torch.full_like(entropy, float("-inf")))
    flat = flat.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    n_valid = valid.sum()
    n_drop = torch.floor(n_valid.to(torch.float64) * float(drop_percent) / 100.0).long()
    return valid & (rank >= n_drop).view_as(valid)


def class_quantile_thresholds(
    confidence: torch.Tensor, pseudo_label: torch.Tensor, valid: torch.Tensor, num_classes: int, keep_fraction: float
) -> torch.Tensor:
    """Per-class confidence thresholds that keep the most confident ``keep_fraction`` of each class's valid pixels:
    ``[C]``, the confidence of the ``ceil(keep_fraction * n_c)``-th most confident valid pixel labelled ``c``
    (CBST, Zou et al. ECCV 2018, class-balanced self-training, with the quantile over the batch instead of the
    dataset); ``+inf`` for a class with no valid pixel (nothing to keep) or ``keep_fraction`` 0.

    One sort of the batch by (class, confidence), no per-class loop, no host sync.
    confidence: [B,H,W] float; pseudo_label: [B,H,W] long in [0, C); valid: [B,H,W] bool.
    """
    conf = upcast(confidence).flatten()
    label = pseudo_label.flatten()
    ok = valid.flatten()
    # classes in blocks (invalid pixels in a block C past the last), descending confidence inside each block
    block = torch.where(ok, label, torch.full_like(label, num_classes))
    key = block.to(torch.float64) * 4.0 - conf.to(torch.float64).clamp(0.0, 1.0)
    sorted_conf = conf[torch.argsort(key)]
    counts = torch.bincount(block, minlength=num_classes + 1)[:num_classes]
    starts = torch.cumsum(counts, 0) - counts
    n_keep = torch.ceil(counts.to(torch.float64) * float(keep_fraction)).long()
    index = (starts + n_keep - 1).clamp(0, max(conf.numel() - 1, 0))
    thresholds = sorted_conf[index] if conf.numel() else torch.zeros(num_classes, device=conf.device)
    return torch.where(n_keep > 0, thresholds, torch.full_like(thresholds, float("inf")))


def class_balanced_keep_mask(
    confidence: torch.Tensor,
    pseudo_label: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    num_classes: int,
    keep_fraction: float,
) -> torch.Tensor:
    """Keep a valid pixel when its confidence reaches ``threshold`` (the FixMatch rule) OR lies in the top
    ``keep_fraction`` of its pseudo-label's class in the batch (:func:`class_quantile_thresholds`), i.e. class ``c``
    uses ``min(threshold, q_c)``. A from-scratch teacher is confident only on its majority classes (road, sky):
    a global threshold then keeps almost nothing of the others, and the per-class quantile gives every predicted
    class a share of the kept pixels. ``keep_fraction`` 0 is the plain threshold.
    """
    q = class_quantile_thresholds(confidence, pseudo_label, valid, num_classes, keep_fraction)
    per_pixel = torch.clamp(q, max=float(threshold))[pseudo_label.clamp(0, num_classes - 1)]
    return valid & (upcast(confidence) >= per_pixel)
