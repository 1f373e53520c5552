"""Class balancing of the cross-entropy terms (Alonso et al., ICCV 2021, Eq. 3 and Sec. 4.2): the ``class_balance``
term. It returns no loss: it estimates class frequencies from ground-truth labels AND teacher pseudo-labels and
publishes ``alpha_c = sqrt(f_median / f_c)`` as ``step.class_weights [C]`` for the terms listed after it
(``supervised``, ``pseudo_label``), which multiply each pixel's CE by ``alpha[target]`` (paper: alpha^c in H).
"""
from typing import Dict

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import UNIT_OPEN, ITERATION, declare
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

__all__ = ["median_frequency_weights", "ClassBalanceTerm"]


def median_frequency_weights(counts: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """``alpha_c = (f_median / f_c) ** power`` from per-class pixel counts ``[C]`` (any scale: only ratios matter).

    f_median is the median over all C classes (the paper's f_m; torch's lower median for even C). Classes never
    seen (count 0) get weight 1, and so does every class before anything was counted. fp32, no host sync.
    """
    counts = counts.float()
    f_m = counts.median()
    seen = counts > 0
    alpha = (f_m / counts.clamp_min(1e-12)) ** power
    return torch.where(seen & (f_m > 0), alpha, torch.ones_like(alpha))


def add_class_balance_config(cfg) -> None:
    """Declare ``SEMI.CLASS_BALANCE.*``, the keys of the ``class_balance`` term (``add_semiseg_config`` calls this)."""
    # class_balance term (losses/class_balance.py): CE class weights alpha_c = sqrt(f_median / f_c) for the terms
    # listed after it (supervised, pseudo_label) from labels + pseudo-labels (Alonso: Cityscapes/GTA5 on, VOC off)
    cfg.SEMI.CLASS_BALANCE = CN()
    declare(cfg, "SEMI.CLASS_BALANCE.MOMENTUM", 0.999, UNIT_OPEN)  # EMA of the per-step class pixel counts
    cfg.SEMI.CLASS_BALANCE.FROM_PSEUDO_LABELS = True  # also count the teacher's pseudo-labels (paper: yes)
    # weights are 1 before this iteration (counting starts at once)
    declare(cfg, "SEMI.CLASS_BALANCE.START_ITER", 0, ITERATION)


@SEMI_LOSS_REGISTRY.register_term
class ClassBalanceTerm(SemiLossTerm):
    """``class_balance``: per-class CE weights for the terms after it (list it first in ``SEMI.LOSSES``).

    Counts are an exponential moving average (``MOMENTUM``) of the per-step pixel counts of the labeled targets
    and (``FROM_PSEUDO_LABELS``) the teacher's pseudo-labels on the weak unlabeled views; ``START_ITER``: weights
    are 1 before it (counting starts at once). The counts are a buffer, so they are checkpointed.
    """

    name = "class_balance"
    needs_unlabeled = False  # also weights the supervised CE during burn-in

    @configurable
    def __init__(self, *, num_classes: int, momentum: float = 0.999, from_pseudo_labels: bool = True,
                 start_iter: int = 0):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SEMI.CLASS_BALANCE.MOMENTUM must lie in [0, 1), got {momentum}")
        self.num_classes = int(num_classes)
        self.momentum = momentum
        self.from_pseudo_labels = from_pseudo_labels
        self.start_iter = start_iter
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg, spec):
        names = list(cfg.SEMI.LOSSES)
        late = [n for n in ("supervised", "pseudo_label") if n in names and names.index(n) < names.index(cls.name)]
        if late:
            raise ValueError(f"SEMI.LOSSES {names}: 'class_balance' must come before {late} (it weights their CE)")
        c = cfg.SEMI.CLASS_BALANCE
        return dict(num_classes=spec.num_classes, momentum=c.MOMENTUM,
                    from_pseudo_labels=c.FROM_PSEUDO_LABELS, start_iter=c.START_ITER)

    def class_weights(self) -> torch.Tensor:
        """Current ``alpha [C]`` (fp32)."""
        return median_frequency_weights(self.counts)

    def forward(self, step) -> Dict[str, torch.Tensor]:
        if step.iteration >= self.start_iter:
            step.class_weights = self.class_weights()
        else:
            step.class_weights = torch.ones(self.num_classes, device=self.counts.device)
        return {}

    def _bincount(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1)
        ok = (labels >= 0) & (labels < self.num_classes)
        return torch.bincount(torch.where(ok, labels, torch.full_like(labels, self.num_classes)),
                              minlength=self.num_classes + 1)[: self.num_classes]

    @torch.no_grad()
    def update(self, step) -> None:
        n = self._bincount(step.labeled_targets)
        if self.from_pseudo_labels and step.teacher_weak.get("pseudo_label") is not None:
            n = n + self._bincount(step.teacher_weak["pseudo_label"])
        self.counts.mul_(self.momentum).add_(n.to(self.counts))
