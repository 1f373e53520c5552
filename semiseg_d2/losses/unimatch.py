"""UniMatch (Yang et al., CVPR 2023, V1): weak-to-strong consistency on two strong streams and one feature-
perturbed stream. Paper -> code map and where we differ from the official code: docs/methods/unimatch.md.

The official total loss is ``(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2``. Here ``L_x`` is the ``supervised``
term (its weight ``SEMI.SUPERVISED.WEIGHT`` 0.5 in the UniMatch configs) and this term returns the three
unlabeled parts, each already multiplied by its weight and by ``SEMI.UNIMATCH.LOSS_SCALE`` (0.5). Every part is
the official normalisation: the cross-entropy summed over the pixels whose teacher confidence is
``>= THRESHOLD`` divided by the number of non-ignored pixels of that stream (after mixing), not by the kept ones.
"""
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import NON_NEGATIVE, UNIT, UNIT_OPEN, declare
from ..layers.label_ops import threshold_keep_mask
from .pseudo_label import pseudo_label_cross_entropy
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm


def unimatch_stream_loss(logits: torch.Tensor, teacher: dict, threshold: float):
    """One stream's loss: ``sum(CE * [conf >= threshold] * valid) / sum(valid)`` (UniMatch's ``criterion_u``
    with ``reduction='none'``, masked, over the stream's non-ignored pixels). ``teacher``: ``pseudo_label``,
    ``confidence``, ``valid`` at crop size; ``logits [B,C,h,w]`` are upsampled to it. Returns (loss, keep)."""
    keep = threshold_keep_mask(teacher["confidence"], teacher["valid"], threshold)
    loss = pseudo_label_cross_entropy(logits, teacher["pseudo_label"], keep, teacher["valid"], normalize="all")
    return loss, keep


def add_unimatch_config(cfg) -> None:
    """Declare ``SEMI.UNIMATCH.*``, the keys of the ``unimatch`` term (``add_semiseg_config`` calls this)."""
    # unimatch term (losses/unimatch.py, docs/methods/unimatch.md): Yang et al. CVPR 2023 (V1). The official total
    # (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 = SEMI.SUPERVISED.WEIGHT 0.5 (the configs) + LOSS_SCALE * (...).
    # Each part: CE summed over pixels with teacher confidence >= THRESHOLD / the stream's non-ignored pixels.
    # Asks the engine for the second strong stream and (FP_DROPOUT > 0) the feature-perturbation stream.
    cfg.SEMI.UNIMATCH = CN()
    # conf_thresh (official: VOC 0.95; Cityscapes 0 in the current code)
    declare(cfg, "SEMI.UNIMATCH.THRESHOLD", 0.95, UNIT)
    declare(cfg, "SEMI.UNIMATCH.WEIGHT_S1", 0.25, NON_NEGATIVE)  # first strong stream (image_strong, boxes mix_mask)
    declare(cfg, "SEMI.UNIMATCH.WEIGHT_S2", 0.25, NON_NEGATIVE)  # second strong stream (image_strong2, boxes mix_mask2)
    # feature-perturbed weak view (must be 0 when FP_DROPOUT is 0)
    declare(cfg, "SEMI.UNIMATCH.WEIGHT_FP", 0.5, NON_NEGATIVE)
    declare(cfg, "SEMI.UNIMATCH.LOSS_SCALE", 0.5, NON_NEGATIVE)  # the official "/ 2", on the three parts above
    # Dropout2d p on the weak view's backbone features (0 = no fp stream)
    declare(cfg, "SEMI.UNIMATCH.FP_DROPOUT", 0.5, UNIT_OPEN)


@SEMI_LOSS_REGISTRY.register_term
class UniMatchTerm(SemiLossTerm):
    """``unimatch``: ``loss_unimatch_s1`` / ``_s2`` (the two mixed strong views against the mixed teacher maps)
    and ``loss_unimatch_fp`` (the feature-perturbed weak view against the weak view's own teacher maps)."""

    name = "unimatch"
    needs_second_strong = True

    @configurable
    def __init__(
        self,
        *,
        threshold: float = 0.95,
        weight_s1: float = 0.25,
        weight_s2: float = 0.25,
        weight_fp: float = 0.5,
        loss_scale: float = 0.5,
        fp_dropout: float = 0.5,
    ):
        super().__init__()
        if not 0.0 <= fp_dropout < 1.0:
            raise ValueError(f"SEMI.UNIMATCH.FP_DROPOUT must lie in [0, 1), got {fp_dropout}")
        if fp_dropout == 0.0 and weight_fp != 0.0:
            raise ValueError(
                f"SEMI.UNIMATCH.FP_DROPOUT 0 turns the feature-perturbation stream off, but SEMI.UNIMATCH.WEIGHT_FP "
                f"is {weight_fp}: set it to 0 too"
            )
        self.threshold = threshold
        self.weights = {"s1": weight_s1, "s2": weight_s2, "fp": weight_fp}
        self.loss_scale = loss_scale
        self.feature_dropout = fp_dropout  # read by the engine: the fp stream runs when > 0

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.UNIMATCH
        return dict(
            threshold=c.THRESHOLD,
            weight_s1=c.WEIGHT_S1,
            weight_s2=c.WEIGHT_S2,
            weight_fp=c.WEIGHT_FP,
            loss_scale=c.LOSS_SCALE,
            fp_dropout=c.FP_DROPOUT,
        )

    def forward(self, step):
        if not step.student_strong2:
            raise ValueError("SEMI.LOSSES 'unimatch' needs the second strong stream (SemiStep.student_strong2)")
        s1, keep = unimatch_stream_loss(step.student_strong["logits"], step.teacher_strong, self.threshold)
        s2, _ = unimatch_stream_loss(step.student_strong2["logits"], step.teacher_strong2, self.threshold)
        step.keep_masks[self.name] = keep
        losses = {"loss_unimatch_s1": s1, "loss_unimatch_s2": s2}
        if self.feature_dropout > 0:
            fp, keep_w = unimatch_stream_loss(step.student_weak_fp["logits"], step.teacher_weak, self.threshold)
            losses["loss_unimatch_fp"] = fp
            # UniMatch's "mask ratio": confident share of the weak view's non-ignored pixels.
            step.log("unimatch/mask_ratio", keep_w.sum() / step.teacher_weak["valid"].sum().clamp_min(1))
        return {k: v * (self.weights[k.rsplit("_", 1)[1]] * self.loss_scale) for k, v in losses.items()}
