#!/usr/bin/env python
"""Step ratios of several configs on a shared, noisy machine: their training steps interleaved in one process.

    python tools/benchmark_interleaved.py --config-files configs/camvid/study_mean_teacher.yaml \
        configs/camvid/study_dgcl.yaml [...] --synthetic --device cpu [--iters 12] [--warmup 3] [KEY VALUE ...]

Builds every config's model as ``tools/benchmark.py`` does (same steps, synthetic batches, filled banks, start after
burn-in and every term's start), then runs one step of each in turn, ``--warmup`` + ``--iters`` rounds. A config
may carry its own overrides after ``::``, e.g. ``configs/dgcl_city.yaml::SEMI.LOSSES=["supervised","pseudo_label"]``
(Mean Teacher at the DGCL recipe's shape). Load that
changes over minutes (other jobs) hits all configs alike, so the ratio to the FIRST config — the median over rounds
of step time / first config's step time in the same round — is far steadier than two separate runs. The overrides
apply to every config. Prints per config: median s/iter, that ratio, and the median ms of the largest components.
"""
import argparse
import importlib.util
import os
import statistics
import sys
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from semiseg_d2.utils.profiling import StepProfiler  # noqa: E402

# tools/ is not a package (and an installed "tools" package may shadow it): load benchmark.py by path
_spec = importlib.util.spec_from_file_location("semiseg_benchmark", os.path.join(REPO, "tools", "benchmark.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-files", nargs="+", required=True, metavar="FILE", help="the first is the reference")
    p.add_argument("--iters", type=int, default=12, help="measured rounds (one step of every config each)")
    p.add_argument("--warmup", type=int, default=3, help="rounds run first and not measured")
    p.add_argument("--synthetic", action="store_true", help="random batches (tools/benchmark.py --synthetic)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--components", type=int, default=6, help="largest components printed per config")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="overrides for every config")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        raise B.BenchmarkError(f"--iters must be >= 1 and --warmup >= 0; got {args.iters}, {args.warmup}")
    if len(args.opts) % 2:
        raise B.BenchmarkError(f"config overrides come as KEY VALUE pairs; got an odd list {args.opts}")
    return args


def split_spec(spec: str):
    """``FILE[::KEY=VALUE...]`` -> (FILE, [KEY, VALUE, ...])."""
    config_file, *pairs = spec.split("::")
    opts = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise B.BenchmarkError(f"--config-files {spec!r}: override {pair!r} is not KEY=VALUE")
        opts += [key, value]
    return config_file, opts


def build(args, spec, device):
    config_file, own = split_spec(spec)
    one = SimpleNamespace(config_file=config_file, opts=list(args.opts) + own, start_iter=-1, warmup=args.warmup,
                          iters=args.iters)
    cfg, start = B.load_config(one, device)
    data = B.SyntheticBatches(cfg) if args.synthetic else B.build_real_loader(cfg)
    model, loop = B.build_training(cfg, data)
    B.fill_memory_banks(model)
    return SimpleNamespace(name=spec, cfg=cfg, start=start, loop=loop, prof=StepProfiler(device))


def run(runs, rounds):
    from detectron2.utils.events import EventStorage

    storages = [EventStorage(r.start) for r in runs]
    for r, storage in zip(runs, storages):
        with storage:  # pushed and popped around each use: the global stack is left as it was found
            r.loop.storage = storage
            r.loop.iter = r.loop.start_iter = r.start
            r.loop.max_iter = r.cfg.SOLVER.MAX_ITER
            r.loop.before_train()
    for i in range(rounds):
        for r, storage in zip(runs, storages):
            # detectron2 reads the current storage from a global stack: this run's goes on top for its step;
            # its profiler is the one the step's scopes feed
            with storage, r.prof:
                r.loop.iter = r.start + i
                r.prof.begin_iteration()
                r.loop.before_step()
                r.loop.run_step()
                r.loop.after_step()
                r.prof.end_iteration()


def report(runs, warmup, n_components):
    summaries = [r.prof.summary(skip=warmup) for r in runs]
    ref_steps = summaries[0]["step_times"]
    lines = []
    for r, s in zip(runs, summaries):
        ratio = statistics.median(t / t0 for t, t0 in zip(s["step_times"], ref_steps))
        top = sorted(s["breakdown"].items(), key=lambda kv: -kv[1]["median_ms"])[:n_components]
        parts = ", ".join(f"{k} {v['median_ms']:.0f}" for k, v in top)
        lines.append(f"{r.name}: {s['median_s']:.3f} s/iter, x{ratio:.2f} of the first (median of per-round "
                     f"ratios); ms: {parts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        device = B.resolve_device(args.device)
        runs = [build(args, f, device) for f in args.config_files]
    except B.BenchmarkError as e:
        print(f"benchmark_interleaved: {e}", file=sys.stderr)
        return B.EXIT_BAD_INPUT
    print(f"{B.device_name(device)}, torch {torch.__version__}; {args.iters} rounds after {args.warmup} warm-up; "
          f"overrides {' '.join(args.opts) or '(none)'}")
    run(runs, args.warmup + args.iters)
    print(report(runs, args.warmup, args.components))
    return B.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
