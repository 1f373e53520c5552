"""A new loss term in one file: ``prob_consistency``, the Mean-Teacher consistency between the student's class
probabilities on the strong (mixed) views and the teacher's on the same pixels (Tarvainen & Valpola, 2017).

Importing this module registers the term; ``add_prob_consistency_config(cfg)`` declares its keys. Then
``SEMI.LOSSES: ["supervised", "pseudo_label", "prob_consistency"]`` adds it to any semi-supervised config
(docs/getting_started.md, "Add a new loss term").
"""
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY, SemiLossTerm

TYPES = ("mse", "kl")


def add_prob_consistency_config(cfg):
    """Declare ``SEMI.PROB_CONSISTENCY`` (call before merging a YAML that sets it)."""
    cfg.SEMI.PROB_CONSISTENCY = CN()
    cfg.SEMI.PROB_CONSISTENCY.WEIGHT = 1.0  # loss weight
    cfg.SEMI.PROB_CONSISTENCY.TYPE = "mse"  # "mse": sum_c (p_s - p_t)^2 (Mean Teacher); "kl": KL(p_t || p_s)


def prob_consistency(student_logits, teacher_probs, valid, kind="mse"):
    """Mean over ``valid`` pixels of a distance between student and teacher class probabilities.

    student_logits: [B,C,h,w] (upsampled bilinearly to the teacher's size); teacher_probs: [B,C,H,W];
    valid: bool [B,H,W] -> scalar (0 when no pixel is valid).
    """
    if student_logits.shape[-2:] != teacher_probs.shape[-2:]:
        student_logits = F.interpolate(
            student_logits, size=teacher_probs.shape[-2:], mode="bilinear", align_corners=False
        )
    log_p = F.log_softmax(student_logits.float(), dim=1)
    if kind == "mse":
        per_pixel = ((log_p.exp() - teacher_probs) ** 2).sum(1)
    elif kind == "kl":
        t = teacher_probs.clamp_min(1e-12)
        per_pixel = (t * (t.log() - log_p)).sum(1)
    else:
        raise ValueError(f"SEMI.PROB_CONSISTENCY.TYPE: unknown '{kind}'; known: {', '.join(TYPES)}")
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


@SEMI_LOSS_REGISTRY.register_term
class ProbConsistencyTerm(SemiLossTerm):
    """``prob_consistency``: reads ``step.student_strong["logits"]`` and ``step.teacher_strong``."""

    name = "prob_consistency"  # the SEMI.LOSSES entry

    @configurable
    def __init__(self, *, weight: float, kind: str):
        super().__init__()
        if kind not in TYPES:
            raise ValueError(f"SEMI.PROB_CONSISTENCY.TYPE: unknown '{kind}'; known: {', '.join(TYPES)}")
        self.weight = weight
        self.kind = kind

    @classmethod
    def from_config(cls, cfg, spec):  # spec: the student head's HeadSpec (widths, decode); unused here
        c = cfg.SEMI.PROB_CONSISTENCY
        return {"weight": c.WEIGHT, "kind": c.TYPE}

    def forward(self, step):
        t = step.teacher_strong  # teacher maps mixed exactly like the strong images
        loss = prob_consistency(step.student_strong["logits"], t["probs"], t["valid"], self.kind)
        return {"loss_prob_consistency": self.weight * loss}
