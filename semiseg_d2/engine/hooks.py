"""Training hooks of the semi-supervised engine."""
from detectron2.engine import HookBase

from ..layers.distributed import average_float_buffers_, unwrap_model
from ..layers.ema import ema_momentum, ema_update_


class EMAHook(HookBase):
    """The one EMA of a run: after every step, ``teacher <- m * teacher + (1 - m) * student`` for every
    :class:`~semiseg_d2.layers.ema.EMAPair` of the model's ``ema_pairs()`` (the EMA teacher network, and modules
    loss terms average, e.g. the memory-contrast term's projection head), all with the same momentum m
    (``torch._foreach_*``).

    ``average_buffers`` (``SEMI.EMA.AVERAGE_BUFFERS``, default True): the floating-point buffers (BN running
    mean / var) are averaged with the same momentum, as UniMatch V2 does, so the eval-mode teacher normalises
    with statistics of its own averaged weights; False copies the student's statistics (which belong to the
    student's current weights, not the teacher's). A pair may fix its own choice (``EMAPair.average_buffers``).
    Integer buffers are always copied. Under DDP every averaged module's floating-point buffers are then averaged
    over ranks (plain BN: one normalisation on every rank).

    During the supervised burn-in (``SEMI.BURN_IN_ITERS``) the pairs are left alone; after the last
    burn-in step each averaged module becomes an exact copy of its student. The schedule's clock ``t = it - burn_in``
    is 0 at the first semi-supervised step, as U2PL/DGCL count it, so their warm start
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
        pairs = unwrap_model(self.trainer.model).ema_pairs()
        for pair in pairs:
            average = self.average_buffers if pair.average_buffers is None else pair.average_buffers
            ema_update_(pair.teacher, pair.student, m, ema_buffers=average)
            average_float_buffers_(pair.teacher)
        if pairs:  # SEMI.TEACHER_MODE "student" without averaging terms: nothing is averaged
            self.trainer.storage.put_scalar("ema_momentum", m, smoothing_hint=False)


def build_ema_hook(cfg) -> EMAHook:
    """The ``EMAHook`` of ``cfg.SEMI.EMA`` (a semi-supervised model lists what it averages: ``ema_pairs()``)."""
    return EMAHook.from_config(cfg)


class PreciseBNHook(HookBase):
    """``TEST.PRECISE_BN`` of this engine (in place of detectron2's ``hooks.PreciseBN``): at every evaluation
    period (``TEST.EVAL_PERIOD``) and after the last iteration, before checkpointing and evaluation, the BN running
    statistics of every evaluated network are recomputed with the weights fixed (:mod:`semiseg_d2.engine.precise_bn`)
    on the first ``TEST.PRECISE_BN.NUM_ITER`` batches of the labeled training stream — the student and the EMA
    teacher of a semi-supervised model (each on the same batches), or the segmentor.

    Unlike detectron2's hook, which forwards ``self.model`` on the training loader, it never runs a semi-supervised
    step (that would enqueue memory banks and draw unlabeled batches), draws no random number from the run's
    generators, and reads the same batches every time, so a resumed run recomputes exactly what the uninterrupted
    one did. Under DDP each rank recomputes on its share and the statistics are then averaged over ranks."""

    scope_name = "precise_bn"

    def __init__(self, period: int, num_iter: int, batches_fn):
        if num_iter < 1:
            raise ValueError(f"TEST.PRECISE_BN.NUM_ITER must be >= 1, got {num_iter}")
        self.period = int(period)
        self.num_iter = int(num_iter)
        self.batches_fn = batches_fn

    @staticmethod
    def networks(model):
        from ..modeling import TeacherStudent

        module = unwrap_model(model)
        if isinstance(module, TeacherStudent):
            return [n for n in (module.student, module.teacher) if n is not None]
        return [module]

    def update(self) -> None:
        from .precise_bn import recompute_bn_stats

        for network in self.networks(self.trainer.model):
            recompute_bn_stats(network, self.batches_fn(), self.num_iter)
            average_float_buffers_(network)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self.period > 0 and next_iter % self.period == 0):
            self.update()


def build_precise_bn_hook(cfg) -> "PreciseBNHook":
    """The :class:`PreciseBNHook` of ``cfg.TEST.PRECISE_BN`` (its batches: ``precise_bn.labeled_batches(cfg)``,
    without loader workers)."""
    from .precise_bn import labeled_batches

    c = cfg.clone()
    c.defrost()
    c.DATALOADER.NUM_WORKERS = 0
    return PreciseBNHook(cfg.TEST.EVAL_PERIOD, cfg.TEST.PRECISE_BN.NUM_ITER, lambda: labeled_batches(c))
