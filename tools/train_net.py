#!/usr/bin/env python
"""Train or evaluate a semiseg_d2 model (supervised ``Segmentor`` or semi-supervised ``SemiSegmentor``).

    python tools/train_net.py --config-file configs/dgcl_city.yaml
    python tools/train_net.py --config-file C --resume                 # continue exactly where it stopped
    python tools/train_net.py --config-file C --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file C --num-gpus 4 SOLVER.IMS_PER_BATCH 8

The logic lives in ``semiseg_d2/engine/cli.py``; a project with its own config keys calls
``cli(extra_config=(add_my_config,))`` (docs/examples/train_net_with_term.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import semiseg_d2  # noqa: E402,F401  (first: it filters detectron2's import-time warnings)

from detectron2.engine import default_argument_parser  # noqa: E402,F401  (tests parse arguments through here)

from semiseg_d2.engine.cli import cli, main, setup  # noqa: E402,F401
from semiseg_d2.engine.trainer import build_trainer  # noqa: E402,F401

if __name__ == "__main__":
    cli()
