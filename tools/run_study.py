#!/usr/bin/env python
"""The CamVid 1/8 study: every method against the supervised baseline, several seeds, one report.

Run the study (each method x seed in its own process; runs whose final metrics exist are skipped):

    python tools/run_study.py                                   # 7 methods x seeds 0 1 -> output/camvid_study
    python tools/run_study.py --methods supervised_46 dgcl --seeds 0 --time-budget 540 --pack $OUT/part1.tar.gz
    python tools/run_study.py --only dgcl/1 ddfp                # just these runs (method or method/seed)

The CPU protocol (configs/camvid/protocol_cpu.yaml on top of every method's config; `make study-cpu`): runs train
under output/camvid_cpu, each finished run's metrics files are copied to docs/results/camvid_cpu/<method>/seed<k>/
(the committed results; runs found there are skipped) and the report is docs/results/camvid_cpu.md:

    python tools/run_study.py --protocol cpu --methods supervised_46 mean_teacher --seeds 0

Only write the report from existing run folders (several roots, e.g. unpacked --pack archives):

    python tools/run_study.py --report --runs-root parts/1 parts/2   # -> docs/results/camvid.md + PNGs

Every run folder ``<root>/<method>/seed<k>/`` holds detectron2's ``metrics.json`` (losses, per-iteration ``time``,
every evaluation), ``config.yaml``, ``log.txt``, ``study_run.json`` (status, command, wall time, peak GPU
memory, device) and ``predictions/<frame>.png`` (label maps of the reported network on the figure's val
frames); ``<root>/frames/`` holds those frames and their ground truth. The report reads only these files: the
table's numbers are the final evaluation rows of each run's ``metrics.json``. A run that is missing, unfinished
or unreadable is named in the report and left out of the means (exit status 3).

Runs train exactly as ``tools/train_net.py --config-file <method config> SEED <k> OUTPUT_DIR <run dir> ...``
(the report lists that command per run). Extra ``KEY VALUE`` pairs at the end apply to every run.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (config under configs/camvid, label in the report)
METHODS = OrderedDict(
    [
        ("supervised_46", ("study_supervised_46.yaml", "Supervised, 46 labels")),
        ("supervised_367", ("study_supervised_367.yaml", "Supervised, 367 labels (upper bound)")),
        ("mean_teacher", ("study_mean_teacher.yaml", "Mean Teacher / FixMatch")),
        ("memory_contrast", ("study_memory_contrast.yaml", "Memory bank (Alonso et al.)")),
        ("dgcl", ("study_dgcl.yaml", "DGCL")),
        ("ddfp", ("study_ddfp.yaml", "DDFP")),
        ("dgcl_ddfp", ("study_dgcl_ddfp.yaml", "DGCL + DDFP")),
        ("unimatch", ("study_unimatch.yaml", "UniMatch")),
    ]
)
CONFIG_DIR = os.path.join("configs", "camvid")
DEFAULT_SEEDS = (0, 1)
BASELINE = "supervised_46"
DEFAULT_OUTPUT = os.path.join("output", "camvid_study")
DEFAULT_DOC = os.path.join("docs", "results", "camvid.md")
# --protocol: the file merged (as KEY VALUE overrides) on top of every method's config, where runs train, where
# their metrics files are kept (None: only in the run folders) and the report
PROTOCOLS = {
    "gpu": {"file": None, "output": DEFAULT_OUTPUT, "results": None, "doc": DEFAULT_DOC, "seeds": DEFAULT_SEEDS},
    "cpu": {
        "file": os.path.join(CONFIG_DIR, "protocol_cpu.yaml"),
        "output": os.path.join("output", "camvid_cpu"),
        "results": os.path.join("docs", "results", "camvid_cpu"),
        "doc": os.path.join("docs", "results", "camvid_cpu.md"),
        "figures": os.path.join("docs", "results", "camvid_cpu"),
        "seeds": (0, 1, 2),
    },
}
DOC_BEGIN = "<!-- run_study.py: begin generated results (do not edit by hand) -->"
DOC_END = "<!-- run_study.py: end generated results -->"
PREDICTIONS_PNG = "camvid_predictions.png"
CURVES_PNG = "camvid_curves.png"
DIAGNOSTICS_PNG = "camvid_pseudo_labels.png"
DIAG_PREFIX = "pl_diag/"  # SEMI.DIAGNOSTICS rows of metrics.json (semiseg_d2/evaluation/pseudo_label_diagnostics.py)
EXIT_INCOMPLETE = 3
# --data mini: the bundled camvid_mini frames stand in for the full dataset (CPU smoke runs, tests)
MINI_DATASETS = {
    "camvid_train_46_labeled": "camvid_mini_train_5_labeled",
    "camvid_train_46_unlabeled": "camvid_mini_train_5_unlabeled",
    "camvid_train": "camvid_mini_train",
    "camvid_val": "camvid_mini_val",
}
# run-folder files that --pack keeps (checkpoints and event files stay behind)
PACKED_FILES = ("study_run.json", "metrics.json", "config.yaml", "log.txt", "child.log")


class RunProblem(Exception):
    """A run that cannot enter the table; the message says why."""


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--figures-dir", default=None, help="where the PNGs go (default: the doc's folder)")
    p.add_argument("--no-report", action="store_true", help="train only")
    p.add_argument("--pack", default=None, metavar="OUT.tar.gz", help="archive the run folders' metrics (no checkpoints)")
    p.add_argument("--data", choices=("full", "mini"), default="full", help="mini: bundled camvid_mini frames (smoke runs)")
    p.add_argument("--schedule-scale", type=float, default=1.0, help="multiply MAX_ITER, warm-up, eval period, SEMI *_ITER(S)")
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


def run_name(method: str, seed: int) -> str:
    return f"{method}/seed{seed}"


def run_dir(root: str, method: str, seed: int) -> str:
    return os.path.join(root, method, f"seed{seed}")


# ----------------------------------------------------------------------------------------------- configs
def method_config(method: str) -> str:
    return os.path.join(CONFIG_DIR, METHODS[method][0])


def load_cfg(config_file: str, overrides: Sequence[str]):
    from semiseg_d2.config import get_semiseg_cfg

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config_file) if not os.path.isabs(config_file) else config_file)
    cfg.merge_from_list(list(overrides))
    return cfg


def schedule_overrides(cfg, scale: float) -> List[str]:
    """KEY VALUE pairs multiplying every iteration count of the schedule by ``scale`` (rounded, >= 1 where > 0):
    SOLVER.MAX_ITER / WARMUP_ITERS, TEST.EVAL_PERIOD and, for semi-supervised configs, the iteration counts the
    config and its terms declare (``semiseg_d2.config.schedule_keys``: burn-in, term and bank starts)."""
    from semiseg_d2.config import schedule_keys
    from semiseg_d2.modeling import is_semi_supervised

    if scale == 1.0:
        return []
    keys = ["SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "TEST.EVAL_PERIOD"]
    if is_semi_supervised(cfg):
        keys += schedule_keys(cfg)
    out = []
    for key in sorted(keys):
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node > 0:
            out += [key, str(max(1, int(round(node * scale))))]
    return out


def protocol_overrides(protocol_file: Optional[str]) -> List[str]:
    """The protocol YAML as KEY VALUE pairs (``MODEL.DEVICE cpu ...``), in file order; [] without a file."""
    if protocol_file is None:
        return []
    import yaml

    path = os.path.join(ROOT, protocol_file)
    with open(path) as f:
        tree = yaml.safe_load(f)
    if not isinstance(tree, dict) or "_BASE_" in tree:
        raise ValueError(f"{protocol_file}: a protocol is a mapping of config keys (no _BASE_)")
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                out.extend([prefix + key, value if isinstance(value, str) else str(value)])

    walk(tree, "")
    return out


def data_overrides(cfg, data: str) -> List[str]:
    """KEY VALUE pairs renaming the full-CamVid datasets to the bundled mini ones (``--data mini``)."""
    if data == "full":
        return []
    out = []
    keys = [("DATASETS." + k, cfg.DATASETS[k]) for k in ("TRAIN", "TRAIN_LABELED", "TRAIN_UNLABELED", "TEST")]
    for key, names in keys + [("SEMI.DIAGNOSTICS.GT_DATASETS", cfg.SEMI.DIAGNOSTICS.GT_DATASETS)]:
        names = list(names)
        if not names:
            continue
        missing = [n for n in names if n not in MINI_DATASETS]
        if missing:
            raise ValueError(f"--data mini: {key} names {missing}, which have no camvid_mini equivalent")
        out += [key, "(" + "".join(f'"{MINI_DATASETS[n]}", ' for n in names).rstrip(" ") + ")"]
    return out


def run_overrides(method: str, seed: int, out_dir: str, args) -> List[str]:
    """Every KEY VALUE pair that turns the method's config into this run (recorded in the run's command): the
    protocol's keys first, so the schedule scale multiplies the protocol's schedule."""
    protocol = protocol_overrides(PROTOCOLS[args.protocol]["file"])
    cfg = load_cfg(method_config(method), protocol)
    return (
        ["SEED", str(seed), "OUTPUT_DIR", out_dir]
        + protocol
        + data_overrides(cfg, args.data)
        + schedule_overrides(cfg, args.schedule_scale)
        + list(args.opts)
    )


def train_net_command(config_file: str, overrides: Sequence[str]) -> str:
    return " ".join(["python tools/train_net.py --config-file", shlex.quote(config_file)] + [shlex.quote(o) for o in overrides])


# ----------------------------------------------------------------------------------------------- frames
def write_frames(root: str, dataset_name: str, num_frames: int) -> List[str]:
    """Copy ``num_frames`` evenly spaced frames of ``dataset_name`` (image + train-id label) to ``root/frames``;
    returns their ids. Kept if already there for the same dataset (every run of a study uses the same frames)."""
    from detectron2.data import DatasetCatalog

    from semiseg_d2.data.label_io import load_sem_seg

    frames_dir = os.path.join(root, "frames")
    index_path = os.path.join(frames_dir, "frames.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if index["dataset"] == dataset_name and len(index["frames"]) == num_frames:
            return [fr["id"] for fr in index["frames"]]
        raise ValueError(
            f"{index_path} holds {len(index['frames'])} frames of '{index['dataset']}', but this study evaluates on "
            f"'{dataset_name}' with --num-frames {num_frames}: use another --output-root"
        )
    records = sorted(DatasetCatalog.get(dataset_name), key=lambda r: r["image_id"])
    if num_frames > len(records):
        raise ValueError(f"--num-frames {num_frames}: '{dataset_name}' has only {len(records)} frames")
    picks = [records[round(i * (len(records) - 1) / max(num_frames - 1, 1))] for i in range(num_frames)]
    os.makedirs(frames_dir, exist_ok=True)
    from PIL import Image

    frames = []
    for r in picks:
        image = r["image_id"] + "_image" + os.path.splitext(r["file_name"])[1].lower()
        label = r["image_id"] + "_label.png"
        shutil.copyfile(r["file_name"], os.path.join(frames_dir, image))
        Image.fromarray(load_sem_seg(r["sem_seg_file_name"], dataset_name)).save(os.path.join(frames_dir, label))
        frames.append({"id": r["image_id"], "image": image, "label": label})
    with open(index_path, "w") as f:
        json.dump({"dataset": dataset_name, "frames": frames}, f, indent=1)
    return [fr["id"] for fr in frames]


# ----------------------------------------------------------------------------------------------- one run (child)
def child_main(args) -> int:
    """Train one run like tools/train_net.py, then record predictions, peak memory and the run's summary."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import default_setup
    from PIL import Image

    from semiseg_d2.data.mapper import SemSegDatasetMapper
    from semiseg_d2.engine.hooks import unwrap_model
    from semiseg_d2.engine.trainer import build_trainer
    from semiseg_d2.modeling import is_semi_supervised

    cfg = load_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, resume=True, opts=args.opts))
    cuda = str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    wall = time.perf_counter() - start
    peak_alloc = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved() / 2**20 if cuda else None

    semi = is_semi_supervised(cfg)
    networks = [n for n, on in (("student", cfg.TEST.EVAL_STUDENT), ("teacher", cfg.TEST.EVAL_TEACHER)) if on] if semi else [""]
    main_network = ("teacher" if "teacher" in networks else networks[0]) if semi else ""
    test_name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(test_name)

    model = unwrap_model(trainer.model)
    model.eval()
    if semi:
        model.eval_network = main_network
    mapper = SemSegDatasetMapper(cfg, False)
    by_id = {r["image_id"]: r for r in DatasetCatalog.get(test_name)}
    frames = [f for f in args.frames.split(",") if f]
    pred_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    os.makedirs(pred_dir, exist_ok=True)
    with torch.no_grad():
        for frame in frames:
            if frame not in by_id:
                raise KeyError(f"figure frame '{frame}' is not in '{test_name}'")
            probs = model([mapper(by_id[frame])])[0]["sem_seg"]
            Image.fromarray(probs.argmax(0).to("cpu", torch.uint8).numpy()).save(os.path.join(pred_dir, frame + ".png"))

    summary = {
        "method": args.method,
        "seed": int(cfg.SEED),
        "status": "done",
        "config_file": args.config_file,
        "overrides": list(args.opts),
        "train_command": train_net_command(args.config_file, args.opts),
        "study_command": args.study_command,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "max_iter": int(cfg.SOLVER.MAX_ITER),
        "burn_in_iters": int(cfg.SEMI.BURN_IN_ITERS) if semi else 0,
        "batch": [int(cfg.SOLVER.IMS_PER_BATCH), int(cfg.SOLVER.IMS_PER_BATCH_UNLABELED) if semi else 0],
        "networks": networks,
        "main_network": main_network,
        "test_dataset": test_name,
        "classes": list(meta.stuff_classes),
        "colors": [list(c) for c in meta.stuff_colors],
        "frames": frames,
        "wall_s": wall,
        "peak_mem_allocated_mib": peak_alloc,
        "peak_mem_reserved_mib": peak_reserved,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "concurrent_runs": int(os.environ.get("RUN_STUDY_CONCURRENT", "1")),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    tmp = os.path.join(cfg.OUTPUT_DIR, "study_run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(cfg.OUTPUT_DIR, "study_run.json"))
    return 0


# ----------------------------------------------------------------------------------------------- reading runs
def read_metrics(path: str) -> List[Dict]:
    """detectron2's metrics.json (one JSON object per line); rows of a resumed run's repeated iterations: last wins."""
    if not os.path.isfile(path):
        raise RunProblem("no metrics.json")
    rows: "OrderedDict[int, Dict]" = OrderedDict()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                it = int(row["iteration"])
            except (ValueError, KeyError, TypeError) as e:
                raise RunProblem(f"metrics.json line {n} is not a detectron2 metrics row ({e})") from None
            rows.setdefault(it, {}).update(row)
    return [rows[k] for k in sorted(rows)]


def seconds_per_iter(rows: Sequence[Dict], burn_in: int) -> Optional[float]:
    """Mean of the writer's ``time`` (median over its 20-iteration window) over windows after burn-in, without
    the first window (start-up, cuDNN autotuning); falls back to every window but the first, then to all."""
    timed = [(r["iteration"], r["time"]) for r in rows if isinstance(r.get("time"), (int, float))]
    if not timed:
        return None
    later = [t for it, t in timed[1:] if it - 19 >= burn_in]
    pick = later or [t for _, t in timed[1:]] or [t for _, t in timed]
    return sum(pick) / len(pick)


def load_run(path: str, method: str, seed: int) -> Dict:
    """Everything the report needs from one run folder; raises RunProblem naming what is wrong."""
    if not os.path.isdir(path):
        raise RunProblem("no run folder")
    summary_path = os.path.join(path, "study_run.json")
    if not os.path.isfile(summary_path):
        raise RunProblem("unfinished: no study_run.json (see log.txt / child.log)")
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except ValueError as e:
        raise RunProblem(f"study_run.json is not JSON ({e})") from None
    for key in ("status", "max_iter", "main_network", "classes", "burn_in_iters"):
        if key not in summary:
            raise RunProblem(f"study_run.json has no '{key}'")
    if summary["status"] != "done":
        raise RunProblem(f"study_run.json status '{summary['status']}'")
    if (summary.get("method"), summary.get("seed")) != (method, seed):
        raise RunProblem(f"study_run.json describes {summary.get('method')}/seed{summary.get('seed')}")
    rows = read_metrics(os.path.join(path, "metrics.json"))
    prefix = f"{summary['main_network']}/sem_seg/" if summary["main_network"] else "sem_seg/"
    max_iter = summary["max_iter"]
    final = [r for r in rows if r["iteration"] == max_iter and prefix + "mIoU" in r]
    if not final:
        raise RunProblem(f"metrics.json has no final evaluation ({prefix}mIoU at iteration {max_iter})")
    final = final[-1]
    per_class = OrderedDict()
    for c in summary["classes"]:
        if prefix + "IoU-" + c not in final:
            raise RunProblem(f"metrics.json final evaluation has no {prefix}IoU-{c}")
        per_class[c] = float(final[prefix + "IoU-" + c])
    student = final.get("student/sem_seg/mIoU") if summary["main_network"] else None
    return {
        "method": method,
        "seed": seed,
        "path": path,
        "summary": summary,
        "miou": float(final[prefix + "mIoU"]),
        "student_miou": None if student is None else float(student),
        "per_class": per_class,
        "s_per_iter": seconds_per_iter(rows, summary["burn_in_iters"]),
        "loss_curve": [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r],
        "miou_curve": [(r["iteration"], r[prefix + "mIoU"]) for r in rows if prefix + "mIoU" in r],
        "network_curves": {n: [(r["iteration"], r[f"{n}/sem_seg/mIoU"]) for r in rows if f"{n}/sem_seg/mIoU" in r]
                           for n in summary.get("networks", []) if n},
        "diagnostics": [r for r in rows if DIAG_PREFIX + "kept_fraction" in r],
    }


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def collect_runs(roots: Sequence[str], methods: Sequence[str], seeds: Sequence[int]) -> Tuple[Dict, Dict]:
    """(runs, problems): runs[(method, seed)] = load_run(...); problems[(method, seed)] = reason. A run found
    complete in two roots counts once if both copies hold the same metrics.json (archives of successive device
    calls on one machine repeat earlier runs), else it is an error (which one counts would be a guess)."""
    runs, problems = {}, {}
    for method in methods:
        for seed in seeds:
            found, reasons = [], []
            for root in roots:
                path = run_dir(root, method, seed)
                try:
                    found.append(load_run(path, method, seed))
                except RunProblem as e:
                    if os.path.isdir(path) or len(roots) == 1:
                        reasons.append(f"{str(e)} [{path}]" if len(roots) > 1 else str(e))
            if len({_file_bytes(os.path.join(r["path"], "metrics.json")) for r in found}) > 1:
                raise ValueError(
                    f"run {run_name(method, seed)} is complete in several roots with different metrics.json: "
                    f"{[r['path'] for r in found]}; keep one"
                )
            if found:
                runs[(method, seed)] = found[0]
            else:
                problems[(method, seed)] = "; ".join(reasons) or "no run folder in any of " + ", ".join(roots)
    return runs, problems


# ----------------------------------------------------------------------------------------------- statistics
def mean_spread(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """(mean, sample standard deviation) over seeds; the deviation is None for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(x: Optional[float], digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_mean_spread(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean, spread = mean_spread(values)
    return f"{mean:.2f} ± {fmt(spread)}"


def summarize(runs: Dict, methods: Sequence[str], seeds: Sequence[int]) -> "OrderedDict[str, Dict]":
    rows = OrderedDict()
    for method in methods:
        got = [runs[(method, s)] for s in seeds if (method, s) in runs]
        rows[method] = {
            "runs": got,
            "miou": [r["miou"] for r in got],
            "student": [r["student_miou"] for r in got if r["student_miou"] is not None],
            "s_per_iter": [r["s_per_iter"] for r in got if r["s_per_iter"] is not None],
            "peak_gib": [r["summary"]["peak_mem_allocated_mib"] / 1024 for r in got if r["summary"].get("peak_mem_allocated_mib")],
            "wall_min": [r["summary"]["wall_s"] / 60 for r in got if r["summary"].get("wall_s") is not None],
        }
    return rows


def _mean_or_none(values):
    return statistics.fmean(values) if values else None


def _finite_mean(values):
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else None


# ----------------------------------------------------------------------------------------------- report
def render_block(runs: Dict, problems: Dict, methods: Sequence[str], seeds: Sequence[int], figures: Dict[str, str]) -> str:
    expected = len(methods) * len(seeds)
    lines = [DOC_BEGIN, ""]
    if not runs:
        lines += [
            "**The study has not been run yet**: none of the "
            f"{expected} runs ({len(methods)} methods × seeds {', '.join(map(str, seeds))}) has results. "
            "See \"How to run\" below.",
            "",
            DOC_END,
        ]
        return "\n".join(lines) + "\n"
    rows = summarize(runs, methods, seeds)
    any_run = next(iter(runs.values()))
    classes = any_run["summary"]["classes"]
    lines.append(
        f"Generated by `tools/run_study.py` from the runs' own `metrics.json` / `study_run.json`: {len(runs)} of "
        f"{expected} runs complete ({len(methods)} methods × seeds {', '.join(map(str, seeds))}). val mIoU = the "
        "final evaluation on the val frames of the reported network (EMA teacher for semi-supervised runs, the student "
        "for UniMatch, whose teacher is the student itself, the model for supervised ones); ± = sample standard deviation over seeds (— for one seed)."
    )
    lines.append("")
    base = rows.get(BASELINE)
    base_ms = mean_spread(base["miou"]) if base and base["miou"] else None
    lines.append(
        "| method | runs | val mIoU | per seed | Δ vs supervised-46 | Δ > both spreads | student mIoU | s/iter | "
        "peak GPU mem (GiB) | wall / run (min) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for method, row in rows.items():
        got = row["runs"]
        per_seed = " / ".join(f"{r['miou']:.2f}" for r in got) or "—"
        delta, beats = "—", "—"
        if base_ms and row["miou"] and method != BASELINE:
            m, s = mean_spread(row["miou"])
            d = m - base_ms[0]
            delta = f"{d:+.2f}"
            if s is not None and base_ms[1] is not None:
                beats = "yes" if d > s + base_ms[1] else "no"
        peak = _mean_or_none(row["peak_gib"])
        lines.append(
            f"| {METHODS[method][1]} (`{method}`) | {len(got)} of {len(seeds)} | {fmt_mean_spread(row['miou'])} | "
            f"{per_seed} | {delta} | {beats} | {fmt_mean_spread(row['student']) if row['student'] else '—'} | "
            f"{fmt(_mean_or_none(row['s_per_iter']), 3)} | "
            f"{fmt(peak) if peak is not None else 'unmeasured (CPU)' if got else '—'} | "
            f"{fmt(_mean_or_none(row['wall_min']), 1)} |"
        )
    lines += [
        "",
        "\"Δ > both spreads\": the mean gain over supervised-46 exceeds the sum of the two rows' standard deviations. "
        "s/iter: mean of detectron2's per-20-iteration `time` over the windows after burn-in (first window left out); "
        "peak GPU memory: `torch.cuda.max_memory_allocated` over training and evaluation; wall: training + all "
        "evaluations.",
    ]
    shared = sorted({r["summary"].get("concurrent_runs", 1) for r in runs.values()})
    if shared != [1]:
        lines.append(
            f"**Timing caveat**: runs shared the GPU with up to {max(shared) - 1} other run(s) (`--parallel`); s/iter "
            "and wall time are not those of a dedicated GPU."
        )
    lines += ["", "Per-class val IoU (reported network, mean over seeds):", ""]
    lines.append("| method | " + " | ".join(classes) + " |")
    lines.append("|---" * (len(classes) + 1) + "|")
    for method, row in rows.items():
        cells = [fmt(_finite_mean([r["per_class"][c] for r in row["runs"]])) if row["runs"] else "—" for c in classes]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    lines += render_diagnostics(runs, methods, seeds, classes, figures.get("diagnostics"))
    if problems:
        lines += ["", f"**Runs missing or failed ({len(problems)})** — not in the means above:", ""]
        lines += [f"- `{run_name(m, s)}`: {reason}" for (m, s), reason in sorted(problems.items())]
    lines += [
        "",
        f"![predictions of each method on the same val frames]({figures['predictions']})",
        "",
        f"![training curves]({figures['curves']})",
        "",
        "Environment: "
        + "; ".join(
            sorted({f"{r['summary'].get('device')}, torch {r['summary'].get('torch')}" for r in runs.values()})
        )
        + ".",
        "",
        "Commands (each run trains exactly as this `tools/train_net.py` call):",
        "",
        "```bash",
    ]
    for method in methods:
        for seed in seeds:
            if (method, seed) in runs:
                lines.append(runs[(method, seed)]["summary"]["train_command"])
    lines.append("```")
    study_cmds = sorted({r["summary"].get("study_command", "") for r in runs.values()} - {""})
    if study_cmds:
        lines += ["", "Study invocations that produced these runs:", "", "```bash", *study_cmds, "```"]
    lines += ["", DOC_END]
    return "\n".join(lines) + "\n"


def _last(rows: Sequence[Dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return float(values[-1]) if values else None


def render_diagnostics(runs: Dict, methods: Sequence[str], seeds: Sequence[int], classes: Sequence[str],
                       figure: Optional[str]) -> List[str]:
    """Teacher vs student mIoU at every evaluation and the pseudo-label diagnostics (``SEMI.DIAGNOSTICS``) at the
    end of each semi-supervised run; [] when no run has either."""
    semi = [(m, s) for m in methods for s in seeds if (m, s) in runs and len(runs[(m, s)]["network_curves"]) == 2]
    if not semi:
        return []
    lines = ["", "Teacher vs student val mIoU at each evaluation (iteration: teacher / student):", ""]
    for m, s in semi:
        curves = runs[(m, s)]["network_curves"]
        student = dict(curves["student"])
        cells = [f"{it}: {t:.2f} / {student[it]:.2f}" for it, t in curves["teacher"] if it in student]
        lines.append(f"- `{run_name(m, s)}`: " + "; ".join(cells))
    with_diag = [(m, s) for m, s in semi if runs[(m, s)]["diagnostics"]]
    if not with_diag:
        return lines
    lines += [
        "",
        "Pseudo-labels against the unlabeled frames' ground truth (`SEMI.DIAGNOSTICS`, never read by a loss), last "
        f"logged row of each run (ratios over its last `SEMI.DIAGNOSTICS.WINDOW` steps, in %): kept = pixels the "
        "filter keeps; kept accuracy = pseudo-label right among kept pixels with ground truth; all = the same without "
        "the filter.",
        "",
        "| run | kept fraction | kept accuracy | all-pixel accuracy |",
        "|---|---|---|---|",
    ]
    pct = lambda v: fmt(None if v is None else 100 * v, 1)  # noqa: E731
    for m, s in with_diag:
        rows = runs[(m, s)]["diagnostics"]
        lines.append(f"| `{run_name(m, s)}` | {pct(_last(rows, DIAG_PREFIX + 'kept_fraction'))} | "
                     f"{pct(_last(rows, DIAG_PREFIX + 'kept_accuracy'))} | {pct(_last(rows, DIAG_PREFIX + 'all_accuracy'))} |")
    lines += ["", "Per class, last logged row (precision / recall / share of the kept pixels, %):", "",
              "| run | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for m, s in with_diag:
        rows = runs[(m, s)]["diagnostics"]
        cells = [" / ".join(pct(_last(rows, f"{DIAG_PREFIX}{kind}-{c}")) for kind in ("precision", "recall", "kept_share"))
                 for c in classes]
        lines.append(f"| `{run_name(m, s)}` | " + " | ".join(cells) + " |")
    if figure:
        lines += ["", f"![pseudo-label diagnostics and teacher vs student]({figure})"]
    return lines


def plot_diagnostics(runs: Dict, path: str) -> bool:
    """Teacher and student val mIoU, kept fraction and kept / all-pixel accuracy of the pseudo-labels over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    semi = [(k, r) for k, r in sorted(runs.items()) if len(r["network_curves"]) == 2 or r["diagnostics"]]
    if not semi:
        return False
    fig, (ax_net, ax_kept, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, ((m, s), run) in enumerate(semi):
        color, name = f"C{i}", run_name(m, s)
        for network, style in (("teacher", "-"), ("student", "--")):
            if network in run["network_curves"] and run["network_curves"][network]:
                ax_net.plot(*zip(*run["network_curves"][network]), style, color=color, marker="o", ms=3,
                            label=f"{name} {network}")
        rows = run["diagnostics"]
        if rows:
            its = [r["iteration"] for r in rows]
            ax_kept.plot(its, [r[DIAG_PREFIX + "kept_fraction"] for r in rows], color=color, label=name)
            ax_acc.plot(its, [r[DIAG_PREFIX + "kept_accuracy"] for r in rows], "-", color=color, label=f"{name} kept")
            ax_acc.plot(its, [r[DIAG_PREFIX + "all_accuracy"] for r in rows], ":", color=color, label=f"{name} all")
    ax_net.set(xlabel="iteration", ylabel="val mIoU (%)", title="teacher (solid) vs student (dashed)")
    ax_kept.set(xlabel="iteration", ylabel="fraction", title="kept fraction of the pseudo-label pixels")
    ax_acc.set(xlabel="iteration", ylabel="accuracy", title="pseudo-label accuracy: kept (solid), all (dotted)")
    for ax in (ax_net, ax_kept, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_doc(doc: str, block: str) -> None:
    """Replace the generated block of ``doc`` (between DOC_BEGIN / DOC_END), or create the doc with it."""
    if os.path.isfile(doc):
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        b, e = text.find(DOC_BEGIN), text.find(DOC_END)
        if (b < 0) != (e < 0) or e < b:
            raise ValueError(f"{doc}: the generated-results markers are broken (need '{DOC_BEGIN}' then '{DOC_END}')")
        text = text[:b] + block.rstrip("\n") + text[e + len(DOC_END):] if b >= 0 else text.rstrip("\n") + "\n\n" + block
    else:
        text = "# CamVid 1/8 study\n\n" + block
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc, "w", encoding="utf-8") as f:
        f.write(text)


def read_block(doc: str) -> str:
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    return text[text.index(DOC_BEGIN): text.index(DOC_END) + len(DOC_END)]


def _find_frames(roots: Sequence[str]):
    for root in roots:
        index = os.path.join(root, "frames", "frames.json")
        if os.path.isfile(index):
            with open(index) as f:
                return os.path.join(root, "frames"), json.load(f)
    return None, None


def plot_predictions(runs: Dict, methods: Sequence[str], seeds: Sequence[int], roots: Sequence[str], path: str) -> bool:
    """Rows: the study's val frames; columns: image | ground truth | each method (lowest complete seed)."""
    import numpy as np
    from PIL import Image

    from semiseg_d2.utils.visualizer import colorize, save_grid

    frames_dir, index = _find_frames(roots)
    if index is None or not runs:
        return False
    any_run = next(iter(runs.values()))
    meta = SimpleNamespace(stuff_colors=any_run["summary"]["colors"])
    columns = [(m, next(runs[(m, s)] for s in sorted(seeds) if (m, s) in runs)) for m in methods
               if any((m, s) in runs for s in seeds)]
    rows = []
    for fr in index["frames"]:
        image = np.asarray(Image.open(os.path.join(frames_dir, fr["image"])).convert("RGB"))
        row = [image, colorize(np.asarray(Image.open(os.path.join(frames_dir, fr["label"]))), meta)]
        for _, run in columns:
            pred = os.path.join(run["path"], "predictions", fr["id"] + ".png")
            row.append(colorize(np.asarray(Image.open(pred)), meta) if os.path.isfile(pred) else np.full_like(image, 127))
        rows.append(row)
    titles = ["image", "ground truth"] + [f"{m} (seed {r['seed']})" for m, r in columns]
    save_grid(rows, titles, path, scale=2.0)
    return True


def plot_curves(runs: Dict, methods: Sequence[str], path: str) -> bool:
    """Training loss and val mIoU of the reported network against iteration, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        return False
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, method in enumerate(methods):
        color = f"C{i}"
        first = True
        for (m, s), run in sorted(runs.items()):
            if m != method:
                continue
            label = method if first else None
            first = False
            if run["loss_curve"]:
                marker = "o" if len(run["loss_curve"]) < 5 else None  # a line of one point would not show
                ax_loss.plot(*zip(*run["loss_curve"]), color=color, marker=marker, ms=3, lw=1, alpha=0.8, label=label)
            if run["miou_curve"]:
                ax_miou.plot(*zip(*run["miou_curve"]), color=color, marker="o", ms=3, lw=1, alpha=0.8, label=label)
    ax_loss.set(xlabel="iteration", ylabel="total training loss", yscale="log", title="training loss (each seed)")
    ax_miou.set(xlabel="iteration", ylabel="val mIoU (%)", title="val mIoU of the reported network (each seed)")
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def report(roots: Sequence[str], methods: Sequence[str], seeds: Sequence[int], doc: str, figures_dir: Optional[str]) -> int:
    """Write the doc's generated block and the two PNGs; returns EXIT_INCOMPLETE when a run is missing/failed."""
    runs, problems = collect_runs(roots, methods, seeds)
    figures_dir = figures_dir or os.path.dirname(os.path.abspath(doc))
    os.makedirs(figures_dir, exist_ok=True)
    pred_png, curves_png = os.path.join(figures_dir, PREDICTIONS_PNG), os.path.join(figures_dir, CURVES_PNG)
    diag_png = os.path.join(figures_dir, DIAGNOSTICS_PNG)
    diag = False
    if runs:
        plot_predictions(runs, methods, seeds, roots, pred_png)
        plot_curves(runs, methods, curves_png)
        diag = plot_diagnostics(runs, diag_png)
    doc_dir = os.path.dirname(os.path.abspath(doc))
    figures = {"predictions": os.path.relpath(pred_png, doc_dir), "curves": os.path.relpath(curves_png, doc_dir),
               "diagnostics": os.path.relpath(diag_png, doc_dir) if diag else None}
    write_doc(doc, render_block(runs, problems, methods, seeds, figures))
    print(f"[run_study] report: {len(runs)} of {len(methods) * len(seeds)} runs -> {doc}")
    for (m, s), reason in sorted(problems.items()):
        print(f"[run_study]   {run_name(m, s)}: {reason}", file=sys.stderr)
    return EXIT_INCOMPLETE if problems else 0


# ----------------------------------------------------------------------------------------------- pack
def pack(roots: Sequence[str], out_path: str, limit_mib: float = 16.0) -> List[str]:
    """tar.gz of each root's frames/ and run folders' metrics files + predictions (no checkpoints), paths relative
    to the root (unpack several into separate folders and pass them to --report --runs-root)."""
    members = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            parts = [] if rel == "." else rel.split(os.sep)
            for name in sorted(filenames):
                keep = (
                    (parts[:1] == ["frames"])
                    or (len(parts) == 2 and name in PACKED_FILES)
                    or (len(parts) == 3 and parts[2] == "predictions" and name.endswith(".png"))
                )
                if keep:
                    members.append((os.path.join(dirpath, name), os.path.join(*parts, name)))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with tarfile.open(out_path, "w:gz") as tar:
        for src, arc in members:
            tar.add(src, arcname=arc)
    size = os.path.getsize(out_path) / 2**20
    print(f"[run_study] packed {len(members)} files into {out_path} ({size:.2f} MiB)")
    if size > limit_mib:
        print(f"[run_study] WARNING: {out_path} is {size:.1f} MiB, over {limit_mib} MiB", file=sys.stderr)
    return [arc for _, arc in members]


# ----------------------------------------------------------------------------------------------- study driver
def is_complete(root: str, method: str, seed: int) -> bool:
    try:
        load_run(run_dir(root, method, seed), method, seed)
        return True
    except RunProblem:
        return False


def keep_results(root: str, results_dir: str, method: str, seed: int) -> List[str]:
    """Copy a finished run's --pack files (metrics, config, logs, prediction PNGs; no checkpoints) and the study's
    frames/ from ``root`` to the same places under ``results_dir``; returns the copied paths."""
    copied = []
    pairs = [(os.path.join(root, "frames"), os.path.join(results_dir, "frames"), lambda n: True),
             (run_dir(root, method, seed), run_dir(results_dir, method, seed), lambda n: n in PACKED_FILES),
             (os.path.join(run_dir(root, method, seed), "predictions"),
              os.path.join(run_dir(results_dir, method, seed), "predictions"), lambda n: n.endswith(".png"))]
    for src, dst, keep in pairs:
        if not os.path.isdir(src):
            continue
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if keep(name) and os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
                copied.append(os.path.join(dst, name))
    return copied


def report_roots(args) -> List[str]:
    """Where the report reads runs: --runs-root, else the results dir (when the protocol keeps one), else the output."""
    return args.runs_root or [args.results_dir or args.output_root]


def _known_duration(root: str, method: str, seeds: Sequence[int], done_walls: Dict[str, List[float]]) -> Optional[float]:
    walls = list(done_walls.get(method, []))
    for s in seeds:
        p = os.path.join(run_dir(root, method, s), "study_run.json")
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    walls.append(float(json.load(f)["wall_s"]))
            except (ValueError, KeyError):
                pass
    if walls:
        return max(walls)
    every = [w for ws in done_walls.values() for w in ws]
    return max(every) if every else None


def run_study(args) -> int:
    root = args.output_root
    planned = [(m, s) for s in args.seeds for m in args.methods if args.only is None or (m, s) in args.only]
    # Resolve every run's config up front: a bad method file or override fails before any training starts.
    jobs = []
    test_sets = set()
    for method, seed in planned:
        out_dir = run_dir(root, method, seed)
        overrides = run_overrides(method, seed, out_dir, args)
        cfg = load_cfg(method_config(method), overrides)
        test_sets.add(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
        jobs.append((method, seed, out_dir, overrides))
    if len(test_sets) > 1:
        raise ValueError(f"the methods evaluate on different datasets {sorted(map(str, test_sets))}; the table needs one")
    todo = []
    for job in jobs:
        if is_complete(root, job[0], job[1]) or (args.results_dir and is_complete(args.results_dir, job[0], job[1])):
            print(f"[run_study] {run_name(job[0], job[1])}: complete, skipped")
        else:
            todo.append(job)
    frames = write_frames(root, test_sets.pop(), args.num_frames) if todo else []
    study_command = " ".join(shlex.quote(a) for a in ["python", "tools/run_study.py"] + sys.argv[1:])
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget > 0 else None
    done_walls: Dict[str, List[float]] = {}
    running: Dict[subprocess.Popen, Tuple] = {}
    pending = list(todo)
    failed = []

    def launch(job):
        method, seed, out_dir, overrides = job
        os.makedirs(out_dir, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config-file", method_config(method),
               "--method", method, "--frames", ",".join(frames), "--study-command", study_command, *overrides]
        env = dict(os.environ, RUN_STUDY_CONCURRENT=str(args.parallel), PYTHONUNBUFFERED="1")
        # Own process group (to stop the run with its data-loader workers), same session: whoever ends this
        # driver's session (a device command's time limit) ends the runs too.
        log = open(os.path.join(out_dir, "child.log"), "a")
        print(f"[run_study] {run_name(method, seed)}: started ({train_net_command(method_config(method), overrides)})")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0)
        running[proc] = (job, log, time.monotonic())

    while pending or running:
        while pending and len(running) < args.parallel:
            job = pending[0]
            if deadline is not None:
                need = _known_duration(root, job[0], args.seeds, done_walls)
                if need is not None and time.monotonic() + need > deadline:
                    print(f"[run_study] {run_name(job[0], job[1])}: not started, needs ~{need:.0f} s, "
                          f"{deadline - time.monotonic():.0f} s of --time-budget left")
                    pending.pop(0)
                    failed.append((job[0], job[1], "not started (time budget)"))
                    continue
            launch(pending.pop(0))
        time.sleep(0.5)
        for proc in list(running):
            job, log, t0 = running[proc]
            if proc.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    failed.append((job[0], job[1], "stopped at the time budget"))
                    print(f"[run_study] {run_name(job[0], job[1])}: stopped at the time budget")
                    log.close()
                    del running[proc]
                continue
            log.close()
            del running[proc]
            name = run_name(job[0], job[1])
            if proc.returncode == 0 and is_complete(root, job[0], job[1]):
                done_walls.setdefault(job[0], []).append(time.monotonic() - t0)
                print(f"[run_study] {name}: done in {time.monotonic() - t0:.0f} s")
                if args.results_dir:
                    keep_results(root, args.results_dir, job[0], job[1])
                    print(f"[run_study] {name}: metrics files kept in {run_dir(args.results_dir, job[0], job[1])}")
            else:
                failed.append((job[0], job[1], f"exit status {proc.returncode}"))
                print(f"[run_study] {name}: FAILED (exit status {proc.returncode}); see {job[2]}/child.log", file=sys.stderr)
    status = EXIT_INCOMPLETE if failed else 0
    if not args.no_report:
        status = max(status, report(report_roots(args), args.methods, args.seeds, args.doc, args.figures_dir))
    if args.pack:
        pack([root], args.pack)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    import semiseg_d2  # noqa: F401  registers the datasets

    if args.report:
        status = report(report_roots(args), args.methods, args.seeds, args.doc, args.figures_dir)
        if args.pack:
            pack(report_roots(args), args.pack)
        return status
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
