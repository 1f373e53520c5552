#!/usr/bin/env python
"""Pool one method's runs over several results folders and compare it with the baseline of the same seeds: the
paired difference of the final val mIoU and of every class's IoU and accuracy, over all seeds found.

    python tools/paired_seeds.py --method mean_teacher --roots docs/results/camvid_cpu \\
        docs/results/camvid_cpu_controls/seeds_3_4 docs/results/camvid_cpu_controls/more_seeds [--json out.json]

Each root holds study run folders ``<root>/<method>/seed<k>/`` (``tools/run_study.py``'s layout: ``study_run.json``,
``metrics.json``). Runs are read as the study's report reads them (the reported network's final evaluation; a seed
complete in two roots counts once, and only if both copies are the same). Pooling seeds from different folders is
only a larger sample of one experiment if every run trained with the same command but for ``SEED`` and
``OUTPUT_DIR``: a run whose recorded ``train_command`` differs otherwise is an error naming the run and the keys.
A seed with only one of the two methods is listed as unpaired and left out.

Per class: the paired difference of IoU and of accuracy (``ACC-<class>``: the share of the class's val pixels
predicted as the class) and on how many seeds it is positive; a class absent from a run's final row is an error.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
from collections import OrderedDict
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: the study package

from study.configs import BASELINE, METHODS, run_dir  # noqa: E402
from study.metrics import load_run, RunProblem  # noqa: E402

_FREE_KEYS = ("SEED", "OUTPUT_DIR")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--baseline", default=BASELINE, choices=sorted(METHODS))
    p.add_argument("--roots", nargs="+", required=True, help="results folders holding <method>/seed<k>/ run folders")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def command_settings(train_command: str) -> "OrderedDict[str, str]":
    """``--config-file`` and the KEY VALUE overrides of a recorded ``tools/train_net.py`` command, later values of a
    key replacing earlier ones (as detectron2's ``merge_from_list`` applies them), less SEED and OUTPUT_DIR."""
    words = shlex.split(train_command)
    if "--config-file" not in words:
        raise ValueError(f"train_command has no --config-file: {train_command!r}")
    i = words.index("--config-file")
    rest = words[i + 2:]
    if len(rest) % 2:
        raise ValueError(f"train_command has an odd number of KEY VALUE words: {train_command!r}")
    settings = OrderedDict([("--config-file", words[i + 1])])
    for key, value in zip(rest[::2], rest[1::2]):
        if key not in _FREE_KEYS:
            settings[key] = value
    return settings


def _seeds_in(root: str, method: str) -> List[int]:
    folder = os.path.join(root, method)
    if not os.path.isdir(folder):
        return []
    return sorted(int(n[4:]) for n in os.listdir(folder) if n.startswith("seed") and n[4:].isdigit())


def collect(roots: Sequence[str], method: str) -> Dict[int, Dict]:
    """seed -> run (``load_run``'s dict plus ``acc``: class -> final accuracy); every run of the method must have
    been trained with one command but for SEED / OUTPUT_DIR."""
    runs: Dict[int, Dict] = {}
    reference = None
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"results folder {root} does not exist")
        for seed in _seeds_in(root, method):
            path = run_dir(root, method, seed)
            try:
                run = load_run(path, method, seed)
            except RunProblem as e:
                raise ValueError(f"{path}: {e}") from None
            prefix, final = run["prefix"], run["final_row"]
            missing = [c for c in run["per_class"] if prefix + "ACC-" + c not in final]
            if missing:
                raise ValueError(f"{path}/metrics.json: final evaluation has no {prefix}ACC-{missing[0]}")
            run["acc"] = OrderedDict((c, float(final[prefix + "ACC-" + c])) for c in run["per_class"])
            settings = command_settings(run["summary"].get("train_command", ""))
            if reference is None:
                reference = (path, settings)
            elif settings != reference[1]:
                keys = sorted(k for k in set(settings) | set(reference[1]) if settings.get(k) != reference[1].get(k))
                raise ValueError(
                    f"{path} was not trained as {reference[0]} (besides SEED / OUTPUT_DIR its train_command differs in "
                    f"{', '.join(keys)}): its seeds are not one experiment")
            if seed in runs:
                if runs[seed]["miou"] != run["miou"] or runs[seed]["per_class"] != run["per_class"]:
                    raise ValueError(f"{method}/seed{seed} is in {runs[seed]['path']} and {path} with different results")
                continue
            runs[seed] = run
    return runs


def _summary(values: Sequence[float]) -> Dict:
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else None
    return {"values": list(values), "n": n, "mean": mean, "sd": sd,
            "se": None if sd is None else sd / math.sqrt(n), "positive": sum(v > 0 for v in values)}


def _mean_sd(values: Sequence[float]) -> Dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def compare(method_runs: Dict[int, Dict], base_runs: Dict[int, Dict]) -> Dict:
    seeds = sorted(set(method_runs) & set(base_runs))
    if not seeds:
        raise ValueError("no seed has a run of both methods")
    unpaired = sorted(set(method_runs) ^ set(base_runs))
    classes = list(method_runs[seeds[0]]["per_class"])
    out = {
        "seeds": seeds,
        "unpaired": unpaired,
        "method": _mean_sd([method_runs[s]["miou"] for s in seeds]),
        "baseline": _mean_sd([base_runs[s]["miou"] for s in seeds]),
        "paired": _summary([method_runs[s]["miou"] - base_runs[s]["miou"] for s in seeds]),
        "classes": OrderedDict(),
    }
    for c in classes:
        entry = {}
        for what in ("per_class", "acc"):
            pairs = [(method_runs[s][what][c], base_runs[s][what][c]) for s in seeds]
            finite = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
            key = "iou" if what == "per_class" else "acc"
            entry[key] = None if not finite else {
                "method": _mean_sd([a for a, _ in finite]), "baseline": _mean_sd([b for _, b in finite]),
                "paired": _summary([a - b for a, b in finite])}
        out["classes"][c] = entry
    return out


def _f(x, signed=False):
    return "—" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def render(result: Dict, method: str, baseline: str) -> str:
    p = result["paired"]
    lines = [
        f"seeds {' '.join(map(str, result['seeds']))} (n = {p['n']})"
        + (f"; unpaired, left out: {' '.join(map(str, result['unpaired']))}" if result["unpaired"] else ""),
        f"{baseline} {_f(result['baseline']['mean'])} ± {_f(result['baseline']['sd'])}; "
        f"{method} {_f(result['method']['mean'])} ± {_f(result['method']['sd'])}",
        f"paired mIoU {' / '.join(_f(v, True) for v in p['values'])}: {_f(p['mean'], True)} ± {_f(p['sd'])} "
        f"(standard error {_f(p['se'])}), positive on {p['positive']} of {p['n']}",
        "",
        f"| class | IoU {baseline} | IoU {method} | paired IoU (mean ± sd) | > 0 | paired accuracy (mean ± sd) | > 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, e in result["classes"].items():
        iou, acc = e["iou"], e["acc"]
        cells = [c]
        if iou is None:
            cells += ["—"] * 4
        else:
            cells += [_f(iou["baseline"]["mean"]), _f(iou["method"]["mean"]),
                      f"{_f(iou['paired']['mean'], True)} ± {_f(iou['paired']['sd'])}",
                      f"{iou['paired']['positive']} of {iou['paired']['n']}"]
        cells += ["—"] * 2 if acc is None else [f"{_f(acc['paired']['mean'], True)} ± {_f(acc['paired']['sd'])}",
                                                f"{acc['paired']['positive']} of {acc['paired']['n']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.method == args.baseline:
        raise SystemExit("paired_seeds.py: --method and --baseline are the same method")
    try:
        result = compare(collect(args.roots, args.method), collect(args.roots, args.baseline))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"paired_seeds.py: {e}")
    print(render(result, args.method, args.baseline), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "baseline": args.baseline, "roots": list(args.roots), **result}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
