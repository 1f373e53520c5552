#!/usr/bin/env python
"""Evaluate every saved checkpoint of a run from some iteration on: is a gap between two networks at the end a
property of the run, or of the one iteration at which it was measured?

    python tools/eval_checkpoints.py output/camvid_cpu/mean_teacher/seed2 --from-iter 1140 [--to-iter N] [--out end.json]
    python tools/eval_checkpoints.py output/camvid_cpu/mean_teacher/seed2 --from-iter 1200 --precise-bn 100
    python tools/eval_checkpoints.py <run> --from-iter 1800 --every 100 --dataset camvid_train_46_labeled

Reads ``<run>/config.yaml`` and the run's checkpoints (``model_<iteration>.pth`` written every
``SOLVER.CHECKPOINT_PERIOD`` and ``model_final.pth``), loads each one strictly into the run's model and evaluates
it exactly as ``tools/train_net.py --eval-only`` does (every network the config evaluates: student and teacher for
a semi-supervised run, ``TEST.EVAL_STUDENT`` / ``TEST.EVAL_TEACHER``) on its first ``DATASETS.TEST`` or on any
registered dataset with semantic ground truth (``--dataset``: e.g. the labeled training frames, to tell a fall on
val that is overfitting from one that is not). ``--every N`` keeps only the checkpoints whose step count is a
multiple of N (and the final one). ``--precise-bn N`` first recomputes each evaluated network's BN statistics on
the same first N batches of the run's labeled training stream (weights fixed): student and teacher then differ by
their weights only. Prints a table and writes JSON (default ``<run>/checkpoint_evals.json``; IoU null: class absent
from ground truth and predictions):

    {"run_dir", "config", "from_iter", "to_iter", "every", "dataset", "precise_bn",
     "checkpoints": [{"file", "iteration", "mIoU": {network: value}, "IoU": {network: {class: value}}}],
     "teacher_minus_student": {"values", "mean", "sd", "at_least_zero", "n"}}   (semi-supervised runs only)

``iteration`` is the number of optimizer steps the checkpoint holds (detectron2 names a periodic checkpoint after
its 0-based last iteration: ``model_0001149.pth`` holds 1150 steps; ``model_final.pth`` holds ``MAX_ITER``).
Evaluation reads the dataset through ``DETECTRON2_DATASETS`` as training did.
"""
import argparse
import json
import os
import re
import statistics
import sys
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--from-iter", type=int, default=0,
                   help="only checkpoints holding at least this many steps (default: all)")
    p.add_argument("--to-iter", type=int, default=None,
                   help="only checkpoints holding at most this many steps (default: all)")
    p.add_argument("--precise-bn", type=int, default=0, metavar="N",
                   help="before evaluating, recompute every evaluated network's BN statistics on the first N batches "
                        "of the run's labeled training stream, weights fixed (semiseg_d2.engine.precise_bn; "
                        "detectron2's TEST.PRECISE_BN). 0 (default): the checkpoint's own statistics")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="only checkpoints whose step count is a multiple of N, and model_final.pth (default: 1, all)")
    p.add_argument("--dataset", default=None,
                   help="the registered dataset to evaluate on, with semantic ground truth (default: the run's first "
                        "DATASETS.TEST)")
    p.add_argument("--out", default=None, help="JSON file (default: <run_dir>/checkpoint_evals.json)")
    return p.parse_args(argv)


def list_checkpoints(run_dir: str, max_iter: int, from_iter: int = 0, to_iter: Optional[int] = None,
                     every: int = 1) -> List[Tuple[int, str]]:
    """(steps held, path) of the run's checkpoints with ``from_iter`` to ``to_iter`` steps, in order of steps;
    ``model_final.pth`` counts as ``max_iter`` steps (a periodic file of the same step count is left out). With
    ``every`` > 1 only step counts that are a multiple of it, and the final file, are kept."""
    found = {}
    for name in os.listdir(run_dir):
        m = _PERIODIC.match(name)
        if m:
            found[int(m.group(1)) + 1] = os.path.join(run_dir, name)
    final = os.path.join(run_dir, "model_final.pth")
    if os.path.isfile(final):
        found[max_iter] = final
    return [(it, found[it]) for it in sorted(found) if it >= from_iter and (to_iter is None or it <= to_iter)
            and (it % every == 0 or found[it] == final)]


def gap_summary(values: List[float]) -> dict:
    """Mean, sample sd and the count of non-negative values of teacher - student differences."""
    n = len(values)
    mean = statistics.fmean(values) if n else float("nan")
    sd = statistics.stdev(values) if n > 1 else float("nan")
    return {"values": values, "mean": mean, "sd": sd, "at_least_zero": sum(v >= 0 for v in values), "n": n}


def dataset_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be evaluated on (not registered or empty: ``load_dataset_dicts``'s errors; or records
    without semantic ground truth), or None."""
    from semiseg_d2.data.build import load_dataset_dicts

    try:
        records = load_dataset_dicts([name], "--dataset")
    except (KeyError, ValueError) as e:
        return str(e.args[0])
    missing = [r.get("file_name", "?") for r in records if not r.get("sem_seg_file_name")]
    if missing:
        return (f"--dataset: dataset '{name}' has {len(missing)} of {len(records)} records without semantic ground "
                f"truth (sem_seg_file_name), e.g. {missing[0]}")
    return None


def evaluated_networks(cfg, model):
    """The networks ``test()`` evaluates: student and / or teacher of a semi-supervised model
    (TEST.EVAL_STUDENT / TEST.EVAL_TEACHER), else the model itself."""
    from semiseg_d2.modeling import TeacherStudent

    if not isinstance(model, TeacherStudent):
        return [model]
    enabled = [("student", cfg.TEST.EVAL_STUDENT), ("teacher", cfg.TEST.EVAL_TEACHER)]
    return [getattr(model, name) for name, on in enabled if on and getattr(model, name) is not None]


def main(argv=None) -> int:
    args = parse_args(argv)
    import semiseg_d2  # noqa: F401  registers the datasets
    from semiseg_d2.config import get_semiseg_cfg
    from semiseg_d2.engine.checkpoint import SemiSegCheckpointer
    from detectron2.data import MetadataCatalog
    from semiseg_d2.engine.precise_bn import labeled_batches, recompute_bn_stats
    from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainer, split_per_class
    from semiseg_d2.modeling import is_semi_supervised

    config = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config):
        print(f"eval_checkpoints: {config} does not exist (is {args.run_dir} a run's OUTPUT_DIR?)", file=sys.stderr)
        return 2
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(config)
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = ""  # evaluation only: nothing of the run's folder is rewritten
    if not cfg.DATASETS.TEST:
        print(f"eval_checkpoints: {config} has no DATASETS.TEST to evaluate on", file=sys.stderr)
        return 2
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    problem = dataset_problem(dataset)
    if problem:
        print(f"eval_checkpoints: {problem}", file=sys.stderr)
        return 2
    cfg.DATASETS.TEST = (dataset,)
    if args.every < 1:
        print(f"eval_checkpoints: --every must be >= 1, got {args.every}", file=sys.stderr)
        return 2
    if args.precise_bn < 0:
        print(f"eval_checkpoints: --precise-bn must be >= 0, got {args.precise_bn}", file=sys.stderr)
        return 2
    checkpoints = list_checkpoints(args.run_dir, cfg.SOLVER.MAX_ITER, args.from_iter, args.to_iter, args.every)
    if not checkpoints:
        upto = "" if args.to_iter is None else f" and <= {args.to_iter}"
        every = "" if args.every == 1 else f" (a multiple of {args.every}, or the final file)"
        print(f"eval_checkpoints: no model_<iteration>.pth / model_final.pth with >= {args.from_iter}{upto} steps"
              f"{every} in {args.run_dir}", file=sys.stderr)
        return 2
    trainer = SemiSegTrainer if is_semi_supervised(cfg) else SegTrainer
    model = trainer.build_model(cfg)
    classes = MetadataCatalog.get(dataset).stuff_classes
    rows = []
    for iteration, path in checkpoints:
        SemiSegCheckpointer(model).load(path, checkpointables=[], strict=True)
        if args.precise_bn:
            for network in evaluated_networks(cfg, model):  # each from the same first N labeled batches
                recompute_bn_stats(network, labeled_batches(cfg), args.precise_bn)
        model.eval()
        by_network = trainer.results_by_network(trainer.test(cfg, model))
        row = {"file": os.path.basename(path), "iteration": iteration, "mIoU": {}, "IoU": {}}
        for network, res in by_network.items():
            metrics = split_per_class(res["sem_seg"], classes)  # NaN (class absent from both) -> null
            row["mIoU"][network] = float(metrics["mIoU"])
            row["IoU"][network] = {c: (None if v.get("IoU") is None else float(v["IoU"]))
                                   for c, v in metrics.get("per_class", {}).items()}
        rows.append(row)
        print(f"{iteration:>7}  " + "  ".join(f"{n} {v:6.2f}" for n, v in row["mIoU"].items()), flush=True)
    out = {"run_dir": args.run_dir, "config": config, "from_iter": args.from_iter, "to_iter": args.to_iter,
           "every": args.every, "dataset": dataset, "precise_bn": args.precise_bn, "checkpoints": rows}
    if all({"teacher", "student"} <= set(r["mIoU"]) for r in rows):
        gaps = gap_summary([r["mIoU"]["teacher"] - r["mIoU"]["student"] for r in rows])
        out["teacher_minus_student"] = gaps
        print(f"teacher - student: mean {gaps['mean']:+.2f} (sd {gaps['sd']:.2f}), >= 0 at {gaps['at_least_zero']} "
              f"of {gaps['n']} checkpoints")
    path = args.out or os.path.join(args.run_dir, "checkpoint_evals.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
