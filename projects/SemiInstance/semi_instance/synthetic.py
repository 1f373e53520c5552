"""A tiny synthetic COCO-format instance-segmentation dataset: coloured shapes on a noisy background.

Each category has its own shape and colour (learnable in a few hundred CPU iterations), objects never overlap
(so each polygon is exactly the visible mask), category and image ids are non-contiguous (exercising
detectron2's id mapping), masks are polygons or RLE. Used by tests/projects/test_semi_instance.py and the tiny demo.

    python -m semi_instance.synthetic --out datasets/synthetic_shapes --train 48 --val 8
"""
import argparse
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

# (name, COCO category id, RGB colour, shape)
CATEGORIES: Tuple[Tuple[str, int, Tuple[int, int, int], str], ...] = (
    ("red_box", 1, (220, 40, 40), "rectangle"),
    ("green_disc", 3, (40, 200, 60), "ellipse"),
    ("blue_triangle", 7, (50, 80, 230), "triangle"),
)


def _polygon(shape: str, x0: float, y0: float, w: float, h: float) -> np.ndarray:
    """[K, 2] float (x, y) vertices of ``shape`` inscribed in the box (x0, y0, w, h)."""
    if shape == "rectangle":
        return np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]], dtype=np.float64)
    if shape == "ellipse":
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        return np.stack([x0 + w / 2 * (1 + np.cos(t)), y0 + h / 2 * (1 + np.sin(t))], 1)
    if shape == "triangle":
        return np.array([[x0 + w / 2, y0], [x0 + w, y0 + h], [x0, y0 + h]], dtype=np.float64)
    raise ValueError(f"unknown shape {shape!r}")


def _rasterize(poly: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    return mask


def make_image(rng: np.random.Generator, height: int, width: int, max_objects: int = 3, min_size: int = 20):
    """(image uint8[H, W, 3] RGB, objects: list of (category index, polygon [K, 2], mask uint8[H, W]))."""
    image = rng.integers(90, 140, size=(height, width, 3)).astype(np.uint8)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            w = float(rng.integers(min_size, max(min_size + 1, width // 2)))
            h = float(rng.integers(min_size, max(min_size + 1, height // 2)))
            x0 = float(rng.integers(1, width - int(w) - 1))
            y0 = float(rng.integers(1, height - int(h) - 1))
            box = (x0 - 2, y0 - 2, x0 + w + 2, y0 + h + 2)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        c = int(rng.integers(len(CATEGORIES)))
        poly = _polygon(CATEGORIES[c][3], x0, y0, w, h)
        mask = _rasterize(poly, height, width)
        image[mask.astype(bool)] = CATEGORIES[c][2]
        objects.append((c, poly, mask))
    return image, objects


def _annotation(ann_id: int, image_id: int, c: int, poly: np.ndarray, mask: np.ndarray, mask_format: str) -> Dict:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    if mask_format == "polygon":
        segmentation = [[round(float(v), 2) for v in poly.reshape(-1)]]
    elif mask_format == "rle":
        from pycocotools import mask as mask_util

        rle = mask_util.encode(np.asfortranarray(mask))
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    else:
        raise ValueError(f"mask_format must be 'polygon' or 'rle', got {mask_format!r}")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORIES[c][1],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": float(mask.sum()),
        "iscrowd": 0,
        "segmentation": segmentation,
    }


def write_synthetic_coco(
    out_dir: str,
    split: str,
    num_images: int,
    seed: int = 0,
    size: Sequence[int] = (128, 128),
    mask_format: str = "polygon",
    max_objects: int = 3,
    first_image_id: int = 100,
) -> Tuple[str, str]:
    """Write ``out_dir/<split>/*.png`` and ``out_dir/<split>.json``; returns (json_file, image_root).

    Image ids are ``first_image_id + 3 * i``; annotation ids are unique within the file.
    """
    import cv2

    height, width = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    image_root = os.path.join(out_dir, split)
    os.makedirs(image_root, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for i in range(num_images):
        image_id = first_image_id + 3 * i
        image, objects = make_image(rng, height, width, max_objects)
        file_name = f"{split}_{i:04d}.png"
        cv2.imwrite(os.path.join(image_root, file_name), image[:, :, ::-1])  # PNG: lossless, RGB -> BGR for cv2
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for c, poly, mask in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, c, poly, mask, mask_format))
    data = {
        "info": {"description": "semiseg_d2 synthetic shapes", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for name, cid, _, _ in CATEGORIES],
    }
    json_file = os.path.join(out_dir, f"{split}.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, image_root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labeled-percent", type=float, default=25.0, help="labeled share of train (labeled.txt)")
    args = p.parse_args(argv)
    from semiseg_d2.data.splits.coco_splits import coco_semi_split

    for split, n, seed, fmt in (("train", args.train, args.seed, "polygon"), ("val", args.val, args.seed + 1, "rle")):
        json_file, _ = write_synthetic_coco(args.out, split, n, seed=seed, size=args.size, mask_format=fmt)
        print(f"{json_file}: {n} images")
        if split == "train":
            with open(json_file) as f:
                ids = [im["id"] for im in json.load(f)["images"]]
            labeled, _ = coco_semi_split(ids, args.labeled_percent, fold=1)
            with open(os.path.join(args.out, "labeled.txt"), "w") as f:
                f.write("".join(f"{i}\n" for i in labeled))
            print(f"{os.path.join(args.out, 'labeled.txt')}: {len(labeled)} labeled train images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
