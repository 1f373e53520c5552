"""Dataset mappers (docs/architecture.md "Data records"): dataset dict -> model input dict.

- :class:`SemSegDatasetMapper` ``is_train=True``: ``{"image": uint8[3,H,W], "sem_seg": long[H,W], "file_name",
  "height", "width"}`` (random scale, crop with padding: image 0, label ignore; horizontal flip);
  ``is_train=False``: ``{"image": uint8[3,H,W] original size, "file_name", "height", "width"}``.
- :class:`UnlabeledDatasetMapper`: ``{"image": weak uint8[3,H,W], "image_strong": uint8[3,H,W],
  "valid": bool[H,W] (False on padding), "file_name", "height", "width"}``; the strong view is the weak crop
  after photometric-only augmentation, so both share the exact geometry. Labels are never read.

Images are read by :func:`.io.read_image`: a file that cannot be decoded raises ``UnreadableFileError`` naming
the file and the record's ``dataset_name``. ``height``/``width`` are the original image size. Randomness uses numpy's and torch's global RNGs, which
detectron2 seeds per data-loader worker, so a run is reproducible given its seed.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import configurable

from .io import read_image
from .label_io import check_label_values, load_sem_seg
from .transforms import StrongPhotometricAug

__all__ = ["SemSegDatasetMapper", "UnlabeledDatasetMapper", "random_scale_crop_flip"]


def random_scale_crop_flip(
    image: np.ndarray,
    masks: Sequence[Tuple[np.ndarray, int]] = (),
    scale_range: Sequence[float] = (0.5, 2.0),
    base_size: int = 0,
    crop_size: Optional[Sequence[int]] = (512, 512),
    flip: bool = True,
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The train geometry, applied identically to ``image`` (HWC, bilinear) and each ``(mask, pad_value)``
    (HW, nearest).

    1. resize by s ~ U(scale_range) of the original size, or so that the long side is ``base_size * s``
       when ``base_size > 0`` (the VOC recipe of U2PL/UniMatch);
    2. pad bottom/right up to ``crop_size`` (image with 0, each mask with its pad value), then a uniform
       random ``crop_size = (h, w)`` crop (skipped when ``crop_size`` is None);
    3. horizontal flip with probability 0.5 when ``flip``.
    """
    h, w = image.shape[:2]
    s = float(np.random.uniform(scale_range[0], scale_range[1]))
    factor = (base_size * s / max(h, w)) if base_size > 0 else s
    nh, nw = max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))
    out_masks = [m for m, _ in masks]
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        out_masks = [cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST) for m in out_masks]
    if crop_size is not None:
        ch, cw = int(crop_size[0]), int(crop_size[1])
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            out_masks = [
                np.pad(m, ((0, ph), (0, pw)), constant_values=pad) for m, (_, pad) in zip(out_masks, masks)
            ]
        y0 = np.random.randint(0, image.shape[0] - ch + 1)
        x0 = np.random.randint(0, image.shape[1] - cw + 1)
        image = image[y0 : y0 + ch, x0 : x0 + cw]
        out_masks = [m[y0 : y0 + ch, x0 : x0 + cw] for m in out_masks]
    if flip and np.random.rand() < 0.5:
        image = image[:, ::-1]
        out_masks = [m[:, ::-1] for m in out_masks]
    return np.ascontiguousarray(image), [np.ascontiguousarray(m) for m in out_masks]


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _geometry_from_config(cfg) -> Dict:
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE != "absolute":
        raise ValueError(f"INPUT.CROP.TYPE: only 'absolute' (h, w) crops are supported, got '{cfg.INPUT.CROP.TYPE}'")
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "none"):
        raise ValueError(f"INPUT.RANDOM_FLIP: 'horizontal' or 'none', got '{cfg.INPUT.RANDOM_FLIP}'")
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT: the mappers produce RGB images, got '{cfg.INPUT.FORMAT}'")
    return dict(
        scale_range=tuple(cfg.INPUT.SCALE_RANGE),
        base_size=int(cfg.INPUT.BASE_SIZE),
        crop_size=tuple(cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED else None,
        flip=cfg.INPUT.RANDOM_FLIP == "horizontal",
    )


class SemSegDatasetMapper:
    """Labeled train / test mapper (see module docstring for the output dicts)."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        scale_range: Sequence[float] = (0.5, 2.0),
        base_size: int = 0,
        crop_size: Optional[Sequence[int]] = (512, 512),
        flip: bool = True,
        ignore_label: int = 255,
        num_classes: Optional[int] = None,
    ):
        """``num_classes`` validates labels of records without ``dataset_name`` (others use their metadata)."""
        self.is_train = is_train
        self.scale_range = scale_range
        self.base_size = base_size
        self.crop_size = crop_size
        self.flip = flip
        self.ignore_label = ignore_label
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return dict(
            is_train=is_train,
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            **_geometry_from_config(cfg),
        )

    def load_label(self, record: Dict, image_shape) -> np.ndarray:
        path = record["sem_seg_file_name"]
        name = record.get("dataset_name")
        label = load_sem_seg(path, name)
        if name is None and self.num_classes is not None:
            check_label_values(label, self.num_classes, self.ignore_label, path)
        if label.shape != tuple(image_shape[:2]):
            raise ValueError(
                f"label {path} is {label.shape[1]}x{label.shape[0]} (WxH) but image {record['file_name']} is "
                f"{image_shape[1]}x{image_shape[0]}" + (f" (dataset '{name}')" if name else "")
            )
        return label

    def __call__(self, record: Dict) -> Dict:
        record = copy.copy(record)
        image = read_image(record["file_name"], record.get("dataset_name"))
        out = {"file_name": record["file_name"], "height": image.shape[0], "width": image.shape[1]}
        if "dataset_name" in record:
            out["dataset_name"] = record["dataset_name"]
        if not self.is_train:
            out["image"] = _image_tensor(image)
            return out
        if "sem_seg_file_name" not in record:
            raise KeyError(f"{record['file_name']}: labeled training record without 'sem_seg_file_name'")
        label = self.load_label(record, image.shape)
        image, (label,) = random_scale_crop_flip(
            image, [(label, self.ignore_label)], self.scale_range, self.base_size, self.crop_size, self.flip
        )
        out["image"] = _image_tensor(image)
        out["sem_seg"] = torch.from_numpy(label.astype(np.int64))
        return out


class UnlabeledDatasetMapper:
    """Unlabeled train mapper: weak view + strong view of the same crop, and the ``valid`` (non-pad) mask."""

    @configurable
    def __init__(
        self,
        *,
        scale_range: Sequence[float] = (0.5, 2.0),
        base_size: int = 0,
        crop_size: Optional[Sequence[int]] = (512, 512),
        flip: bool = True,
        strong_aug: Optional[StrongPhotometricAug] = None,
    ):
        self.scale_range = scale_range
        self.base_size = base_size
        self.crop_size = crop_size
        self.flip = flip
        self.strong_aug = strong_aug if strong_aug is not None else StrongPhotometricAug()

    @classmethod
    def from_config(cls, cfg):
        return dict(strong_aug=StrongPhotometricAug.from_config(cfg), **_geometry_from_config(cfg))

    def __call__(self, record: Dict) -> Dict:
        image = read_image(record["file_name"], record.get("dataset_name"))
        h, w = image.shape[:2]
        valid = np.ones((h, w), dtype=np.uint8)
        image, (valid,) = random_scale_crop_flip(
            image, [(valid, 0)], self.scale_range, self.base_size, self.crop_size, self.flip
        )
        weak = _image_tensor(image)
        return {
            "image": weak,
            "image_strong": self.strong_aug(weak),
            "valid": torch.from_numpy(valid.astype(bool)),
            "file_name": record["file_name"],
            "height": h,
            "width": w,
        }
