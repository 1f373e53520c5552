"""Partial-COCO labeled splits: the Soft-Teacher / mmdetection convention (``split_coco.py``), as plain id lists.

For percent P and fold F (folds 1..5 are the standard ones, the fold is the seed): ``numpy.random.seed(F)``, then
``numpy.random.choice(N, size=int(P / 100 * N))`` over the positions of the json's ``images`` list — drawn WITH
replacement, as the reference does, so the labeled set holds somewhat fewer than P% distinct images (1% of
train2017: 1,182 draws). The labeled images are those positions; every other image is unlabeled. Lists are written
in the json's image order. (Unbiased Teacher ships its own seed file of dataset indices instead; it is not
regenerated here.)
"""
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["coco_labeled_positions", "coco_semi_split", "write_coco_semi_splits"]


def coco_labeled_positions(num_images: int, percent: float, fold: int) -> np.ndarray:
    """Sorted distinct positions (into the json's ``images``) of the labeled images of (percent, fold)."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if num_images <= 0:
        raise ValueError("the json has no images")
    total = int(percent / 100.0 * num_images)
    if total < 1:
        raise ValueError(f"{percent}% of {num_images} images is less than one image")
    state = np.random.get_state()
    try:
        np.random.seed(fold)
        drawn = np.random.choice(range(num_images), size=total)
    finally:
        np.random.set_state(state)
    return np.unique(drawn)


def coco_semi_split(image_ids: Sequence[int], percent: float, fold: int) -> Tuple[List[int], List[int]]:
    """(labeled ids, unlabeled ids) of the json-ordered ``image_ids`` for (percent, fold)."""
    labeled = set(coco_labeled_positions(len(image_ids), percent, fold).tolist())
    lab = [int(i) for k, i in enumerate(image_ids) if k in labeled]
    unl = [int(i) for k, i in enumerate(image_ids) if k not in labeled]
    return lab, unl


def write_coco_semi_splits(json_file: str, out_dir: str, percents: Sequence[float], folds: Sequence[int]) -> Dict:
    """Write ``out_dir/{P}pct/fold{F}/{labeled,unlabeled}.txt`` (one image id per line); returns
    ``{(P, F): (n_labeled, n_unlabeled)}``. ``P`` is written as given (``1``, ``0.5``)."""
    with open(json_file) as f:
        images = json.load(f).get("images")
    if not isinstance(images, list):
        raise ValueError(f"{json_file}: no 'images' list")
    ids = [im["id"] for im in images]
    out = {}
    for p in percents:
        for fold in folds:
            lab, unl = coco_semi_split(ids, p, fold)
            d = os.path.join(out_dir, f"{p:g}pct", f"fold{fold}")
            os.makedirs(d, exist_ok=True)
            for name, lst in (("labeled.txt", lab), ("unlabeled.txt", unl)):
                with open(os.path.join(d, name), "w") as f:
                    f.write("".join(f"{i}\n" for i in lst))
            out[(p, fold)] = (len(lab), len(unl))
    return out
