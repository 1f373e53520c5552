"""Training hooks of the semi-supervised engine."""
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

from ..layers.distributed import average_float_buffers_
from ..layers.ema import ema_momentum, ema_update_


def unwrap_model(model):
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class EMAHook(HookBase):
    """teacher <- m * teacher + (1 - m) * student after every step (``torch._foreach_*``).

    ``average_buffers`` (``SEMI.EMA.AVERAGE_BUFFERS``, default True): the floating-point buffers (BN running
    mean / var) are averaged with the same momentum, as UniMatch V2 does, so the eval-mode teacher normalises
    with statistics of its own averaged weights; False copies the student's statistics (which belong to the
    student's current weights, not the teacher's). Integer buffers are always copied.

    During the supervised burn-in (``SEMI.BURN_IN_ITERS``) the teacher is left alone; after the last
    burn-in step it becomes an exact copy of the student. The schedule's clock ``t = it - burn_in`` is
    0 at the first semi-supervised step, as U2PL/DGCL count it, so their warm start
    ``min(1 - 1/(t+1), m)`` and Alonso's cosine schedule both start when the teacher starts to be used.
    """

    scope_name = "ema"  # its after_step's profiling scope (utils/profiling.py: hook_scope_name)

    def __init__(self, momentum: float, schedule: str, burn_in_iters: int, max_iter: int, average_buffers: bool = True):
        ema_momentum(schedule, momentum, 0, max(max_iter, 1))  # validates the schedule name now
        self.average_buffers = bool(average_buffers)
        self.momentum = momentum
        self.schedule = schedule
        self.burn_in_iters = burn_in_iters
        self.max_iter = max_iter

    @classmethod
    def from_config(cls, cfg) -> "EMAHook":
        s = cfg.SEMI
        return cls(s.EMA.MOMENTUM, s.EMA.SCHEDULE, s.BURN_IN_ITERS, cfg.SOLVER.MAX_ITER, s.EMA.AVERAGE_BUFFERS)

    def momentum_at(self, iteration: int):
        """Momentum applied after step ``iteration`` (None: no update during burn-in)."""
        t = iteration - self.burn_in_iters
        if t < -1:
            return None
        if t == -1:
            return 0.0  # end of burn-in: teacher <- student
        return ema_momentum(self.schedule, self.momentum, t, max(self.max_iter - self.burn_in_iters, 1))

    def after_step(self):
        m = self.momentum_at(self.trainer.iter)
        if m is None:
            return
        model = unwrap_model(self.trainer.model)
        ema_update_(model.teacher, model.student, m, ema_buffers=self.average_buffers)
        average_float_buffers_(model.teacher)  # DDP + plain BN: one teacher normalisation on every rank
        self.trainer.storage.put_scalar("ema_momentum", m, smoothing_hint=False)


def build_ema_hook(cfg):
    """The ``EMAHook`` of ``cfg.SEMI.EMA``; None with ``SEMI.TEACHER_MODE "student"`` (no teacher to update)."""
    if cfg.SEMI.TEACHER_MODE == "student":
        return None
    return EMAHook.from_config(cfg)

