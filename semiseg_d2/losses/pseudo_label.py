"""The ``pseudo_label`` term: cross-entropy of the student on strong (mixed) views against the teacher, with the
FixMatch/UniMatch threshold or U2PL/DGCL entropy-quantile filter (layers/label_ops.py) and Alonso's p^s weights.
"""
import math

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import NON_NEGATIVE, UNIT, PERCENT, ITERATION, declare
from ..layers.label_ops import class_balanced_keep_mask, entropy_keep_mask, threshold_keep_mask
from ..utils.dtype import upcast
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm


def rampup_factor(kind: str, iteration: int, start: int, length: int) -> float:
    """Weight ramp after ``start``: "none" -> 1; "linear"; "sigmoid" = exp(-5 (1 - t)^2) (Laine & Aila)."""
    if kind == "none" or length <= 0:
        return 1.0
    t = min(max((iteration - start) / length, 0.0), 1.0)
    if kind == "linear":
        return t
    if kind == "sigmoid":
        return math.exp(-5.0 * (1.0 - t) ** 2)
    raise ValueError(f"SEMI.PSEUDO_LABEL.RAMPUP: unknown '{kind}'; known: none, linear, sigmoid")


def pseudo_label_cross_entropy(
    logits: torch.Tensor,
    pseudo_label: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    pixel_weight: torch.Tensor = None,
    normalize: str = "all",
) -> torch.Tensor:
    """Cross-entropy of ``logits [B,C,h,w]`` (upsampled to the label size) against ``pseudo_label
    long[B,H,W]`` on ``keep`` pixels, optionally weighted per pixel (``pixel_weight [B,H,W]``).

    normalize: "all" divides the sum by the number of ``valid`` pixels (UniMatch: filtered pixels
    count as zero loss), "kept" by the number of kept pixels, "u2pl" reproduces U2PL/DGCL: the mean
    over kept pixels times ``B*H*W / kept`` (their loss grows as fewer pixels are kept).
    Never NaN (0 when nothing is kept).
    """
    if logits.shape[-2:] != pseudo_label.shape[-2:]:
        logits = F.interpolate(logits, size=pseudo_label.shape[-2:], mode="bilinear", align_corners=False)
    target = torch.where(keep, pseudo_label, torch.zeros_like(pseudo_label))
    ce = F.cross_entropy(upcast(logits), target, reduction="none")
    w = keep.float() if pixel_weight is None else keep.float() * pixel_weight.float()
    if normalize == "all":
        denom = valid.sum()
    elif normalize == "kept":
        denom = keep.sum()
    elif normalize == "u2pl":
        kept = keep.sum().clamp_min(1).float()
        return (ce * w).sum() / kept * (keep.numel() / kept)
    else:
        raise ValueError(f"SEMI.PSEUDO_LABEL.NORMALIZE: unknown '{normalize}'; known: all, kept, u2pl")
    return (ce * w).sum() / denom.clamp_min(1).float()


def add_pseudo_label_config(cfg) -> None:
    """Declare ``SEMI.PSEUDO_LABEL.*``, the keys of the ``pseudo_label`` term (``add_semiseg_config`` calls this)."""
    # pseudo_label term: CE of the student on strong (mixed) views against the teacher's pseudo-labels
    cfg.SEMI.PSEUDO_LABEL = CN()
    declare(cfg, "SEMI.PSEUDO_LABEL.WEIGHT", 1.0, NON_NEGATIVE)
    # "none", "threshold" (keep confidence >= THRESHOLD, FixMatch/UniMatch) or
    # "entropy" (drop the DROP_PERCENT * (1 - t) % highest-entropy pixels, U2PL/DGCL; t = progress of the
    # semi-supervised phase, 0 at the end of BURN_IN_ITERS) or
    # "class_balanced" (keep confidence >= THRESHOLD, or within the CLASS_KEEP_FRACTION most confident pixels of
    # the pixel's pseudo-label class in the batch: CBST-style class-wise thresholds min(THRESHOLD, q_c))
    cfg.SEMI.PSEUDO_LABEL.FILTER = "threshold"
    declare(cfg, "SEMI.PSEUDO_LABEL.THRESHOLD", 0.95, UNIT)
    declare(cfg, "SEMI.PSEUDO_LABEL.CLASS_KEEP_FRACTION", 0.5, UNIT)
    declare(cfg, "SEMI.PSEUDO_LABEL.DROP_PERCENT", 20.0, PERCENT)
    # s > 0: weight each pixel by p^s (Alonso et al., s = 6)
    declare(cfg, "SEMI.PSEUDO_LABEL.CONF_POWER", 0.0, NON_NEGATIVE)
    # Loss normalisation: "all" divides by every valid unlabeled pixel (UniMatch), "kept" by kept ones,
    # "u2pl" = mean over kept x (B*H*W / kept), what U2PL/DGCL's code computes (docs/methods/dgcl.md).
    cfg.SEMI.PSEUDO_LABEL.NORMALIZE = "all"
    cfg.SEMI.PSEUDO_LABEL.RAMPUP = "none"  # "none", "sigmoid" (exp(-5(1-t)^2)) or "linear"
    declare(cfg, "SEMI.PSEUDO_LABEL.RAMPUP_ITERS", 0, ITERATION)  # ramp length after burn-in
    declare(cfg, "SEMI.PSEUDO_LABEL.START_ITER", 0, ITERATION)  # term is zero before this iteration (Alonso: 2000)


FILTERS = ("none", "threshold", "entropy", "class_balanced")


@SEMI_LOSS_REGISTRY.register_term
class PseudoLabelTerm(SemiLossTerm):
    """``pseudo_label``: the Mean-Teacher / FixMatch consistency term on strong (mixed) views."""

    name = "pseudo_label"

    @configurable
    def __init__(
        self,
        *,
        weight: float,
        filter: str,
        threshold: float,
        drop_percent: float,
        conf_power: float,
        normalize: str,
        rampup: str,
        rampup_iters: int,
        start_iter: int,
        num_classes: int = 0,
        class_keep_fraction: float = 0.5,
    ):
        super().__init__()
        if filter not in FILTERS:
            raise ValueError(f"SEMI.PSEUDO_LABEL.FILTER: unknown '{filter}'; known: {', '.join(FILTERS)}")
        if filter == "class_balanced" and num_classes < 1:
            raise ValueError("SEMI.PSEUDO_LABEL.FILTER 'class_balanced' needs the number of classes (num_classes >= 1)")
        rampup_factor(rampup, 0, 0, 1)  # validates the name early
        self.weight = weight
        self.filter = filter
        self.threshold = threshold
        self.drop_percent = drop_percent
        self.conf_power = conf_power
        self.normalize = normalize
        self.rampup = rampup
        self.rampup_iters = rampup_iters
        self.start_iter = start_iter
        self.num_classes = num_classes
        self.class_keep_fraction = class_keep_fraction

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.PSEUDO_LABEL
        return dict(
            weight=c.WEIGHT,
            filter=c.FILTER,
            threshold=c.THRESHOLD,
            drop_percent=c.DROP_PERCENT,
            conf_power=c.CONF_POWER,
            normalize=c.NORMALIZE,
            rampup=c.RAMPUP,
            rampup_iters=c.RAMPUP_ITERS,
            start_iter=c.START_ITER,
            num_classes=spec.num_classes,
            class_keep_fraction=c.CLASS_KEEP_FRACTION,
        )

    def keep_mask(self, teacher: dict, valid: torch.Tensor, progress: float) -> torch.Tensor:
        if self.filter == "threshold":
            return threshold_keep_mask(teacher["confidence"], valid, self.threshold)
        if self.filter == "entropy":
            return entropy_keep_mask(teacher["entropy"], valid, self.drop_percent * (1.0 - progress))
        if self.filter == "class_balanced":
            return class_balanced_keep_mask(teacher["confidence"], teacher["pseudo_label"], valid, self.threshold,
                                            self.num_classes, self.class_keep_fraction)
        return valid

    def forward(self, step):
        t = step.teacher_strong
        valid = t["valid"]
        keep = self.keep_mask(t, valid, step.semi_progress)
        step.keep_masks[self.name] = keep
        pixel_weight = t["confidence"] ** self.conf_power if self.conf_power > 0 else None
        class_weight = step.pixel_class_weights(t["pseudo_label"])
        if class_weight is not None:
            pixel_weight = class_weight if pixel_weight is None else pixel_weight * class_weight
        loss = pseudo_label_cross_entropy(
            step.student_strong["logits"], t["pseudo_label"], keep, valid, pixel_weight, self.normalize
        )
        scale = self.weight * rampup_factor(
            self.rampup, step.iteration, max(self.start_iter, step.burn_in_iters), self.rampup_iters
        )
        if step.iteration < self.start_iter:
            scale = 0.0  # kept in the graph so every rank uses the same parameters
        step.log("pseudo_label/kept_ratio", keep.sum() / valid.sum().clamp_min(1))
        return {"loss_pseudo_label": loss * scale}
