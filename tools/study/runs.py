"""Running the study: plan the runs, skip finished ones, launch each as a child process within the time budget,
keep their metrics files, pack them."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import ENTRY, ROOT
from .configs import load_cfg, method_config, run_dir, run_name, run_overrides, train_net_command
from .metrics import RunProblem, load_run
from .report import EXIT_INCOMPLETE, report

# run-folder files that --pack keeps (checkpoints and event files stay behind)
PACKED_FILES = ("study_run.json", "metrics.json", "config.yaml", "log.txt", "child.log")


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


def child_env(parallel: int, environ: Optional[Dict[str, str]] = None, cpu_count: Optional[int] = None):
    """The environment of each child run, and a warning (or None). With ``parallel`` > 1 runs at once and no
    ``OMP_NUM_THREADS`` set, each run gets ``max(1, cpu_count // parallel)`` threads: torch's default of one thread
    per core in every run oversubscribes the cores, and OpenMP's waiting threads then slow every run down many-fold
    (2 runs x 2 threads on 2 cores: 6-12 s per burn-in iteration of the CPU study against 0.24 s with 1 thread each).
    A set ``OMP_NUM_THREADS`` is kept as it is; the warning names it when it oversubscribes the cores."""
    from semiseg_d2.data.io import default_num_workers  # the CPUs this process may use (affinity, not all cores)

    environ = os.environ if environ is None else environ
    cpu_count = cpu_count or default_num_workers()
    env = dict(environ, RUN_STUDY_CONCURRENT=str(parallel), PYTHONUNBUFFERED="1")
    warning = None
    if "OMP_NUM_THREADS" in environ:
        try:
            threads = int(environ["OMP_NUM_THREADS"])
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a whole number of threads, got {environ['OMP_NUM_THREADS']!r}")
        if threads * parallel > cpu_count:
            warning = (f"OMP_NUM_THREADS={threads} x --parallel {parallel} runs = {threads * parallel} threads on "
                       f"{cpu_count} cores: the runs will slow each other down many-fold; set OMP_NUM_THREADS="
                       f"{max(1, cpu_count // parallel)} (or unset it: the study then divides the cores)")
    elif parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count // parallel))
    return env, warning


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
    env, warning = child_env(args.parallel)
    if warning and todo:
        print(f"[run_study] warning: {warning}", file=sys.stderr)

    def launch(job):
        method, seed, out_dir, overrides = job
        os.makedirs(out_dir, exist_ok=True)
        cmd = [sys.executable, ENTRY, "--child", "--config-file", method_config(method),
               "--method", method, "--frames", ",".join(frames), "--study-command", study_command, *overrides]
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
        status = max(status, report(report_roots(args), args.methods, args.seeds, args.doc, args.figures_dir,
                                       args.controls_root))
    if args.pack:
        pack([root], args.pack)
    return status
