"""Dataset mappers (docs/architecture.md "Data records"): dataset dict -> model input dict.

- :class:`SemSegDatasetMapper` ``is_train=True``: ``{"image": uint8[3,H,W], "sem_seg": long[H,W], "file_name",
  "height", "width"}`` (random scale, crop with padding: image 0, label ignore; horizontal flip);
  ``is_train=False``: ``{"image": uint8[3,h,w], "file_name", "height", "width"}``, the image resized by
  ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` exactly as ``DefaultPredictor`` does (:func:`test_resize_from_config`;
  ``MIN_SIZE_TEST 0`` keeps the original size); the model upsamples its prediction to ``height`` x ``width``.
- :class:`UnlabeledDatasetMapper`: ``{"image": weak uint8[3,H,W], "image_strong": uint8[3,H,W],
  "valid": bool[H,W] (False on padding), "file_name", "height", "width"}``; the strong view is the weak crop
  after photometric-only augmentation, so both share the exact geometry. Labels are never read (except with
  ``SEMI.DIAGNOSTICS``: ``diagnostic_sem_seg``, the ground truth through the same geometry, for measurements
  only). With
  ``second_strong`` (a ``SEMI.LOSSES`` term declares ``needs_second_strong``: UniMatch) also ``"image_strong2"``,
  a second, independent photometric draw of the same crop, drawn after the first (which is unchanged).

Images are read by :func:`.io.read_image`: a file that cannot be decoded raises ``UnreadableFileError`` naming
the file and the record's ``dataset_name``. ``height``/``width`` are the original image size. Randomness uses numpy's and torch's global RNGs, which
detectron2 seeds per data-loader worker, so a run is reproducible given its seed.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import configurable

from .io import read_image
from .label_io import check_label_values, load_sem_seg
from .transforms import StrongPhotometricAug

__all__ = ["SemSegDatasetMapper", "UnlabeledDatasetMapper", "random_scale_crop_flip", "sample_scale",
           "test_resize_from_config"]

SCALE_SAMPLINGS = ("uniform", "u2pl")


def sample_scale(scale_range: Sequence[float], sampling: str = "uniform") -> float:
    """One random resize factor from numpy's global RNG (``INPUT.SCALE_SAMPLING``).

    "uniform": s ~ U(lo, hi) (one draw). "u2pl": U2PL's ``RandResize`` (u2pl/dataset/augmentation.py, also
    DGCL's): with probability 1/2 s ~ U(lo, 1), else s ~ U(1, hi) (two draws), so as many images shrink as
    grow; with (0.5, 2.0) the mean is 1.125, not 1.25.
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if sampling == "uniform":
        return float(np.random.uniform(lo, hi))
    if sampling == "u2pl":
        if not lo <= 1.0 <= hi:
            raise ValueError(f"INPUT.SCALE_SAMPLING 'u2pl' needs INPUT.SCALE_RANGE to contain 1, got {[lo, hi]}")
        if np.random.rand() < 0.5:
            return lo + (1.0 - lo) * float(np.random.rand())
        return 1.0 + (hi - 1.0) * float(np.random.rand())
    raise ValueError(f"INPUT.SCALE_SAMPLING: unknown '{sampling}'; known: {', '.join(SCALE_SAMPLINGS)}")


def random_scale_crop_flip(
    image: np.ndarray,
    masks: Sequence[Tuple[np.ndarray, int]] = (),
    scale_range: Sequence[float] = (0.5, 2.0),
    base_size: int = 0,
    crop_size: Optional[Sequence[int]] = (512, 512),
    flip: bool = True,
    scale_sampling: str = "uniform",
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The train geometry, applied identically to ``image`` (HWC, bilinear) and each ``(mask, pad_value)``
    (HW, nearest).

    1. resize by s ~ ``sample_scale(scale_range, scale_sampling)`` of the original size, or so that the long side is ``base_size * s``
       when ``base_size > 0`` (the VOC recipe of U2PL/UniMatch);
    2. pad bottom/right up to ``crop_size`` (image with 0, each mask with its pad value), then a uniform
       random ``crop_size = (h, w)`` crop (skipped when ``crop_size`` is None);
    3. horizontal flip with probability 0.5 when ``flip``.
    """
    h, w = image.shape[:2]
    s = sample_scale(scale_range, scale_sampling)
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


def test_resize_from_config(cfg) -> T.ResizeShortestEdge:
    """The test-time resize of ``DefaultPredictor`` (short side ``INPUT.MIN_SIZE_TEST``, long side at most
    ``INPUT.MAX_SIZE_TEST``; ``MIN_SIZE_TEST`` 0 is a no-op): the evaluation loader and the predictor share it."""
    min_size, max_size = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    if min_size < 0 or (min_size > 0 and max_size <= 0):
        raise ValueError(
            f"INPUT.MIN_SIZE_TEST={min_size} / MAX_SIZE_TEST={max_size}: MIN_SIZE_TEST must be 0 (original size) or "
            "> 0 with MAX_SIZE_TEST > 0"
        )
    return T.ResizeShortestEdge([min_size, min_size], max_size)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _geometry_from_config(cfg) -> Dict:
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE != "absolute":
        raise ValueError(f"INPUT.CROP.TYPE: only 'absolute' (h, w) crops are supported, got '{cfg.INPUT.CROP.TYPE}'")
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "none"):
        raise ValueError(f"INPUT.RANDOM_FLIP: 'horizontal' or 'none', got '{cfg.INPUT.RANDOM_FLIP}'")
    if cfg.INPUT.SCALE_SAMPLING not in SCALE_SAMPLINGS:
        raise ValueError(
            f"INPUT.SCALE_SAMPLING: unknown '{cfg.INPUT.SCALE_SAMPLING}'; known: {', '.join(SCALE_SAMPLINGS)}"
        )
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT: the mappers produce RGB images, got '{cfg.INPUT.FORMAT}'")
    return dict(
        scale_range=tuple(cfg.INPUT.SCALE_RANGE),
        base_size=int(cfg.INPUT.BASE_SIZE),
        crop_size=tuple(cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED else None,
        flip=cfg.INPUT.RANDOM_FLIP == "horizontal",
        scale_sampling=cfg.INPUT.SCALE_SAMPLING,
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
        scale_sampling: str = "uniform",
        ignore_label: int = 255,
        num_classes: Optional[int] = None,
        test_resize: Optional[T.Augmentation] = None,
    ):
        """``num_classes`` validates labels of records without ``dataset_name`` (others use their metadata);
        ``test_resize`` (``is_train=False``) resizes the image, None keeps it as it is."""
        self.is_train = is_train
        self.test_resize = test_resize
        self.scale_range = scale_range
        self.base_size = base_size
        self.crop_size = crop_size
        self.flip = flip
        self.scale_sampling = scale_sampling
        self.ignore_label = ignore_label
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return dict(
            is_train=is_train,
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            test_resize=None if is_train else test_resize_from_config(cfg),
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
            if self.test_resize is not None:
                image = self.test_resize.get_transform(image).apply_image(image)
            out["image"] = _image_tensor(image)
            return out
        if "sem_seg_file_name" not in record:
            raise KeyError(f"{record['file_name']}: labeled training record without 'sem_seg_file_name'")
        label = self.load_label(record, image.shape)
        image, (label,) = random_scale_crop_flip(
            image, [(label, self.ignore_label)], self.scale_range, self.base_size, self.crop_size, self.flip,
            self.scale_sampling,
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
        scale_sampling: str = "uniform",
        strong_aug: Optional[StrongPhotometricAug] = None,
        second_strong: bool = False,
        ignore_label: int = 255,
    ):
        self.second_strong = second_strong
        self.ignore_label = ignore_label  # padding of the diagnostic ground truth
        self.scale_range = scale_range
        self.base_size = base_size
        self.crop_size = crop_size
        self.flip = flip
        self.scale_sampling = scale_sampling
        self.strong_aug = strong_aug if strong_aug is not None else StrongPhotometricAug()

    @classmethod
    def from_config(cls, cfg):
        from ..losses.registry import terms_declare  # the terms register on import of semiseg_d2.losses

        return dict(
            strong_aug=StrongPhotometricAug.from_config(cfg),
            second_strong=terms_declare(cfg, "needs_second_strong"),
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            **_geometry_from_config(cfg),
        )

    def __call__(self, record: Dict) -> Dict:
        image = read_image(record["file_name"], record.get("dataset_name"))
        h, w = image.shape[:2]
        valid = np.ones((h, w), dtype=np.uint8)
        masks = [(valid, 0)]
        gt_file = record.get("diagnostic_sem_seg_file_name")  # SEMI.DIAGNOSTICS only: never read by a loss
        if gt_file is not None:
            masks.append((self._diagnostic_gt(record, gt_file, image.shape), self.ignore_label))
        image, (valid, *gt) = random_scale_crop_flip(
            image, masks, self.scale_range, self.base_size, self.crop_size, self.flip,
            self.scale_sampling,
        )
        weak = _image_tensor(image)
        out = {
            "image": weak,
            "image_strong": self.strong_aug(weak),
            "valid": torch.from_numpy(valid.astype(bool)),
            "file_name": record["file_name"],
            "height": h,
            "width": w,
        }
        if self.second_strong:
            out["image_strong2"] = self.strong_aug(weak)
        if gt:
            out["diagnostic_sem_seg"] = torch.from_numpy(gt[0].astype(np.int64))
        return out

    @staticmethod
    def _diagnostic_gt(record: Dict, path: str, image_shape) -> np.ndarray:
        label = load_sem_seg(path, record.get("diagnostic_sem_seg_dataset", record.get("dataset_name")))
        if label.shape != tuple(image_shape[:2]):
            raise ValueError(f"diagnostic ground truth {path} is {label.shape} but image {record['file_name']} is "
                             f"{tuple(image_shape[:2])}")
        return label
