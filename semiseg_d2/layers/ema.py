"""Mean-Teacher EMA: the momentum schedule, the in-place update and the pairs it applies to.

Pure functions and a record; the engine's EMAHook decides when to call them (after the optimizer step) and applies
one momentum to every :class:`EMAPair` the model lists (its teacher, and the averaged modules of its loss terms).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from .distributed import unwrap_model

EMA_SCHEDULES = ("constant", "warm_start", "cosine")


def ema_momentum(schedule: str, base: float, it: int, max_iter: int) -> float:
    """Momentum m of the teacher update at iteration ``it`` (counted from the start of EMA updates).

    - ``"constant"``:   m = base
    - ``"warm_start"``: m = min(1 - 1/(it + 1), base)  (U2PL / DGCL: the teacher follows the student
      closely at first; it = 0 gives m = 0, i.e. a plain copy)
    - ``"cosine"``:     m = 1 - (1 - base) * (cos(pi * t / T) + 1) / 2 with t = clamp(it, 0, T), T = max_iter;
      rises from ``base`` at t = 0 to 1 at t = T (Alonso et al., BYOL-style)
    """
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"SEMI.EMA.MOMENTUM must lie in [0, 1]; got {base}")
    if schedule == "constant":
        return float(base)
    if schedule == "warm_start":
        return float(min(1.0 - 1.0 / (max(it, 0) + 1), base))
    if schedule == "cosine":
        if max_iter <= 0:
            raise ValueError(f"SEMI.EMA.SCHEDULE 'cosine' needs max_iter > 0; got {max_iter}")
        t = min(max(it, 0), max_iter) / max_iter
        return float(1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0)
    raise ValueError(f"SEMI.EMA.SCHEDULE: unknown schedule '{schedule}'; known: {', '.join(EMA_SCHEDULES)}")


@dataclass(frozen=True)
class EMAPair:
    """An averaged module and the trained module it follows: ``teacher <- m * teacher + (1 - m) * student``.

    ``teacher`` is never trained (no gradient, eval mode); names and shapes of its parameters and buffers match the
    student's (:func:`ema_update_`). ``average_buffers``: None follows the hook's ``SEMI.EMA.AVERAGE_BUFFERS``;
    True / False fixes how this pair's floating-point buffers are treated (averaged / copied from the student).
    """

    teacher: nn.Module
    student: nn.Module
    average_buffers: Optional[bool] = None


def _paired(kind: str, teacher: List[Tuple[str, torch.Tensor]], student: List[Tuple[str, torch.Tensor]]):
    t_names = [n for n, _ in teacher]
    s_names = [n for n, _ in student]
    if t_names != s_names:
        missing = sorted(set(s_names) - set(t_names))[:5]
        extra = sorted(set(t_names) - set(s_names))[:5]
        raise ValueError(
            f"ema_update_: teacher and student {kind} differ (in student only: {missing}, "
            f"in teacher only: {extra}, or different order)"
        )
    for (name, t), (_, s) in zip(teacher, student):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: {kind[:-1]} '{name}' has shape {tuple(t.shape)} in the teacher "
                             f"but {tuple(s.shape)} in the student")
    return [t for _, t in teacher], [s for _, s in student]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, ema_buffers: bool = False) -> None:
    """In place: teacher_param <- m * teacher_param + (1 - m) * student_param, for every floating-point param.

    Args:
        teacher: the EMA network (never DDP-wrapped); its parameters should be fp32 (master weights).
        student: the trained network, possibly wrapped in DistributedDataParallel / DataParallel
            (unwrapped here). Parameter and buffer names and shapes must match the teacher's (ValueError).
        momentum: m in [0, 1] (see :func:`ema_momentum`).
        ema_buffers: how buffers (BN running_mean/var, num_batches_tracked) are handled.
            False (default): COPIED from the student. Our teacher always runs with eval-mode BN, so its
            statistics never update by themselves; copying keeps them those of the current student.
            (U2PL/DGCL average only ``parameters()`` and let the teacher's own train-mode forward refresh
            its BN statistics; copying is the equivalent for an eval-mode teacher.)
            True: floating-point buffers are EMA-averaged like parameters; integer buffers are copied.
    Non-floating-point parameters are copied. Uses ``torch._foreach_*`` (one fused kernel per dtype/device
    group instead of one per tensor).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_: momentum must lie in [0, 1]; got {momentum}")
    student = unwrap_model(student)
    t_params, s_params = _paired("parameters", list(teacher.named_parameters()), list(student.named_parameters()))
    t_bufs, s_bufs = _paired("buffers", list(teacher.named_buffers()), list(student.named_buffers()))

    avg_t, avg_s, copy_t, copy_s = [], [], [], []
    for t, s in zip(t_params, s_params):
        (avg_t if t.is_floating_point() else copy_t).append(t)
        (avg_s if t.is_floating_point() else copy_s).append(s)
    for t, s in zip(t_bufs, s_bufs):
        average = ema_buffers and t.is_floating_point()
        (avg_t if average else copy_t).append(t)
        (avg_s if average else copy_s).append(s)

    if avg_t:
        avg_s = [s.to(dtype=t.dtype, device=t.device) for t, s in zip(avg_t, avg_s)]
        torch._foreach_mul_(avg_t, momentum)
        torch._foreach_add_(avg_t, avg_s, alpha=1.0 - momentum)
    if copy_t:
        torch._foreach_copy_(copy_t, copy_s)
