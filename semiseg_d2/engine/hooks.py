"""Training hooks of the semi-supervised engine."""
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

from ..layers.ema import ema_momentum, ema_update_


def unwrap_model(model):
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class EMAHook(HookBase):
    """teacher <- m * teacher + (1 - m) * student after every step (``torch._foreach_*``; buffers copied).

    During the supervised burn-in (``SEMI.BURN_IN_ITERS``) the teacher is left alone; after the last
    burn-in step it becomes an exact copy of the student. The schedule's clock ``t = it - burn_in`` is
    0 at the first semi-supervised step, as U2PL/DGCL count it, so their warm start
    ``min(1 - 1/(t+1), m)`` and Alonso's cosine schedule both start when the teacher starts to be used.
    """

    def __init__(self, momentum: float, schedule: str, burn_in_iters: int, max_iter: int):
        ema_momentum(schedule, momentum, 0, max(max_iter, 1))  # validates the schedule name now
        self.momentum = momentum
        self.schedule = schedule
        self.burn_in_iters = burn_in_iters
        self.max_iter = max_iter

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
        ema_update_(model.teacher, model.student, m)
        self.trainer.storage.put_scalar("ema_momentum", m, smoothing_hint=False)
