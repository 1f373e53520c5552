"""TeacherStudent: the task-agnostic half of a semi-supervised meta-architecture.

A student network, its EMA teacher (a frozen deep copy in eval mode, updated only by ``EMAHook``) and the
``SEMI.LOSSES`` terms of one task. With ``teacher_mode="student"`` (``SEMI.TEACHER_MODE``, UniMatch) there is no
teacher copy (``teacher`` is None): the subclass takes its teacher outputs from the student itself, without gradient. Subclasses build the task's step record (a
:class:`~semiseg_d2.losses.step_record.StepRecord`) in ``forward`` and return :meth:`run_terms`'s losses.
What the engine relies on (engine/trainer.py, engine/hooks.py): ``ema_pairs()`` (EMAHook: the teacher and the
modules the terms average), ``loss_owner`` (loss name -> term, for the non-finite check), ``pop_metrics()``,
``after_optimizer_step()``, ``params_with_own_optimizer()`` (optimizer), ``eval_network`` (SemiSegTrainer.test
evaluates both). The step's clock is detectron2's event storage (``iteration`` reads ``get_event_storage().iter``,
which the trainer sets before each step), not a value written into the model.
``SemiSegmentor`` (semi.py) implements the same contract for semantic segmentation.
"""
import copy
from typing import Dict, List

import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from ...layers.ema import EMAPair
from ...utils.profiling import scope

EVAL_NETWORKS = ("student", "teacher")
TEACHER_MODES = ("ema", "student")


class TeacherStudent(nn.Module):
    def __init__(self, student: nn.Module, terms: nn.ModuleDict, max_iter: int, burn_in_iters: int = 0,
                 teacher_mode: str = "ema", eval_network: str = "teacher"):
        super().__init__()
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"SEMI.TEACHER_MODE: unknown {teacher_mode!r}; known: {', '.join(TEACHER_MODES)}")
        self.teacher_mode = teacher_mode
        self.student = student
        self.teacher = None
        if teacher_mode == "ema":
            self.teacher = copy.deepcopy(student)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.terms = terms
        self.max_iter = int(max_iter)
        self.burn_in_iters = int(burn_in_iters)
        if eval_network not in EVAL_NETWORKS:
            raise ValueError(f"SEMI.WEIGHTS_FOR_EXPORT must be 'student' or 'teacher', got {eval_network!r}")
        # The network inference runs (SEMI.WEIGHTS_FOR_EXPORT): DefaultPredictor on a trainer checkpoint, demos and
        # exports all default to it; SemiSegTrainer.test switches it to evaluate both.
        self.eval_network = eval_network
        self.loss_owner: Dict[str, str] = {}
        self._last_step = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's normalisation statistics only ever come from the EMA
        return self

    @property
    def inference_network(self) -> nn.Module:
        """The network ``eval_network`` names ("student" or "teacher")."""
        if self.eval_network not in EVAL_NETWORKS:
            raise ValueError(f"eval_network must be 'student' or 'teacher', got {self.eval_network!r}")
        if self.eval_network == "teacher" and self.teacher is None:
            raise ValueError("eval_network 'teacher': SEMI.TEACHER_MODE 'student' has no teacher network")
        return getattr(self, self.eval_network)

    @property
    def iteration(self) -> int:
        """The iteration of the step being computed: detectron2's event storage clock (a training step runs
        inside the trainer's ``EventStorage``, whose ``iter`` the trainer sets before each step)."""
        return get_event_storage().iter

    def ema_pairs(self) -> List[EMAPair]:
        """Every module the EMAHook averages: the teacher network (none with ``SEMI.TEACHER_MODE "student"``) and
        each term's :meth:`~semiseg_d2.losses.registry.SemiLossTerm.ema_pairs`."""
        pairs = [EMAPair(self.teacher, self.student)] if self.teacher is not None else []
        return pairs + [pair for term in self.terms.values() for pair in term.ema_pairs()]

    def in_burn_in(self) -> bool:
        """Supervised-only step: before ``burn_in_iters``, or when no term reads unlabeled data."""
        return self.iteration < self.burn_in_iters or not any(t.needs_unlabeled for t in self.terms.values())

    def run_terms(self, step) -> Dict[str, torch.Tensor]:
        """Every term's named, weighted losses for ``step`` (terms needing unlabeled data skip burn-in steps).
        Remembers ``step`` for :meth:`after_optimizer_step` and :meth:`pop_metrics`."""
        losses = {}
        for name, term in self.terms.items():
            if step.burn_in and term.needs_unlabeled:
                continue
            with scope(f"loss:{name}"):
                term_losses = term(step)
            for key, value in term_losses.items():
                if key in losses:
                    raise KeyError(f"loss term '{name}' returned '{key}', which another term already returned")
                losses[key] = value
                self.loss_owner[key] = name
        self._last_step = step
        return losses

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Let stateful terms (memory banks) update from the last step, then drop the record."""
        step, self._last_step = self._last_step, None
        if step is None or step.burn_in:
            return
        for name, term in self.terms.items():
            with scope(f"update:{name}"):
                term.update(step)

    def pop_metrics(self) -> Dict[str, torch.Tensor]:
        """Metrics the terms logged in the last forward (detached scalars)."""
        return dict(self._last_step.metrics) if self._last_step is not None else {}

    def params_with_own_optimizer(self) -> List[nn.Parameter]:
        return [p for t in self.terms.values() for p in t.params_with_own_optimizer()]


def is_semi_supervised(cfg) -> bool:
    """Whether ``cfg.MODEL.META_ARCHITECTURE`` names a semi-supervised model: a :class:`TeacherStudent` (student,
    teacher, loss terms; ``SemiSegmentor``, projects/SemiInstance's ``SemiRCNN``). Unknown names are a KeyError
    listing the registered ones."""
    from detectron2.modeling import META_ARCH_REGISTRY  # noqa: PLC0415

    from ..backbone.build import check_registered  # noqa: PLC0415

    name = cfg.MODEL.META_ARCHITECTURE
    check_registered(META_ARCH_REGISTRY, name, "MODEL.META_ARCHITECTURE")
    return issubclass(META_ARCH_REGISTRY.get(name), TeacherStudent)
