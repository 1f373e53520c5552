"""``build_sem_seg_evaluator``: detectron2's :class:`SemSegEvaluator` whose ground truth is read with
:func:`semiseg_d2.data.label_io.load_sem_seg`, so metadata ``label_id_map`` (Cityscapes labelIds, GTA5,
CamVid void) applies to GT exactly as in training; a GT file of the wrong size is named with its image and dataset.
CityscapesSemSegEvaluator is never used (it needs cityscapesScripts and a Meta-only path); on Cityscapes val both
give the same 19-class mIoU.
"""
from functools import partial

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation import SemSegEvaluator

from ..data.io import decode_errors
from ..data.label_io import load_sem_seg

__all__ = ["build_sem_seg_evaluator", "sem_seg_gt_loader", "SizeCheckedSemSegEvaluator"]


def _load_gt(path, dtype=np.int64, *, dataset_name):
    return load_sem_seg(path, dataset_name, dtype=dtype)


def sem_seg_gt_loader(dataset_name: str):
    """``fn(path, dtype=int) -> np.ndarray[H,W]`` train-id GT of ``dataset_name`` (SemSegEvaluator's signature)."""
    return partial(_load_gt, dataset_name=dataset_name)


class SizeCheckedSemSegEvaluator(SemSegEvaluator):
    """SemSegEvaluator that refuses a ground-truth file whose size differs from its prediction (the input's original
    size), naming the label, the image and the dataset, instead of failing in ``np.bincount`` without a name."""

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            gt_file = self.input_file_to_gt_file[inp["file_name"]]
            with decode_errors("label", gt_file, self._dataset_name), Image.open(gt_file) as gt:
                w, h = gt.size  # the header only: the label itself is read once, by super().process
            ph, pw = out["sem_seg"].shape[-2:]
            if (h, w) != (ph, pw):
                raise ValueError(f"label {gt_file} is {w}x{h} (WxH) but image {inp['file_name']} is {pw}x{ph} "
                                 f"(dataset '{self._dataset_name}')")
        super().process(inputs, outputs)


def build_sem_seg_evaluator(cfg, dataset_name: str, output_dir=None, distributed: bool = True) -> SemSegEvaluator:
    """SemSegEvaluator for ``dataset_name`` (mIoU, fwIoU, per-class IoU/acc, mACC, pACC)."""
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type != "sem_seg":
        raise ValueError(
            f"dataset '{dataset_name}' has evaluator_type={evaluator_type!r}; build_sem_seg_evaluator needs 'sem_seg' "
            "(register it with semiseg_d2.data.datasets)"
        )
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if num_classes != len(meta.stuff_classes):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} but '{dataset_name}' has {len(meta.stuff_classes)} classes"
        )
    return SizeCheckedSemSegEvaluator(
        dataset_name, distributed=distributed, output_dir=output_dir, sem_seg_loading_fn=sem_seg_gt_loader(dataset_name)
    )
