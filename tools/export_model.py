#!/usr/bin/env python
"""Write the teacher (or student) of a semi-supervised checkpoint as a plain ``Segmentor`` checkpoint.

    python tools/export_model.py --checkpoint output/x/model_final.pth --network teacher --output teacher.pth

The result loads with ``MODEL.META_ARCHITECTURE Segmentor MODEL.WEIGHTS teacher.pth`` (``DefaultPredictor``,
``tools/demo.py``, ``tools/train_net.py --eval-only``). A supervised checkpoint is written as it is.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from semiseg_d2.engine.checkpoint import atomic_torch_save  # noqa: E402


def export_segmentor_state(checkpoint: dict, network: str) -> dict:
    """The ``Segmentor`` state dict of ``network`` ("teacher"/"student") inside a trainer checkpoint."""
    if network not in ("teacher", "student"):
        raise ValueError(f"--network must be 'teacher' or 'student', got {network!r}")
    state = checkpoint.get("model", checkpoint)
    prefix = network + "."
    if not any(k.startswith(prefix) for k in state):
        if any(k.startswith(("teacher.", "student.")) for k in state):
            raise KeyError(f"the checkpoint has no '{network}' weights")
        return dict(state)  # already a plain Segmentor checkpoint
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint (.pth)")
    parser.add_argument("--network", default="teacher", choices=["teacher", "student"])
    parser.add_argument("--output", required=True, help="where to write the Segmentor checkpoint (.pth)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file: {args.checkpoint}")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = export_segmentor_state(ckpt, args.network)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_torch_save({"model": state, "__author__": "semiseg_d2", "network": args.network}, args.output)
    print(f"wrote {len(state)} tensors of the {args.network} to {args.output}")


if __name__ == "__main__":
    main()
