#!/usr/bin/env python
"""``tools/train_net.py`` with the ``prob_consistency`` term of ``consistency_term.py`` available.

    python docs/examples/train_net_with_term.py --config-file docs/examples/prob_consistency_camvid.yaml

The same arguments as tools/train_net.py (``--resume``, ``--eval-only``, ``--num-gpus``, ``KEY VALUE``).
A project of your own does the same: import the module that registers its terms, add their config keys,
then build the trainer as usual.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # this folder, the repository root

from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402

from consistency_term import add_prob_consistency_config  # noqa: E402  (registers "prob_consistency")
from semiseg_d2.config import get_semiseg_cfg  # noqa: E402
from semiseg_d2.data.datasets import register_folder_datasets_from_cfg  # noqa: E402
from semiseg_d2.engine.checkpoint import SemiSegCheckpointer  # noqa: E402
from semiseg_d2.engine.trainer import SemiSegTrainer, build_trainer  # noqa: E402


def setup(args):
    cfg = get_semiseg_cfg()
    add_prob_consistency_config(cfg)  # before the YAML that sets SEMI.PROB_CONSISTENCY
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_folder_datasets_from_cfg(cfg)  # DATASETS.FOLDERS, as tools/train_net.py does
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = SemiSegTrainer.build_model(cfg)
        SemiSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return SemiSegTrainer.test(cfg, model)
    trainer = build_trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
