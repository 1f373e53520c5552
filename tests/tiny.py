"""Tiny-but-real configs for CPU tests: the real ResNet/DeepLab code with narrow widths."""
import os

from semiseg_d2.config import get_semiseg_cfg

BUNDLED_CAMVID = os.path.join(os.path.dirname(__file__), "..", "semiseg_d2", "data", "bundled", "camvid_mini")


def tiny_cfg(head: str = "DeepLabV3PlusFeatHead", num_classes: int = 11, output_stride: int = 16, crop=(64, 64)):
    """A ResNet-50-layout backbone with 1/8 of the channels and a 32-d head: forward+backward in ms on CPU."""
    cfg = get_semiseg_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.OUTPUT_STRIDE = output_stride
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [8]
    cfg.MODEL.SEM_SEG_HEAD.AUX_CHANNELS = 16
    cfg.MODEL.WEIGHTS = ""
    cfg.INPUT.CROP.SIZE = tuple(crop)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg
