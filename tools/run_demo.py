#!/usr/bin/env python
"""`make demo`: a short semi-supervised CamVid run on CPU, then evaluation and pictures.

Trains ``configs/camvid/demo_semi_cpu.yaml`` (Mean Teacher / FixMatch-style: supervised burn-in, EMA
teacher, strong views + CutMix, confidence-filtered pseudo-labels) on the bundled frames, evaluates the
student and the teacher on the bundled val frames, and writes to ``--output`` (default output/demo):
  results.json          mIoU / pixel accuracy / per-class IoU of student and teacher
  metrics.json          training curves (detectron2 JSON writer)
  predictions.png       val frames: image | ground truth | student | teacher
  pseudo_labels.png     unlabeled frames: weak view | teacher pseudo-label | kept by the filter | strong view
  model_final.pth       the trainer checkpoint (tools/export_model.py turns it into a Segmentor checkpoint)
Extra ``KEY VALUE`` pairs override the config (e.g. ``SOLVER.MAX_ITER 50`` for a quicker look).
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402

from semiseg_d2.config import get_semiseg_cfg  # noqa: E402
from semiseg_d2.data.build import build_semi_train_loader  # noqa: E402
from semiseg_d2.data.label_io import load_sem_seg  # noqa: E402
from semiseg_d2.data.mapper import SemSegDatasetMapper  # noqa: E402
from semiseg_d2.engine.trainer import SemiSegTrainer  # noqa: E402
from semiseg_d2.evaluation.visualize import colorize, save_grid  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "camvid", "demo_semi_cpu.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--output", default="output/demo")
    p.add_argument("--num-frames", type=int, default=4, help="frames per picture")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


@torch.no_grad()
def prediction_rows(cfg, model, n):
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    mapper = SemSegDatasetMapper(cfg, False)
    rows = []
    for record in DatasetCatalog.get(name)[:n]:
        x = mapper(record)
        row = [x["image"].permute(1, 2, 0).numpy(), colorize(load_sem_seg(record["sem_seg_file_name"], name), meta)]
        for network in ("student", "teacher"):
            model.eval_network = network
            row.append(colorize(model([x])[0]["sem_seg"].argmax(0).numpy(), meta))
        rows.append(row)
    model.eval_network = "student"
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
    cfg.merge_from_list(args.opts)
    cfg.OUTPUT_DIR = args.output
    cfg.freeze()
    if os.path.isdir(args.output):
        shutil.rmtree(args.output)  # a demo always starts from scratch
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, resume=False, opts=[]))

    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = SemiSegTrainer.test(cfg, trainer.model)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    model = trainer.model
    model.eval()
    rows, titles = prediction_rows(cfg, model, args.num_frames)
    save_grid(rows, titles, os.path.join(args.output, "predictions.png"))
    rows, titles = pseudo_label_rows(cfg, model, args.num_frames)
    save_grid(rows, titles, os.path.join(args.output, "pseudo_labels.png"))

    print("\nsemiseg_d2 demo — CamVid (bundled frames), 1/8 labels, CPU")
    for network, res in results.items():
        r = res["sem_seg"]
        print(f"  {network:8s} mIoU {r['mIoU']:5.1f}  pixel acc {r['pACC']:5.1f}")
    print(f"  written to {os.path.abspath(args.output)}: results.json predictions.png pseudo_labels.png")
    return results


if __name__ == "__main__":
    main()
