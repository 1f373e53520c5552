"""Reading run folders: detectron2's metrics.json and the run's study_run.json -> what the report needs."""
import json
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from .configs import run_dir, run_name

DIAG_PREFIX = "pl_diag/"  # SEMI.DIAGNOSTICS rows of metrics.json (semiseg_d2/evaluation/pseudo_label_diagnostics.py)


class RunProblem(Exception):
    """A run that cannot enter the table; the message says why."""


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
        "prefix": prefix,  # the reported network's metric prefix ("teacher/sem_seg/", "sem_seg/")
        "final_row": final,  # metrics.json's final evaluation row of it (every metric, every network)
        "s_per_iter": seconds_per_iter(rows, summary["burn_in_iters"]),
        "loss_curve": [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r],
        "miou_curve": [(r["iteration"], r[prefix + "mIoU"]) for r in rows if prefix + "mIoU" in r],
        "network_curves": {n: [(r["iteration"], r[f"{n}/sem_seg/mIoU"]) for r in rows if f"{n}/sem_seg/mIoU" in r]
                           for n in summary.get("networks", []) if n},
        "diagnostics": [r for r in rows if DIAG_PREFIX + "kept_fraction" in r],
        "cpu_capability": cpu_capability(os.path.join(path, "log.txt")),
    }


_CAPABILITY = re.compile(r"CPU capability usage: (\S+)")


def cpu_capability(log_path: str) -> Optional[str]:
    """The CPU kernels torch ran (``AVX2``, ``AVX512``, ...) as detectron2's environment dump at the top of the run's
    log.txt records them; None without a log or that line. Runs on different kernels round differently, so their
    trajectories part after a few iterations even for one seed and one commit."""
    if not os.path.isfile(log_path):
        return None
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _CAPABILITY.search(line)
            if m:
                return m.group(1)
    return None


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
