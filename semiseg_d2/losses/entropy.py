"""Direct entropy minimisation (Alonso et al., ICCV 2021, Eq. 7): the ``entropy`` term. Paper -> code map:
docs/methods/memory_contrast.md.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from ..utils.dtype import upcast
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

__all__ = ["EntropyTerm"]


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
    def from_config(cls, cfg):
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
