"""Direct entropy minimisation (Alonso et al., ICCV 2021, Eq. 7): the ``entropy`` term. Paper -> code map:
docs/methods/memory_contrast.md.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import ITERATION, NON_NEGATIVE, declare
from ..utils.dtype import upcast
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

__all__ = ["EntropyTerm", "add_entropy_config"]


def add_entropy_config(cfg) -> None:
    """Declare ``SEMI.ENTROPY.*``, the keys of the ``entropy`` term (``add_semiseg_config`` calls this)."""
    # entropy term (losses/entropy.py): direct entropy minimisation on the strong unlabeled views (Alonso Eq. 7)
    cfg.SEMI.ENTROPY = CN()
    declare(cfg, "SEMI.ENTROPY.WEIGHT", 0.01, NON_NEGATIVE)  # lambda_ent
    declare(cfg, "SEMI.ENTROPY.START_ITER", 0, ITERATION)  # zero before this iteration (paper: from the start)
    cfg.SEMI.ENTROPY.NORMALIZE = False  # divide by log(C) (the reference code divides by log2(C)); paper: no


@SEMI_LOSS_REGISTRY.register_term
class EntropyTerm(SemiLossTerm):
    """``entropy``: direct entropy minimisation (Eq. 7) of the student's softmax on the strong (mixed) unlabeled
    views, averaged over valid pixels at crop resolution; ``NORMALIZE`` divides by log C (reference code)."""

    name = "entropy"

    @configurable
    def __init__(self, *, weight: float = 0.01, start_iter: int = 0, normalize: bool = False):
        super().__init__()
        self.weight = weight
        self.start_iter = start_iter
        self.normalize = normalize

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.ENTROPY
        return dict(weight=c.WEIGHT, start_iter=c.START_ITER, normalize=c.NORMALIZE)

    def forward(self, step) -> Dict[str, torch.Tensor]:
        logits = step.student_strong["logits"]
        valid = step.teacher_strong["valid"]
        if logits.shape[-2:] != valid.shape[-2:]:
            logits = F.interpolate(logits, size=valid.shape[-2:], mode="bilinear", align_corners=False)
        logp = F.log_softmax(upcast(logits), dim=1)
        ent = -(logp.exp() * logp).sum(1)
        loss = (ent * valid.float()).sum() / valid.sum().clamp_min(1).float()
        if self.normalize:
            loss = loss / math.log(logits.shape[1])
        scale = self.weight if step.iteration >= self.start_iter else 0.0
        return {"loss_entropy": loss * scale}
