"""Named profiling scopes of the training step, and the per-component timer of ``tools/benchmark.py``.

:class:`scope` is how the production code names the parts of a step: ``with scope("teacher"): ...`` (or
``@scope("teacher")`` on a function). While torch's profiler runs each scope is a ``torch.profiler.record_function``
range, so a ``torch.profiler`` trace of training shows the same names, and when a :class:`StepProfiler` is active
(``with prof:``) the scope is also one of its timed regions. With neither running a scope costs a check of
each and never synchronises the device.

The step's scopes (the components of ``tools/benchmark.py``, nested as a region path):

    data                      next(data iterator)                                  engine/trainer.py
    forward                   the model call (own time: stacking, normalisation, mixing, splitting)
      teacher                 SemiSegmentor: teacher pass + its pseudo-label maps  modeling/meta_arch/semi.py
        student               the student standing in for the teacher (SEMI.TEACHER_MODE "student")
      student                 student network passes (Segmentor: its one pass)     semi.py, segmentor.py
      student_fp              UniMatch's pass with the feature-perturbed copy      semi.py
      loss:<term>             each loss term's forward (Segmentor: loss:supervised)  teacher_student.py, segmentor.py
    zero_grad, backward       optimizer.zero_grad, the loss backward               engine/trainer.py
    host_sync                 the step's one device->host copy of losses and metrics
    finite_check              the non-finite check (when enabled)
    metrics                   detectron2's loss logging (a host sync)
    optimizer                 the optimizer step
    term_updates              the terms' state updates after the optimizer step
      update:<term>           each term's ``update`` (memory banks, flow)          teacher_student.py
    ema / hook:<Name>         each trainer hook's ``after_step`` (EMAHook's ``scope_name`` is "ema")

Everything else in the iteration (summing losses, metric dicts, autocast set-up) is reported as "unattributed".

:class:`StepProfiler` times the regions: on CUDA every region boundary records a CUDA event (no host sync; the
events are resolved once, in :meth:`StepProfiler.summary`); on CPU it reads its host ``clock``
(``time.perf_counter``). Host times are kept in both cases. Regions nest: a region's own time is its duration
minus its direct children's, so nested components are never counted twice.
"""
import functools
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["scope", "hook_scope_name", "StepProfiler", "peak_memory_bytes", "current_rss_peak_bytes"]

_active: Optional["StepProfiler"] = None  # the StepProfiler that scopes feed (``with prof:``), if any


class scope:
    """A named part of the training step: a ``torch.profiler.record_function`` range while torch's profiler runs
    and, while a :class:`StepProfiler` is active, one of its regions; otherwise (almost) nothing. Usable as
    ``with scope(name):`` and as a decorator ``@scope(name)``."""

    __slots__ = ("name", "_range", "_prof")

    def __init__(self, name: str):
        self.name = name
        self._range = self._prof = None

    def __enter__(self) -> "scope":
        if torch.autograd._profiler_enabled():  # as torch's datapipes do: no range (~20 us on a busy CPU) otherwise
            self._range = torch.profiler.record_function(self.name)
            self._range.__enter__()
        self._prof = _active
        if self._prof is not None:
            self._prof.push(self.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._prof is not None:
            if exc_type is None:
                self._prof.pop(self.name)
            else:
                self._prof.abort(self.name)
            self._prof = None
        if self._range is not None:
            self._range.__exit__(exc_type, exc, tb)
            self._range = None
        return False

    def __call__(self, fn: Callable) -> Callable:
        name = self.name

        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with scope(name):  # a fresh scope per call: calls may nest or recurse
                return fn(*args, **kwargs)

        return scoped


def hook_scope_name(hook) -> str:
    """The scope of a trainer hook's ``after_step``: its ``scope_name`` attribute (``EMAHook``: "ema"), else
    ``"hook:<class name>"``."""
    return getattr(hook, "scope_name", None) or f"hook:{type(hook).__name__}"


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

    def __init__(self, cuda: bool, clock: Callable[[], float]):
        self.event = None
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        self.host = clock()

    def seconds_to(self, other: "_Mark", cuda: bool) -> float:
        if cuda:
            return self.event.elapsed_time(other.event) / 1000.0
        return other.host - self.host


class StepProfiler:
    """Named, nested regions per training iteration; CUDA events on GPU, the host ``clock`` on CPU.

    ``with prof:`` makes it the profiler that :func:`scope` feeds (one at a time); :meth:`begin_iteration` /
    :meth:`end_iteration` go around each step. :meth:`push` / :meth:`pop` open and close a region directly. A
    region that raises stays recorded in :attr:`failed_stack` (the region path that was running), e.g. to name
    the component of an out-of-memory error. ``clock`` (seconds; default ``time.perf_counter``) is the host
    clock, which tests replace by a fake one.
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.clock = clock
        self.stack: List[tuple] = []  # open regions: (name, start mark)
        self.failed_stack: Optional[List[str]] = None
        self.iterations: List[dict] = []  # {"start", "end", "regions": [(path, start, end)]}
        self.peak_component: Optional[str] = None  # region that last raised the memory peak
        self._peak = 0
        self._current: Optional[dict] = None

    # ------------------------------------------------------------------ activation
    def __enter__(self) -> "StepProfiler":
        global _active
        if _active is not None:
            raise RuntimeError("StepProfiler: another StepProfiler is already active (profilers do not nest)")
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if _active is self:
            _active = None

    # ------------------------------------------------------------------ recording
    def _mark(self) -> _Mark:
        return _Mark(self.cuda, self.clock)

    def _probe_memory(self, path: str) -> None:
        peak = peak_memory_bytes(self.device)
        if peak > self._peak:
            self._peak = peak
            self.peak_component = path

    def begin_iteration(self) -> None:
        if self.stack:
            raise RuntimeError(f"StepProfiler: regions still open at the start of an iteration: {self.path()}")
        self._current = {"start": self._mark(), "regions": []}

    def end_iteration(self) -> None:
        if self._current is None:
            raise RuntimeError("StepProfiler: end_iteration without begin_iteration")
        if self.stack:
            raise RuntimeError(f"StepProfiler: regions not closed at the end of the iteration: {self.path()}")
        self._current["end"] = self._mark()
        self.iterations.append(self._current)
        self._current = None

    def path(self) -> str:
        return "/".join(name for name, _ in self.stack)

    def push(self, name: str) -> None:
        self.stack.append((name, self._mark()))

    def pop(self, name: str) -> None:
        if not self.stack or self.stack[-1][0] != name:
            raise RuntimeError(f"StepProfiler: closing '{name}' but the open region is '{self.path()}'")
        path = self.path()
        _, start = self.stack.pop()
        end = self._mark()
        if self._current is not None:
            self._current["regions"].append((path, start, end))
        self._probe_memory(path)

    def abort(self, name: str) -> None:
        """Region ``name`` raised: remember the running region path (first failure only) and close ``name`` and
        every region opened inside it."""
        if self.failed_stack is None:
            self.failed_stack = [n for n, _ in self.stack]
        while self.stack and self.stack[-1][0] != name:
            self.stack.pop()
        if self.stack:
            self.stack.pop()

    def record_failure(self) -> None:
        """Remember the innermost running region (first failure only), close every open region and drop the
        iteration in progress."""
        if self.failed_stack is None:
            self.failed_stack = [name for name, _ in self.stack]
        self.stack.clear()
        self._current = None

    def failed_component(self) -> str:
        return "/".join(self.failed_stack) if self.failed_stack else "(outside the instrumented components)"

    def components(self) -> List[str]:
        """Every region path recorded so far (all iterations, warm-up included), in order of first appearance."""
        seen = {}
        for it in self.iterations:
            for path, _, _ in it["regions"]:
                seen.setdefault(path, None)
        return list(seen)

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
