#!/usr/bin/env python
"""Write the teacher (or student) of a semi-supervised checkpoint as a plain ``Segmentor`` checkpoint.

    python tools/export_model.py --checkpoint output/x/model_final.pth --network teacher --output teacher.pth

The result loads with ``MODEL.META_ARCHITECTURE Segmentor MODEL.WEIGHTS teacher.pth`` (``DefaultPredictor``,
``tools/demo.py``, ``tools/train_net.py --eval-only``). A supervised checkpoint is written as it is
(without ``--network``).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import semiseg_d2  # noqa: E402,F401  (first: it filters detectron2's import-time warnings)

import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402

from semiseg_d2.engine.checkpoint import atomic_torch_save  # noqa: E402
from semiseg_d2.engine.predictor import NETWORKS, network_state_dict  # noqa: E402


def default_network(checkpoint: dict) -> str:
    """``SEMI.WEIGHTS_FOR_EXPORT`` of the config the checkpoint was written with ("teacher" if it has none)."""
    cfg = CfgNode.load_cfg(checkpoint["cfg"]) if "cfg" in checkpoint else None
    return cfg.SEMI.get("WEIGHTS_FOR_EXPORT", "teacher") if cfg is not None and "SEMI" in cfg else "teacher"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint (.pth)")
    parser.add_argument(
        "--network", default=None, choices=NETWORKS,
        help="network of a SemiSegmentor checkpoint (default: its SEMI.WEIGHTS_FOR_EXPORT, teacher)",
    )
    parser.add_argument("--output", required=True, help="where to write the Segmentor checkpoint (.pth)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file: {args.checkpoint}")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state, network = network_state_dict(ckpt.get("model", ckpt), args.network, default_network(ckpt))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_torch_save({"model": state, "__author__": "semiseg_d2", "network": network}, args.output)
    print(f"wrote {len(state)} tensors of the {network} to {args.output}")


if __name__ == "__main__":
    main()
