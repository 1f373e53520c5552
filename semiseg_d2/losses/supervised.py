"""The ``supervised`` term: the student's own supervised losses (CE / OHEM + aux head) on labeled images.

The losses themselves are computed by ``Segmentor.losses`` (one place for the supervised model and the
semi-supervised engine); ``SemiStep.supervised_losses`` is the student's bound method.
"""
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import NON_NEGATIVE, declare
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm


def add_supervised_config(cfg) -> None:
    """Declare ``SEMI.SUPERVISED.*``, the keys of the ``supervised`` term (``add_semiseg_config`` calls this)."""
    # supervised term: CE/OHEM on labeled pixels (+ aux head), as in MODEL.SEM_SEG_HEAD.LOSS_*
    cfg.SEMI.SUPERVISED = CN()
    declare(cfg, "SEMI.SUPERVISED.WEIGHT", 1.0, NON_NEGATIVE)


@SEMI_LOSS_REGISTRY.register_term
class SupervisedTerm(SemiLossTerm):
    """``supervised``: labeled loss of the student (also runs during burn-in)."""

    name = "supervised"
    needs_unlabeled = False

    @configurable
    def __init__(self, *, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, spec):
        return {"weight": cfg.SEMI.SUPERVISED.WEIGHT}

    def forward(self, step):
        weight = step.pixel_class_weights(step.labeled_targets)
        losses = step.supervised_losses(step.student_labeled, step.labeled_targets, pixel_weight=weight)
        return {k: v * self.weight for k, v in losses.items()}
