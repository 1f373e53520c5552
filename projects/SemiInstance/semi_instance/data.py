"""COCO-format datasets with labeled/unlabeled splits, the two-view unlabeled mapper and the paired loader.

Datasets: :func:`register_coco_semi` registers one COCO json (validated: every annotation must name an image and
a category of the file, else an error naming the id and the json) as
  ``<name>``            every image with its annotations (a labeled or test set),
  ``<name>_labeled``    the images listed in ``labeled_ids`` (a plain list of COCO image ids, one per line, as
                        ``tools/make_splits.py coco`` writes), with their annotations,
  ``<name>_unlabeled``  the other images, **annotations dropped**: an unlabeled image that has annotations in the
                        json is used as an unlabeled image, never rejected (the standard partial-COCO protocol
                        splits one annotated json). The paired loader drops ``annotations`` from every unlabeled
                        record again, so a fully annotated set can also be named in ``DATASETS.TRAIN_UNLABELED``.
Metadata: ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` (set at registration from the json's
categories, sorted by id, as detectron2's ``load_coco_json`` maps them), ``json_file``, ``image_root``,
``evaluator_type = "coco"``.

Loader: ``semiseg_d2.data.build.build_paired_loader`` (the engine's seeded, resumable paired streams) with
detectron2's ``DatasetMapper`` for labeled images and :class:`TwoViewDatasetMapper` for unlabeled ones.
"""
import json
import logging
import os
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.datasets import load_coco_json

from semiseg_d2.data.build import build_paired_loader
from semiseg_d2.data.transforms import StrongPhotometricAug

__all__ = [
    "validate_coco_json",
    "read_image_ids",
    "load_coco_split",
    "register_coco_semi",
    "RandomErasing",
    "TwoViewDatasetMapper",
    "build_semi_instance_train_loader",
]
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- COCO json
def validate_coco_json(json_file: str) -> Dict:
    """Check the references of a COCO instances json; returns ``{"categories": [...], "image_ids": [...]}``.

    Raises ValueError naming the json file and the offending id when an annotation refers to an image id or a
    category id the file does not define, or when image / category ids repeat.
    """
    st = os.stat(json_file)
    return _validate_cached(os.path.abspath(json_file), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _validate_cached(json_file: str, _mtime: int, _size: int) -> Dict:
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not valid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{json_file}: no '{key}' list (a COCO instances json has images, annotations, categories)")
    image_ids, category_ids = [], []
    for i, img in enumerate(data["images"]):
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{json_file}: images[{i}] lacks 'id' or 'file_name'")
        image_ids.append(img["id"])
    for i, cat in enumerate(data["categories"]):
        if "id" not in cat or "name" not in cat:
            raise ValueError(f"{json_file}: categories[{i}] lacks 'id' or 'name'")
        category_ids.append(cat["id"])
    for what, ids in (("image", image_ids), ("category", category_ids)):
        seen, dup = set(), None
        for x in ids:
            if x in seen:
                dup = x
                break
            seen.add(x)
        if dup is not None:
            raise ValueError(f"{json_file}: {what} id {dup} is defined twice")
    known_images, known_cats = set(image_ids), set(category_ids)
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        if ann.get("image_id") not in known_images:
            raise ValueError(
                f"{json_file}: annotation {ann_id} refers to image id {ann.get('image_id')!r}, which is not in 'images'"
            )
        if ann.get("category_id") not in known_cats:
            raise ValueError(
                f"{json_file}: annotation {ann_id} refers to category id {ann.get('category_id')!r}, "
                f"which is not in 'categories' (known: {sorted(known_cats)})"
            )
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return {"categories": [{"id": c["id"], "name": c["name"]} for c in cats], "image_ids": image_ids}


def read_image_ids(path: str, json_file: Optional[str] = None, known: Optional[Sequence[int]] = None) -> List[int]:
    """Integer COCO image ids of a plain list (one per line, ``#`` comments); each must be in ``known``."""
    ids = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                ids.append(int(s))
            except ValueError:
                raise ValueError(f"{path}:{n}: '{s}' is not an integer COCO image id") from None
    if known is not None:
        known_set = set(known)
        for i in ids:
            if i not in known_set:
                raise ValueError(f"{path}: image id {i} is not in {json_file or 'the dataset'}")
    return ids


@lru_cache(maxsize=2)
def _load_records(json_file: str, image_root: str, _mtime: int) -> Tuple[Dict, ...]:
    # One parse per json and process, shared by the labeled and unlabeled halves. load_coco_json needs a dataset
    # name to map category ids to contiguous ones; a private one keeps the registered names' metadata ours.
    return tuple(load_coco_json(json_file, image_root, dataset_name=f"__semi_instance__{json_file}"))


def load_coco_split(
    json_file: str,
    image_root: str,
    dataset_name: str,
    image_ids: Optional[Sequence[int]] = None,
    exclude_ids: Optional[Sequence[int]] = None,
    drop_annotations: bool = False,
) -> List[Dict]:
    """Validated records of ``json_file`` (detectron2's ``load_coco_json``), restricted to ``image_ids`` /
    without ``exclude_ids``; ``drop_annotations`` makes them unlabeled. Each record gets ``dataset_name``."""
    validate_coco_json(json_file)
    records = _load_records(os.path.abspath(json_file), image_root, os.stat(json_file).st_mtime_ns)
    keep = set(image_ids) if image_ids is not None else None
    drop = set(exclude_ids) if exclude_ids is not None else set()
    out = []
    for r in records:
        if (keep is not None and r["image_id"] not in keep) or r["image_id"] in drop:
            continue
        r = {k: v for k, v in r.items() if not (drop_annotations and k == "annotations")}
        r["dataset_name"] = dataset_name
        out.append(r)
    return out


def register_coco_semi(name: str, json_file: str, image_root: str, labeled_ids: Optional[str] = None) -> List[str]:
    """Register ``name`` (and ``name_labeled`` / ``name_unlabeled`` when ``labeled_ids`` is a list file).
    The json is validated at registration (categories are needed for the label-space check); records load lazily.
    Returns the registered names."""
    info = validate_coco_json(json_file)
    cats = info["categories"]
    meta = dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
    )
    names = [name]
    DatasetCatalog.register(name, lambda: load_coco_split(json_file, image_root, name))
    if labeled_ids is not None:
        ids = read_image_ids(labeled_ids, json_file, info["image_ids"])
        lab, unl = f"{name}_labeled", f"{name}_unlabeled"
        DatasetCatalog.register(lab, lambda: load_coco_split(json_file, image_root, lab, image_ids=ids))
        DatasetCatalog.register(
            unl, lambda: load_coco_split(json_file, image_root, unl, exclude_ids=ids, drop_annotations=True)
        )
        names += [lab, unl]
    for n in names:
        MetadataCatalog.get(n).set(**meta)
    return names


# ---------------------------------------------------------------------------------------------- mappers
class RandomErasing:
    """Unbiased Teacher's cutout on the strong view: each ``(p, area_lo, area_hi, ratio_lo, ratio_hi)`` entry, with
    probability p, fills one box of that area fraction and aspect ratio with uniform noise. Geometry-preserving, so
    pseudo-boxes and masks of the weak view stay valid. ``uint8[3, H, W] -> uint8[3, H, W]``; global torch RNG."""

    def __init__(self, specs: Sequence[Sequence[float]] = ()):
        self.specs = [tuple(float(v) for v in s) for s in specs]
        for s in self.specs:
            if len(s) != 5 or not 0 <= s[0] <= 1 or not 0 < s[1] <= s[2] <= 1 or not 0 < s[3] <= s[4]:
                raise ValueError(f"SEMI_INSTANCE.STRONG_ERASING entry {list(s)}: expected [p, area_lo, area_hi, "
                                 "ratio_lo, ratio_hi] with 0<=p<=1, 0<area_lo<=area_hi<=1, 0<ratio_lo<=ratio_hi")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, H, W = image.shape
        out = image
        for p, a_lo, a_hi, r_lo, r_hi in self.specs:
            if torch.rand(()).item() >= p:
                continue
            for _ in range(10):  # torchvision's RandomErasing: retry until the box fits
                area = H * W * (a_lo + (a_hi - a_lo) * torch.rand(()).item())
                log_r = np.log(r_lo) + (np.log(r_hi) - np.log(r_lo)) * torch.rand(()).item()
                h = int(round(np.sqrt(area * np.exp(log_r))))
                w = int(round(np.sqrt(area / np.exp(log_r))))
                if 0 < h < H and 0 < w < W:
                    y = int(torch.randint(0, H - h + 1, ()).item())
                    x = int(torch.randint(0, W - w + 1, ()).item())
                    out = out.clone() if out is image else out
                    out[:, y:y + h, x:x + w] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
                    break
        return out


class TwoViewDatasetMapper:
    """Unlabeled train mapper: detectron2's ``DatasetMapper`` (resize + flip: the weak view) and a strong view of the
    very same pixels (photometric jitter, grayscale, blur, cutout): weak and strong share their geometry, so the
    teacher's boxes and masks on the weak view are targets for the student on the strong view unchanged.

    Output: ``{"image": uint8[3,H,W] weak, "image_strong": uint8[3,H,W], "height", "width", "file_name",
    "image_id"}`` (no ``instances``: annotations of unlabeled records are never read).
    """

    @configurable
    def __init__(self, *, weak_mapper: DatasetMapper, strong_aug: StrongPhotometricAug, erasing: RandomErasing,
                 image_format: str = "BGR"):
        self.weak_mapper = weak_mapper
        self.strong_aug = strong_aug
        self.erasing = erasing
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg):
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise ValueError(f"INPUT.FORMAT: the strong view needs 'BGR' or 'RGB' images, got '{cfg.INPUT.FORMAT}'")
        return dict(
            weak_mapper=DatasetMapper(cfg, is_train=True),
            strong_aug=StrongPhotometricAug.from_config(cfg),
            erasing=RandomErasing(cfg.SEMI_INSTANCE.STRONG_ERASING),
            image_format=cfg.INPUT.FORMAT,
        )

    def __call__(self, record: Dict) -> Dict:
        record = {k: v for k, v in record.items() if k != "annotations"}
        out = self.weak_mapper(record)
        weak = out["image"]
        rgb = weak.flip(0) if self.image_format == "BGR" else weak  # the photometric ops expect RGB
        strong = self.strong_aug(rgb)
        strong = strong.flip(0) if self.image_format == "BGR" else strong
        out["image_strong"] = self.erasing(strong.contiguous())
        return out


def build_semi_instance_train_loader(cfg):
    """``(labeled, unlabeled)`` batches forever through the engine's ``build_paired_loader``: labeled records through
    ``DatasetMapper(cfg, True)`` (-> ``instances`` with ``gt_masks`` when ``MODEL.MASK_ON``), unlabeled through
    :class:`TwoViewDatasetMapper`; unlabeled records lose ``annotations``; all sets must share ``thing_classes``."""
    labeled_filter = filter_images_with_only_crowd_annotations if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS else None
    return build_paired_loader(
        cfg,
        DatasetMapper(cfg, is_train=True),
        TwoViewDatasetMapper(cfg),
        label_keys=("annotations",),
        label_space_attrs=("thing_classes",),
        labeled_filter=labeled_filter,
    )
