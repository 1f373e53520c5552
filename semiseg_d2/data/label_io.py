"""Reading label maps: raw label values -> train ids (metadata ``label_id_map``) with value checks.

Every label read in semiseg_d2 (mappers, evaluators, converters) goes through :func:`load_sem_seg`, so a
dataset whose files store raw ids (Cityscapes ``labelIds``, GTA5, CamVid's void 11) is mapped in one place
and a stray value fails loudly instead of silently becoming a class.
"""
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata

from .io import decode_errors

__all__ = ["load_sem_seg", "label_lut", "apply_label_map", "check_label_values", "datasets_env_hint"]


def datasets_env_hint() -> str:
    """One sentence telling where dataset roots come from, with the current DETECTRON2_DATASETS value."""
    value = os.environ.get("DETECTRON2_DATASETS")
    current = f"DETECTRON2_DATASETS={value}" if value else "DETECTRON2_DATASETS is unset, default 'datasets'"
    return f"dataset roots are read from $DETECTRON2_DATASETS ({current}); see docs/datasets.md"


def label_lut(label_id_map: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    """The 256-entry uint8 lookup table of a metadata ``label_id_map`` (None stays None)."""
    if label_id_map is None:
        return None
    lut = np.asarray(label_id_map, dtype=np.int64)
    if lut.shape != (256,) or lut.min() < 0 or lut.max() > 255:
        raise ValueError(f"label_id_map must be 256 ints in [0, 255], got shape {lut.shape}")
    return lut.astype(np.uint8)


def apply_label_map(label: np.ndarray, label_id_map: Optional[Sequence[int]]) -> np.ndarray:
    """``label`` (uint8 [H,W] raw ids) -> train ids through ``label_id_map``; identity when it is None."""
    lut = label_lut(label_id_map)
    return label if lut is None else lut[label]


def check_label_values(label: np.ndarray, num_classes: int, ignore_label: int, source: str) -> None:
    """Raise ValueError naming ``source`` and the offending values if any pixel is neither a class nor ignore."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_label)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise ValueError(
            f"label file {source}: value(s) {shown} are neither a class id in [0, {num_classes}) nor the "
            f"ignore label {ignore_label} (after label_id_map); wrong dataset, or a labelIds file where "
            "labelTrainIds were expected?"
        )


def _read_label_file(path: str, dataset: Optional[str] = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file not found: {path}; {datasets_env_hint()}")
    with decode_errors("label", path, dataset):
        with Image.open(path) as img:
            mode = img.mode
            label = np.asarray(img)
    # "P" (palette, VOC/GTA5) and "L" PNGs both give the stored index per pixel.
    if mode not in ("L", "P", "I", "I;16"):
        of = f" of dataset '{dataset}'" if dataset else ""
        raise ValueError(f"label file {path}{of}: expected a single-channel PNG (mode L/P), got mode {mode}")
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"label file {path}: values outside 0..255 (min {label.min()}, max {label.max()})")
        label = label.astype(np.uint8)
    return label


def load_sem_seg(path: str, meta_or_name: Union[str, Metadata, None], dtype=np.uint8) -> np.ndarray:
    """Read a label map as train ids: ``np.uint8[H, W]`` (or ``dtype``), ignore = metadata ``ignore_label``.

    Args:
        path: a single-channel PNG.
        meta_or_name: the dataset's Metadata or its registered name; None reads the raw file unchecked.
        dtype: output dtype (detectron2's SemSegEvaluator asks for ``int``).
    Raises:
        FileNotFoundError naming ``path``; :class:`..io.UnreadableFileError` (a ValueError) naming ``path`` and the
        dataset when the file cannot be decoded; ValueError naming the bad value(s) or mode and ``path``.
    """
    name = meta_or_name if isinstance(meta_or_name, str) else getattr(meta_or_name, "name", None)
    label = _read_label_file(path, name)
    if meta_or_name is None:
        return label.astype(dtype, copy=False)
    meta = MetadataCatalog.get(meta_or_name) if isinstance(meta_or_name, str) else meta_or_name
    label = apply_label_map(label, meta.get("label_id_map", None))
    check_label_values(label, len(meta.stuff_classes), meta.get("ignore_label", 255), path)
    return label.astype(dtype, copy=False)
