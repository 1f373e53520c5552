#!/usr/bin/env python
"""Does a run's evaluation suffer from its BN running statistics? Evaluate a trained run as saved, then with the BN
running statistics of each evaluated network recomputed on clean labeled training crops (the supervised loader's
views: no strong augmentation, no mixing), weights unchanged.

    python tools/bn_check.py output/camvid_cpu_half/mean_teacher/seed0 [--batches 50] [--out bn_check.json]

Reads ``<run>/config.yaml`` and ``<run>/model_final.pth``; prints and writes ``{network: {"saved": mIoU,
"recomputed": mIoU}}``. The recomputation is a cumulative average (BN momentum None) over ``--batches`` batches of
``SOLVER.IMS_PER_BATCH`` crops of the labeled set (``DATASETS.TRAIN_LABELED``, else ``DATASETS.TRAIN``), forward
only. A gain for a semi-supervised student that a supervised model does not show points at the statistics its
joint labeled + strong-view batches leave behind (issue #16).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--out", default=None, help="JSON file (default: <run_dir>/bn_check.json)")
    return p.parse_args(argv)


def recompute_bn_(network, batches) -> int:
    """Reset every BatchNorm's running statistics of ``network`` and re-estimate them on ``batches`` (lists of
    mapped dicts with "image"), cumulative average; returns how many BN layers were recomputed."""
    import torch

    bns = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = network.training
    network.train()
    with torch.no_grad():
        for batch in batches:
            images = torch.stack([network.normalize(d["image"]) for d in batch])
            network.extract(images)
    for m, momentum in saved:
        m.momentum = momentum
    network.train(was_training)
    return len(bns)


def main(argv=None) -> int:
    args = parse_args(argv)
    import itertools

    import semiseg_d2  # noqa: F401  registers the datasets
    from semiseg_d2.config import get_semiseg_cfg
    from semiseg_d2.data.build import build_sem_seg_train_loader
    from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainer
    from semiseg_d2.modeling import is_semi_supervised
    from detectron2.modeling import build_model

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(args.run_dir, "config.yaml"))
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0

    semi = is_semi_supervised(cfg)
    model = build_model(cfg)
    import torch

    # the run's own trainer checkpoint (as tools/export_model.py reads it)
    state = torch.load(os.path.join(args.run_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(state, strict=True)
    model.eval()
    trainer = SemiSegTrainer if semi else SegTrainer

    def miou():
        res = trainer.test(cfg, model)
        return {n: r["sem_seg"]["mIoU"] for n, r in res.items()} if semi else {"model": res["sem_seg"]["mIoU"]}

    saved = miou()
    loader_cfg = cfg.clone()
    loader_cfg.DATASETS.TRAIN = tuple(cfg.DATASETS.TRAIN_LABELED) or tuple(cfg.DATASETS.TRAIN)
    loader = build_sem_seg_train_loader(loader_cfg)
    loader.set_start(0)
    batches = list(itertools.islice(iter(loader), args.batches))
    networks = [model.student, model.teacher] if semi else [model]
    for network in networks:
        recompute_bn_(network, batches)
    model.eval()
    recomputed = miou()
    out = {n: {"saved": saved[n], "recomputed": recomputed[n]} for n in saved}
    print(json.dumps(out, indent=1))
    with open(args.out or os.path.join(args.run_dir, "bn_check.json"), "w") as f:
        json.dump({"batches": args.batches, "images_per_batch": int(cfg.SOLVER.IMS_PER_BATCH), "mIoU": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
