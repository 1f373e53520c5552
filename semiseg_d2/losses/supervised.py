"""The ``supervised`` term: the student's own supervised losses (CE / OHEM + aux head) on labeled images.

The losses themselves are computed by ``Segmentor.losses`` (one place for the supervised model and the
semi-supervised engine); ``SemiStep.supervised_losses`` is the student's bound method.
"""
from detectron2.config import configurable

from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm


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
    def from_config(cls, cfg):
        return {"weight": cfg.SEMI.SUPERVISED.WEIGHT}

    def forward(self, step):
        weight = step.pixel_class_weights(step.labeled_targets)
        losses = step.supervised_losses(step.student_labeled, step.labeled_targets, pixel_weight=weight)
        return {k: v * self.weight for k, v in losses.items()}
