#!/usr/bin/env python
"""Write Cityscapes ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 = ignore) next to each ``*_gtFine_labelIds.png``.

  python tools/prepare_cityscapes.py --root $DETECTRON2_DATASETS/cityscapes [--overwrite]

Same table as cityscapesScripts' createTrainIdLabelImgs.py, without needing that package. Idempotent:
existing outputs are kept unless --overwrite. (Without this step the datasets still load: they map
labelIds on the fly through metadata ``label_id_map``.)
"""
import argparse
import glob
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from semiseg_d2.data.datasets.register_cityscapes import cityscapes_label_id_map  # noqa: E402
from semiseg_d2.data.label_io import apply_label_map, check_label_values  # noqa: E402


def convert_cityscapes(root: str, overwrite: bool = False) -> dict:
    """Convert every gtFine/*/*/*_gtFine_labelIds.png under ``root``; returns counts {written, kept}."""
    gt_dir = os.path.join(root, "gtFine")
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"Cityscapes gtFine folder not found: {gt_dir} (--root is the 'cityscapes' folder)")
    files = sorted(glob.glob(os.path.join(gt_dir, "*", "*", "*_gtFine_labelIds.png")))
    if not files:
        raise FileNotFoundError(f"no *_gtFine_labelIds.png under {gt_dir}/<split>/<city>/")
    lut = cityscapes_label_id_map()
    counts = {"written": 0, "kept": 0}
    for src in files:
        dst = src[: -len("_labelIds.png")] + "_labelTrainIds.png"
        if os.path.exists(dst) and not overwrite:
            counts["kept"] += 1
            continue
        raw = np.asarray(Image.open(src))
        train = apply_label_map(raw.astype(np.uint8), lut)
        check_label_values(train, 19, 255, src)
        tmp = dst + ".tmp.png"
        Image.fromarray(np.ascontiguousarray(train)).save(tmp)
        os.replace(tmp, dst)
        counts["written"] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "cityscapes")
    p.add_argument("--root", default=default, help="the Cityscapes folder holding gtFine/ (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    counts = convert_cityscapes(args.root, args.overwrite)
    print(f"{args.root}: wrote {counts['written']} labelTrainIds files, kept {counts['kept']} existing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
