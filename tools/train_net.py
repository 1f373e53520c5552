#!/usr/bin/env python
"""Train or evaluate a semiseg_d2 model (supervised ``Segmentor`` or semi-supervised ``SemiSegmentor``).

    python tools/train_net.py --config-file configs/dgcl_city.yaml
    python tools/train_net.py --config-file C --resume                 # continue exactly where it stopped
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file C --num-gpus 4 SOLVER.IMS_PER_BATCH 8
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402

from semiseg_d2.config import get_semiseg_cfg  # noqa: E402
from semiseg_d2.data.datasets import register_folder_datasets_from_cfg  # noqa: E402
from semiseg_d2.engine.checkpoint import SemiSegCheckpointer  # noqa: E402
from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainer, build_trainer  # noqa: E402


def setup(args):
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_folder_datasets_from_cfg(cfg)  # DATASETS.FOLDERS: plain image/mask folders (docs/datasets.md)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        trainer_cls = SemiSegTrainer if cfg.MODEL.META_ARCHITECTURE == "SemiSegmentor" else SegTrainer
        model = trainer_cls.build_model(cfg)
        SemiSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return trainer_cls.test(cfg, model)
    trainer = build_trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
