#!/usr/bin/env python
"""Train or evaluate SemiRCNN (semi-supervised Mask R-CNN) with the semiseg_d2 engine.

    python projects/SemiInstance/train_net.py --config-file projects/SemiInstance/configs/coco_10pct_R50_FPN.yaml --num-gpus 8
    python projects/SemiInstance/train_net.py --config-file C --resume            # continue exactly
    python projects/SemiInstance/train_net.py --config-file C --eval-only MODEL.WEIGHTS out/model_final.pth

Datasets named in the config are registered from $DETECTRON2_DATASETS on demand (semi_instance/builtin.py).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # semi_instance
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))  # semiseg_d2 from a checkout

from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402

from semi_instance import SemiInstanceTrainer, get_semi_instance_cfg  # noqa: E402
from semi_instance.builtin import register_datasets_for_config  # noqa: E402
from semiseg_d2.engine.checkpoint import SemiSegCheckpointer  # noqa: E402


def setup(args):
    cfg = get_semi_instance_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    register_datasets_for_config(cfg)
    if args.eval_only:
        model = SemiInstanceTrainer.build_model(cfg)
        SemiSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return SemiInstanceTrainer.test(cfg, model)
    trainer = SemiInstanceTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
