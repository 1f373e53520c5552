"""StepRecord: the task-agnostic part of a semi-supervised step record (what the engine and every term read).

Each task's meta-architecture hands its loss terms a record subclassing this one (projects/SemiInstance's
``InstanceStep``, semantic segmentation's ``SemiStep`` in losses/step.py) with its own fields.
"""
from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class StepRecord:
    """``iteration`` / ``max_iter`` / ``burn_in_iters``: the training clock; ``burn_in``: True while only terms
    with ``needs_unlabeled = False`` run; ``metrics``: detached scalars terms log (written by the trainer)."""

    iteration: int
    max_iter: int
    burn_in_iters: int = 0
    burn_in: bool = False
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(max(self.iteration / max(self.max_iter, 1), 0.0), 1.0)

    @property
    def semi_progress(self) -> float:
        """Fraction of the semi-supervised phase done: 0 at the end of burn-in, 1 at the end of training."""
        span = max(self.max_iter - self.burn_in_iters, 1)
        return min(max((self.iteration - self.burn_in_iters) / span, 0.0), 1.0)

    def log(self, name: str, value: torch.Tensor) -> None:
        """Record a detached scalar metric (not a loss); the trainer writes it to the event storage."""
        self.metrics[name] = torch.as_tensor(value).detach().float()
