#!/usr/bin/env python
"""Check GTA5 (``gta5/images``, ``gta5/labels``) and optionally fix label maps whose size differs from the image.

  python tools/prepare_gta5.py --root $DETECTRON2_DATASETS/gta5 [--fix]

The labels keep their Cityscapes label ids (``gta5_train`` maps them through metadata ``label_id_map``).
A few official label maps are not the size of their image; the mappers reject such pairs. ``--fix`` resizes
those labels (nearest neighbour) to the image size, keeping the original as ``<name>.png.orig``.
"""
import argparse
import os
import shutil
import sys

from PIL import Image


def check_gta5(root: str, fix: bool = False) -> dict:
    image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    for d in (image_dir, label_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"GTA5 folder not found: {d}")
    counts = {"pairs": 0, "mismatched": 0, "fixed": 0}
    for fname in sorted(os.listdir(image_dir)):
        stem = os.path.splitext(fname)[0]
        label_path = os.path.join(label_dir, stem + ".png")
        if not os.path.isfile(label_path):
            raise FileNotFoundError(f"GTA5 image {os.path.join(image_dir, fname)} has no label {label_path}")
        counts["pairs"] += 1
        with Image.open(os.path.join(image_dir, fname)) as img, Image.open(label_path) as lab:
            if img.size == lab.size:
                continue
            counts["mismatched"] += 1
            print(f"{label_path}: label {lab.size} vs image {img.size}")
            if fix:
                resized = lab.resize(img.size, Image.NEAREST)
                shutil.copy2(label_path, label_path + ".orig")
                resized.save(label_path)
                counts["fixed"] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "gta5"))
    p.add_argument("--fix", action="store_true")
    args = p.parse_args(argv)
    print(check_gta5(args.root, args.fix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
