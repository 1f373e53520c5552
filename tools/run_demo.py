#!/usr/bin/env python
"""`make demo`: a short semi-supervised CamVid run on CPU, then evaluation and pictures.

Trains ``configs/camvid/demo_semi_cpu.yaml`` (Mean Teacher / FixMatch-style: supervised burn-in, EMA
teacher, strong views + CutMix, confidence-filtered pseudo-labels) on the bundled frames, evaluates the
student and the teacher on the bundled val frames, and writes to ``--output`` (default output/demo):
  results.json          mIoU / pixel accuracy / per-class IoU of student and teacher (the trainer writes it)
  metrics.json          training curves (detectron2 JSON writer)
  predictions.png       val frames spread over the val sequences: image | ground truth | student | teacher,
                        with the class colours
  pseudo_labels.png     unlabeled frames: weak view | teacher pseudo-label | kept by the filter | strong view
  model_final.pth       the trainer checkpoint (tools/export_model.py turns it into a Segmentor checkpoint)
Extra ``KEY VALUE`` pairs override the config (e.g. ``SOLVER.MAX_ITER 50`` for a quicker look); ``--seed`` sets
``SEED``. ``--output`` is deleted first: a demo always starts from scratch.
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import semiseg_d2  # noqa: E402,F401  (first: it filters detectron2's import-time warnings)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402

from semiseg_d2.config import get_semiseg_cfg  # noqa: E402
from semiseg_d2.data.build import build_semi_train_loader  # noqa: E402
from semiseg_d2.engine.cli import merge_overrides  # noqa: E402
from semiseg_d2.data.label_io import load_sem_seg  # noqa: E402
from semiseg_d2.data.mapper import SemSegDatasetMapper  # noqa: E402
from semiseg_d2.engine.trainer import SemiSegTrainer  # noqa: E402
from semiseg_d2.utils.visualizer import class_legend, colorize, save_grid  # noqa: E402
from semiseg_d2.utils.run_logging import setup_run_logging  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "camvid", "demo_semi_cpu.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--output", default="output/demo")
    p.add_argument("--num-frames", type=int, default=4, help="frames per picture")
    p.add_argument("--seed", type=int, default=None, help="SEED of the run (default: the config's, 0)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def sequence_of(record) -> str:
    """CamVid-style sequence name of a frame: its file name up to the last "_" (``0016E5_07959.jpg`` -> ``0016E5``)."""
    return os.path.basename(record["file_name"]).rsplit("_", 1)[0]


def spread_frames(records, n):
    """``n`` records taking the sequences in turn, each sequence's frames evenly spaced over it (CamVid's val
    frames are one sequence, 0016E5: then ``n`` frames spread over it instead of ``n`` neighbours)."""
    by_sequence = {}
    for r in records:
        by_sequence.setdefault(sequence_of(r), []).append(r)
    groups = list(by_sequence.values())
    counts = [n // len(groups) + (i < n % len(groups)) for i in range(len(groups))]
    picked = []
    for group, k in zip(groups, counts):
        k = min(k, len(group))
        picked.append([group[round(i * (len(group) - 1) / max(k - 1, 1))] for i in range(k)])
    return [g[i] for i in range(max(map(len, picked))) for g in picked if i < len(g)]


@torch.no_grad()
def prediction_rows(cfg, model, n):
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    mapper = SemSegDatasetMapper(cfg, False)
    rows = []
    previous = model.eval_network
    for record in spread_frames(DatasetCatalog.get(name), n):
        x = mapper(record)
        row = [x["image"].permute(1, 2, 0).numpy(), colorize(load_sem_seg(record["sem_seg_file_name"], name), meta)]
        for network in ("student", "teacher"):
            model.eval_network = network
            row.append(colorize(model([x])[0]["sem_seg"].argmax(0).numpy(), meta))
        rows.append(row)
    model.eval_network = previous
    return rows, ["image", "ground truth", "student", "teacher"]


@torch.no_grad()
def pseudo_label_rows(cfg, model, n):
    """Teacher pseudo-labels on unlabeled training views, with the kept-pixel mask of the filter."""
    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN_UNLABELED[0])
    loader = build_semi_train_loader(cfg)
    loader.set_start(0)
    _, unlabeled = next(iter(loader))
    weak = torch.stack([u["image"] for u in unlabeled[:n]])
    valid = torch.stack([u["valid"] for u in unlabeled[:n]])
    out = model._teacher_outputs(model.student.normalize(weak), valid)
    keep = model.terms["pseudo_label"].keep_mask(out, valid, 1.0) if "pseudo_label" in model.terms else valid
    rows = []
    for b in range(weak.shape[0]):
        rows.append(
            [
                weak[b].permute(1, 2, 0).numpy(),
                colorize(out["pseudo_label"][b].numpy(), meta),
                (keep[b].numpy()[..., None].repeat(3, 2) * 255).astype(np.uint8),
                unlabeled[b]["image_strong"].permute(1, 2, 0).numpy(),
            ]
        )
    return rows, ["weak view", "teacher pseudo-label", "kept by filter", "strong view"]


def main(argv=None):
    args = parse_args(argv)
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(args.config_file)
    merge_overrides(cfg, args.opts)
    if args.seed is not None:
        cfg.SEED = args.seed
    cfg.OUTPUT_DIR = args.output
    cfg.freeze()
    if os.path.isdir(args.output):
        shutil.rmtree(args.output)  # a demo always starts from scratch
    setup_run_logging(cfg.OUTPUT_DIR)
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, resume=False, opts=[]))

    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # evaluates student and teacher at the end and writes results.json

    model = trainer.model
    model.eval()
    rows, titles = prediction_rows(cfg, model, args.num_frames)
    legend = class_legend(MetadataCatalog.get(cfg.DATASETS.TEST[0]))
    save_grid(rows, titles, os.path.join(args.output, "predictions.png"), legend=legend)
    rows, titles = pseudo_label_rows(cfg, model, args.num_frames)
    save_grid(rows, titles, os.path.join(args.output, "pseudo_labels.png"), legend=legend)

    print(f"\nsemiseg_d2 demo — CamVid (bundled frames), 1/8 labels, CPU, SEED {cfg.SEED}")
    for network, res in results.items():
        r = res["sem_seg"]
        default = "  (predicts by default: SEMI.WEIGHTS_FOR_EXPORT)" if network == cfg.SEMI.WEIGHTS_FOR_EXPORT else ""
        print(f"  {network:8s} mIoU {r['mIoU']:5.1f}  pixel acc {r['pACC']:5.1f}{default}")
    print(f"  written to {os.path.abspath(args.output)}: results.json predictions.png pseudo_labels.png")
    return results


if __name__ == "__main__":
    main()
