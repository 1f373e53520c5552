"""Tiny-but-real configs for CPU tests: the real ResNet/DeepLab code with narrow widths."""
import os

import torch

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


# DGCL at tiny sizes (a bank of 40 per class fills within a few steps): shared by tests and the numerics fixture.
TINY_DGCL = {
    "SEMI.LOSSES": ["supervised", "pseudo_label", "dgcl"],
    "SEMI.PSEUDO_LABEL.FILTER": "entropy",
    "SEMI.PSEUDO_LABEL.WEIGHT": 0.5,
    "SEMI.DGCL.PROJ_DIM": 16,
    "SEMI.DGCL.MEMORY_SIZE": 40,
    "SEMI.DGCL.MIN_FILL": 20,
    "SEMI.DGCL.UPDATE_PER_CLASS": 30,
    "SEMI.DGCL.NUM_ANCHORS": 8,
    "SEMI.DGCL.NUM_POSITIVES": 4,
    "SEMI.DGCL.NUM_NEGATIVES": 32,
    "SEMI.DGCL.MAX_PIXELS_PER_CLASS": 64,
}


def semi_cfg(**overrides):
    cfg = tiny_cfg(crop=(48, 64))
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label"]
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.0  # keep everything: the random teacher is unconfident
    cfg.SOLVER.MAX_ITER = 10
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg, overrides):
    """Set dotted keys, e.g. ``{"SEMI.MIX.PROB": 1.0}``, in place; returns ``cfg``."""
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def fake_batch(bl=2, bu=2, h=48, w=64, seed=0, strong2=False):
    """Random labeled + unlabeled records (last 5 columns of the unlabeled views are padding); ``strong2`` adds the
    second strong view that terms with ``needs_second_strong`` (unimatch) read."""
    g = torch.Generator().manual_seed(seed)
    labeled = [
        {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
         "sem_seg": torch.randint(0, 11, (h, w), generator=g)}
        for _ in range(bl)
    ]
    unlabeled = []
    for _ in range(bu):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        valid = torch.ones(h, w, dtype=torch.bool)
        valid[:, -5:] = False
        unlabeled.append({"image": img, "image_strong": 255 - img, "valid": valid})
        if strong2:
            unlabeled[-1]["image_strong2"] = img // 2 + 64
    return labeled, unlabeled


def tiny_vit_cfg(num_classes: int = 11, crop=(56, 70), **overrides):
    """DINOv2-S layout with depth 4, width 32 (2 heads), every block tapped, and a 16-d DPT head (no norm)."""
    cfg = tiny_cfg(num_classes=num_classes, crop=crop)
    cfg.MODEL.BACKBONE.NAME = "D2DinoV2"
    cfg.MODEL.DINOV2.SIZE = "small"
    cfg.MODEL.DINOV2.EMBED_DIM = 32
    cfg.MODEL.DINOV2.DEPTH = 4
    cfg.MODEL.DINOV2.NUM_HEADS = 2
    cfg.MODEL.DINOV2.OUT_INDICES = [0, 1, 2, 3]
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DPTHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["layer1", "layer2", "layer3", "layer4"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [8, 16, 32, 32]
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    cfg.SOLVER.OPTIMIZER = "AdamW"
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 40.0
    cfg.SOLVER.WEIGHT_DECAY = 0.01
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.01
    return apply_overrides(cfg, overrides)
