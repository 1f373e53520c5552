"""The command line of ``tools/run_study.py``; ``description`` is that file's docstring (the --help text)."""
import argparse
from typing import Sequence

from .child import child_main
from .configs import METHODS, PROTOCOLS, protocol_settings
from .report import report
from .runs import pack, report_roots, run_study


def parse_args(argv=None, description: str = ""):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD", help=f"of: {', '.join(METHODS)}")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="gpu", help="gpu: the study configs as they are; "
                   "cpu: configs/camvid/protocol_cpu.yaml on top (and its output, results and report paths)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (gpu), 0 1 2 (cpu)")
    p.add_argument("--only", nargs="+", default=None, metavar="METHOD[/SEED]", help="run only these (still reported)")
    p.add_argument("--output-root", default=None, help="where run folders are written (default: the protocol's)")
    p.add_argument("--results-dir", default=None, help="finished runs' metrics files are copied here (default: the "
                   "protocol's; none for gpu); runs complete here are skipped and the report reads it")
    p.add_argument("--report", action="store_true", help="do not train: write the report from --runs-root")
    p.add_argument("--runs-root", nargs="+", default=None, help="run-folder roots read by the report (default: --output-root)")
    p.add_argument("--doc", default=None, help="markdown file whose generated block is (re)written (default: the protocol's)")
    p.add_argument("--controls-root", default=None, help="control runs (<root>/<control>/<method>/seed<k>/) tabulated "
                   "in the report beside the study's runs (default: the protocol's; none for gpu)")
    p.add_argument("--figures-dir", default=None, help="where the PNGs go (default: the doc's folder)")
    p.add_argument("--no-report", action="store_true", help="train only")
    p.add_argument("--pack", default=None, metavar="OUT.tar.gz", help="archive the run folders' metrics (no checkpoints)")
    p.add_argument("--data", choices=("full", "mini"), default="full", help="mini: bundled camvid_mini frames (smoke runs)")
    p.add_argument("--schedule-scale", type=float, default=None, help="multiply MAX_ITER, warm-up, eval and "
                   "checkpoint periods and the iteration counts the terms declare (default: the protocol file's "
                   "STUDY.SCHEDULE_SCALE, 2 for cpu; 1 for gpu)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds: start no run expected to end later; stop runs at it")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (they share the GPU: s/iter is then not comparable)")
    p.add_argument("--num-frames", type=int, default=4, help="val frames in the predictions figure")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--frames", default="", help=argparse.SUPPRESS)
    p.add_argument("--study-command", default="", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = p.parse_args(argv)
    if args.child:
        return args
    protocol = PROTOCOLS[args.protocol]
    args.seeds = args.seeds if args.seeds is not None else list(protocol["seeds"])
    args.output_root = args.output_root or protocol["output"]
    args.results_dir = args.results_dir or protocol["results"]
    args.doc = args.doc or protocol["doc"]
    args.figures_dir = args.figures_dir or protocol.get("figures")
    args.controls_root = args.controls_root or protocol.get("controls")
    if args.schedule_scale is None:
        try:
            args.schedule_scale = protocol_settings(protocol["file"])["SCHEDULE_SCALE"]
        except ValueError as e:
            p.error(str(e))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if len(set(args.methods)) != len(args.methods) or len(set(args.seeds)) != len(args.seeds):
        p.error("--methods / --seeds: duplicates")
    if len(args.opts) % 2:
        p.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    if args.schedule_scale <= 0:
        p.error(f"--schedule-scale must be > 0, got {args.schedule_scale}")
    if args.parallel < 1:
        p.error(f"--parallel must be >= 1, got {args.parallel}")
    args.only = parse_only(args.only, args.methods, args.seeds, p.error) if args.only else None
    return args


def parse_only(items: Sequence[str], methods: Sequence[str], seeds: Sequence[int], error) -> set:
    """``["dgcl/1", "ddfp"]`` -> {("dgcl", 1), ("ddfp", s) for every seed}; names must be in methods x seeds."""
    chosen = set()
    for item in items:
        method, _, seed = item.partition("/")
        if method not in methods:
            error(f"--only {item}: method '{method}' is not in --methods {list(methods)}")
        if seed:
            number = seed.removeprefix("seed")
            if not number.isdigit() or int(number) not in seeds:
                error(f"--only {item}: seed '{seed}' is not in --seeds {list(seeds)}")
            chosen.add((method, int(number)))
        else:
            chosen.update((method, s) for s in seeds)
    return chosen


def main(argv=None, description: str = "") -> int:
    args = parse_args(argv, description)
    if args.child:
        return child_main(args)
    import semiseg_d2  # noqa: F401  registers the datasets

    if args.report:
        status = report(report_roots(args), args.methods, args.seeds, args.doc, args.figures_dir, args.controls_root)
        if args.pack:
            pack(report_roots(args), args.pack)
        return status
    return run_study(args)
