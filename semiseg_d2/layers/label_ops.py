"""Tensor ops on label maps shared by the loss terms and the meta-architecture: nearest resizing of labels and
masks, the softmax entropy, and the pseudo-label filters (FixMatch/UniMatch confidence threshold, U2PL/DGCL
entropy quantile). Pure functions, no host syncs.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from ..utils.dtype import upcast

__all__ = ["resize_labels", "softmax_entropy", "threshold_keep_mask", "entropy_keep_mask"]


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
