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

import semiseg_d2  # noqa: E402,F401  (first: it filters detectron2's import-time warnings)

from semi_instance import SemiInstanceTrainer, get_semi_instance_cfg  # noqa: E402
from semi_instance.builtin import register_datasets_for_config  # noqa: E402
from semiseg_d2.engine.cli import cli as engine_cli  # noqa: E402


def cli(argv=None):
    """tools/train_net.py's command line with this task's config, datasets and trainer."""
    return engine_cli(argv, base_config=get_semi_instance_cfg, register=(register_datasets_for_config,),
                      trainer_cls=SemiInstanceTrainer)


if __name__ == "__main__":
    cli()
