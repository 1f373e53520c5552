"""Per-component timing of training steps, attached from outside the production code.

:class:`StepProfiler` times named regions. On CUDA every region boundary records a CUDA event (no host sync;
the events are resolved once, in :meth:`StepProfiler.summary`); on CPU it reads ``time.perf_counter``. Host
(wall-clock) times are kept in both cases. Regions nest: a region's own time is its duration minus its direct
children's, so nested components are never counted twice.

:func:`attach_step_profiler` instruments a ``SemiSegTrainLoop`` (detectron2 ``SimpleTrainer``) and its model by
replacing bound methods on the instances (the classes are untouched; :meth:`StepProfiler.detach` restores them)
and by optimizer step hooks:

    data                      next(data iterator)
    forward                   the model call (own time: stacking, normalisation, mixing, splitting)
      teacher                 SemiSegmentor: teacher pass + its pseudo-label maps (``_teacher_outputs``)
      student                 student network (``student.extract``; Segmentor: ``extract``)
      student_fp              UniMatch's pass with the feature-perturbed copy (``student.extract_fp``)
      loss:<term>             each loss term's forward (Segmentor: ``loss:supervised``)
    host_sync                 ``_losses_to_host``: the step's one device->host copy of losses and metrics
    finite_check              ``_raise_if_not_finite`` (when the loop has it)
    zero_grad                 ``optimizer.zero_grad``
    backward                  from the end of zero_grad to ``after_backward`` (the loss backward)
    metrics                   ``_write_metrics`` (detectron2's loss logging, a host sync)
    optimizer                 ``optimizer.step`` (step pre/post hooks)
    term_updates              ``after_optimizer_step``
      update:<term>           each term's ``update`` (memory banks, flow)
    ema / hook:<Name>         each trainer hook's ``after_step`` (``EMAHook`` -> ``ema``)

Everything else in the iteration (summing losses, metric dicts, autocast set-up) is reported as "unattributed".
"""
import functools
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["StepProfiler", "attach_step_profiler", "peak_memory_bytes", "current_rss_peak_bytes"]


def current_rss_peak_bytes() -> int:
    """Peak resident set size of this process (Linux ``ru_maxrss`` is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on ``device`` (CUDA) or the process's peak RSS (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return current_rss_peak_bytes()


class _Mark:
    __slots__ = ("host", "event")

    def __init__(self, cuda: bool):
        self.event = None
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        self.host = time.perf_counter()

    def seconds_to(self, other: "_Mark", cuda: bool) -> float:
        if cuda:
            return self.event.elapsed_time(other.event) / 1000.0
        return other.host - self.host


class StepProfiler:
    """Named, nested regions per training iteration; CUDA events on GPU, perf_counter on CPU.

    Use :meth:`begin_iteration` / :meth:`end_iteration` around each step, :meth:`push` / :meth:`pop` (or
    :meth:`wrap_method`) for regions. A region that raises stays recorded in :attr:`failed_stack` (the region
    path that was running), e.g. to name the component of an out-of-memory error.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stack: List[tuple] = []  # open regions: (name, start mark)
        self.failed_stack: Optional[List[str]] = None
        self.iterations: List[dict] = []  # {"start", "end", "regions": [(path, start, end)]}
        self.peak_component: Optional[str] = None  # region that last raised the memory peak
        self._peak = 0
        self._current: Optional[dict] = None
        self._undo: List[Callable[[], None]] = []

    # ------------------------------------------------------------------ recording
    def _probe_memory(self, path: str) -> None:
        peak = peak_memory_bytes(self.device)
        if peak > self._peak:
            self._peak = peak
            self.peak_component = path

    def begin_iteration(self) -> None:
        if self.stack:
            raise RuntimeError(f"StepProfiler: regions still open at the start of an iteration: {self.path()}")
        self._current = {"start": _Mark(self.cuda), "regions": []}

    def end_iteration(self) -> None:
        if self._current is None:
            raise RuntimeError("StepProfiler: end_iteration without begin_iteration")
        if self.stack:
            raise RuntimeError(f"StepProfiler: regions not closed at the end of the iteration: {self.path()} "
                               "(the instrumented methods were not called in the expected order)")
        self._current["end"] = _Mark(self.cuda)
        self.iterations.append(self._current)
        self._current = None

    def path(self) -> str:
        return "/".join(name for name, _ in self.stack)

    def push(self, name: str) -> None:
        self.stack.append((name, _Mark(self.cuda)))

    def pop(self, name: str) -> None:
        if not self.stack or self.stack[-1][0] != name:
            raise RuntimeError(f"StepProfiler: closing '{name}' but the open region is '{self.path()}'")
        path = self.path()
        _, start = self.stack.pop()
        end = _Mark(self.cuda)
        if self._current is not None:
            self._current["regions"].append((path, start, end))
        self._probe_memory(path)

    def record_failure(self) -> None:
        """Remember the innermost running region (first failure only) and close every open region."""
        if self.failed_stack is None:
            self.failed_stack = [name for name, _ in self.stack]
        self.stack.clear()
        self._current = None

    def failed_component(self) -> str:
        return "/".join(self.failed_stack) if self.failed_stack else "(outside the instrumented components)"

    # ------------------------------------------------------------------ instrumentation
    def wrap_method(self, obj, attr: str, name: str) -> bool:
        """Time ``obj.attr(...)`` as region ``name`` by shadowing the bound method on the instance.
        Returns False (nothing done) when ``obj`` has no such attribute."""
        fn = getattr(obj, attr, None)
        if fn is None or not callable(fn):
            return False
        had_own = attr in getattr(obj, "__dict__", {})
        prof = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            prof.push(name)
            try:
                out = fn(*args, **kwargs)
            except BaseException:
                if prof.failed_stack is None:
                    prof.failed_stack = [n for n, _ in prof.stack]
                while prof.stack and prof.stack[-1][0] != name:
                    prof.stack.pop()
                if prof.stack:
                    prof.stack.pop()
                raise
            prof.pop(name)
            return out

        setattr(obj, attr, timed)

        def undo():
            if had_own:
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)

        self._undo.append(undo)
        return True

    def add_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def detach(self) -> None:
        """Remove every wrapper and hook this profiler installed."""
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ results
    def per_iteration(self, skip: int = 0) -> List[Dict[str, float]]:
        """For every recorded iteration after the first ``skip``: {component: own seconds} plus "__total__".

        Own time = region duration minus its direct children's durations; a region that has children is
        reported as "<path>/self". Synchronises the device once (CUDA) to read the events.
        """
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = []
        for it in self.iterations[skip:]:
            total = it["start"].seconds_to(it["end"], self.cuda)
            dur: Dict[str, float] = {}
            for path, start, end in it["regions"]:
                dur[path] = dur.get(path, 0.0) + start.seconds_to(end, self.cuda)
            own = dict(dur)
            for path, d in dur.items():
                if "/" in path:
                    parent = path.rsplit("/", 1)[0]
                    if parent in own:
                        own[parent] -= d
            parents = {p.rsplit("/", 1)[0] for p in dur if "/" in p}
            row = {(f"{p}/self" if p in parents else p): max(v, 0.0) for p, v in own.items()}
            row["__total__"] = total
            out.append(row)
        return out

    def host_data_wait(self, skip: int = 0) -> List[float]:
        """Wall-clock seconds spent in the "data" region per iteration (the CPU wait for the loader)."""
        out = []
        for it in self.iterations[skip:]:
            out.append(sum(end.host - start.host for path, start, end in it["regions"] if path == "data"))
        return out

    def summary(self, skip: int = 0) -> dict:
        """Medians over the iterations after ``skip``.

        Returns {"step_times": [s], "median_s", "p90_s", "breakdown": {component: {"median_ms", "mean_ms",
        "share"}} incl. "unattributed", "attributed_fraction": sum of mean own times / mean step time,
        "per_iteration": [{component: ms}], "host_data_wait_median_ms"}.
        """
        rows = self.per_iteration(skip)
        if not rows:
            raise ValueError("StepProfiler.summary: no iteration recorded after warm-up")
        totals = [r["__total__"] for r in rows]
        names = sorted({k for r in rows for k in r if k != "__total__"})
        per_iter = []
        for r in rows:
            attributed = sum(r.get(n, 0.0) for n in names)
            row = {n: r.get(n, 0.0) * 1000.0 for n in names}
            row["unattributed"] = (r["__total__"] - attributed) * 1000.0
            row["step"] = r["__total__"] * 1000.0
            per_iter.append(row)
        med = statistics.median(totals)
        breakdown = {}
        for n in names + ["unattributed"]:
            vals = [row[n] for row in per_iter]
            breakdown[n] = {
                "median_ms": statistics.median(vals),
                "mean_ms": statistics.fmean(vals),
                "share": statistics.median(vals) / (med * 1000.0) if med > 0 else 0.0,
            }
        mean_total = statistics.fmean(totals)
        attributed_mean = sum(breakdown[n]["mean_ms"] for n in names) / 1000.0
        return {
            "step_times": totals,
            "median_s": med,
            "p90_s": _percentile(totals, 0.9),
            "breakdown": breakdown,
            "attributed_fraction": attributed_mean / mean_total if mean_total > 0 else 0.0,
            "per_iteration": per_iter,
            "host_data_wait_median_ms": statistics.median(self.host_data_wait(skip)) * 1000.0,
        }


def _percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------- attaching
class _TimedIterator:
    def __init__(self, it, prof: StepProfiler):
        self._it, self._prof = it, prof

    def __iter__(self):
        return self

    def __next__(self):
        self._prof.push("data")
        try:
            batch = next(self._it)
        except BaseException:
            self._prof.record_failure()
            raise
        self._prof.pop("data")
        return batch


def _hook_name(hook) -> str:
    cls = type(hook).__name__
    return "ema" if cls == "EMAHook" else f"hook:{cls}"


def attach_step_profiler(loop, prof: StepProfiler) -> List[str]:
    """Instrument ``loop`` (a ``SemiSegTrainLoop`` / ``SimpleTrainer`` with its hooks registered) and its model.

    Returns the list of attached component names (for the report). Call ``prof.detach()`` to undo.
    """
    from torch.nn.parallel import DistributedDataParallel

    attached = []
    model = loop.model
    module = model.module if isinstance(model, DistributedDataParallel) else model

    # data: the loop reads self._data_loader_iter (detectron2 creates it lazily from self.data_loader)
    timed_iter = _TimedIterator(iter(loop.data_loader), prof)
    loop._data_loader_iter_obj = timed_iter
    attached.append("data")

    if prof.wrap_method(model, "forward", "forward"):
        attached.append("forward")
    if hasattr(module, "terms") and hasattr(module, "teacher"):  # SemiSegmentor
        if prof.wrap_method(module, "_teacher_outputs", "teacher"):
            attached.append("forward/teacher")
        elif module.teacher is not None and prof.wrap_method(module.teacher, "extract", "teacher"):
            attached.append("forward/teacher")
        if prof.wrap_method(module.student, "extract", "student"):
            attached.append("forward/student")
        if getattr(module, "fp_dropout", 0) and prof.wrap_method(module.student, "extract_fp", "student_fp"):
            attached.append("forward/student_fp")  # UniMatch: cat(labeled, weak) with the perturbed features
        for name, term in module.terms.items():
            if prof.wrap_method(term, "forward", f"loss:{name}"):
                attached.append(f"forward/loss:{name}")
            if type(term).update is not _base_update() and prof.wrap_method(term, "update", f"update:{name}"):
                attached.append(f"term_updates/update:{name}")
        if prof.wrap_method(module, "after_optimizer_step", "term_updates"):
            attached.append("term_updates")
    else:  # Segmentor
        if prof.wrap_method(module, "extract", "student"):
            attached.append("forward/student")
        if prof.wrap_method(module, "losses", "loss:supervised"):
            attached.append("forward/loss:supervised")

    if prof.wrap_method(loop, "_losses_to_host", "host_sync"):
        attached.append("host_sync")
    if prof.wrap_method(loop, "_raise_if_not_finite", "finite_check"):
        attached.append("finite_check")
    if prof.wrap_method(loop, "_write_metrics", "metrics"):
        attached.append("metrics")

    # backward: the loop calls optimizer.zero_grad() right before the backward and after_backward() right after
    opt = loop.optimizer
    zero_grad = opt.zero_grad

    @functools.wraps(zero_grad)
    def zero_grad_then_open_backward(*args, **kwargs):
        prof.push("zero_grad")
        zero_grad(*args, **kwargs)
        prof.pop("zero_grad")
        prof.push("backward")

    opt.zero_grad = zero_grad_then_open_backward
    prof.add_undo(lambda: delattr(opt, "zero_grad"))
    after_backward = loop.after_backward

    @functools.wraps(after_backward)
    def close_backward(*args, **kwargs):
        prof.pop("backward")
        return after_backward(*args, **kwargs)

    loop.after_backward = close_backward
    prof.add_undo(lambda: delattr(loop, "after_backward"))
    attached += ["zero_grad", "backward"]

    h1 = opt.register_step_pre_hook(lambda *a, **k: prof.push("optimizer"))
    h2 = opt.register_step_post_hook(lambda *a, **k: prof.pop("optimizer"))
    prof.add_undo(h1.remove)
    prof.add_undo(h2.remove)
    attached.append("optimizer")

    for hook in getattr(loop, "_hooks", []):
        name = _hook_name(hook)
        if type(hook).after_step is not _base_after_step():
            if prof.wrap_method(hook, "after_step", name):
                attached.append(name)

    def restore_iter():
        loop._data_loader_iter_obj = timed_iter._it

    prof.add_undo(restore_iter)
    return attached


def _base_update():
    from ..losses.registry import SemiLossTerm

    return SemiLossTerm.update


def _base_after_step():
    from detectron2.engine import HookBase

    return HookBase.after_step
