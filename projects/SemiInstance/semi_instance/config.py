"""Config of the SemiInstance project: detectron2's R-CNN defaults + the engine's keys + ``SEMI_INSTANCE.*``.

:func:`get_semi_instance_cfg` starts from ``semiseg_d2.get_semiseg_cfg()`` (the engine's ``SEMI.*``, ``SOLVER.*``,
``TEST.EVAL_*`` keys the trainer, EMA hook and checkpointer read) but gives every key detectron2 itself declares
back its detectron2 default (``get_semiseg_cfg`` changes some for DeepLab: backbone, ResNet stem, pixel mean,
``INPUT.FORMAT``, crop, LR scheduler, ``MODEL.DEVICE``...), so model-zoo R-CNN yaml files mean what they mean in
detectron2. Engine keys get this project's defaults (Unbiased Teacher's COCO recipe where it has one).
"""
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from semiseg_d2.config import add_semiseg_config

_MARKER = "SEMI_INSTANCE_CONFIG_VERSION"


def _restore_defaults(cfg: CN, defaults: CN) -> None:
    for key, value in defaults.items():
        if isinstance(value, CN):
            _restore_defaults(cfg[key], value)
        else:
            cfg[key] = value


def add_semi_instance_config(cfg: CN) -> CN:
    """Add the engine's keys (if absent: detectron2's own keys keep their values), ``SEMI_INSTANCE.*`` and this
    project's defaults of engine keys (in place; returns ``cfg``)."""
    if _MARKER in cfg:
        return cfg
    if "SEMISEG_CONFIG_VERSION" not in cfg:  # a plain detectron2 config: keep its values of detectron2's keys
        d2_values = cfg.clone()
        add_semiseg_config(cfg)
        _restore_defaults(cfg, d2_values)
    cfg[_MARKER] = 1

    cfg.MODEL.META_ARCHITECTURE = "SemiRCNN"
    cfg.MODEL.MASK_ON = True
    # The FPN's layers are new on an ImageNet ResNet (MODEL.WEIGHTS); the ResNet itself must load completely.
    cfg.MODEL.WEIGHTS_NEW_KEYS = [r"backbone\.fpn_", r"backbone\.top_block\."]

    # Engine keys (semiseg_d2/config.py), this project's defaults.
    cfg.SEMI.LOSSES = ["rcnn_supervised", "rcnn_pseudo_label"]  # + "roi_memory_contrast" (Alonso et al. on RoIs)
    cfg.SEMI.BURN_IN_ITERS = 2000  # supervised burn-in (Unbiased Teacher COCO: BURN_UP_STEP 2000)
    cfg.SEMI.EMA.MOMENTUM = 0.9996  # Unbiased Teacher EMA_KEEP_RATE
    cfg.SEMI.EMA.SCHEDULE = "constant"
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 1.0  # detectron2 R-CNN recipes: one LR for every parameter
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 16
    # Strong view (Unbiased Teacher): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p 0.5 sigma 0.1-2
    cfg.INPUT.STRONG.COLOR_JITTER = [0.4, 0.4, 0.4, 0.1]
    # The memory-bank term on RoI features reuses SEMI.MEMORY_CONTRAST.* (losses/memory_contrast.py); RoI defaults:
    cfg.SEMI.MEMORY_CONTRAST.START_ITER = 0  # counted from iteration 0; the term only runs after burn-in anyway
    cfg.SEMI.MEMORY_CONTRAST.PROJECTION_DIM = 128
    cfg.SEMI.MEMORY_CONTRAST.HIDDEN_DIM = 256
    cfg.SEMI.MEMORY_CONTRAST.SELECTOR_HIDDEN_DIM = 128
    cfg.SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE = 1  # boxes per image and class entering the bank (max(1, 256/|X_l|))
    cfg.SEMI.MEMORY_CONTRAST.CONFIDENCE_THRESHOLD = 0.9  # teacher class probability of a GT box to enter the bank

    cfg.SEMI_INSTANCE = CN()
    cfg.SEMI_INSTANCE.STUDENT_ARCHITECTURE = "GeneralizedRCNN"  # META_ARCH_REGISTRY name of student and teacher
    # Teacher detections on the weak view with score >= this become pseudo-instances (Unbiased Teacher: 0.7)
    cfg.SEMI_INSTANCE.PSEUDO_SCORE_THRESHOLD = 0.7
    cfg.SEMI_INSTANCE.PSEUDO_MASK_THRESHOLD = 0.5  # teacher mask probability -> binary pseudo-mask
    cfg.SEMI_INSTANCE.UNSUP_WEIGHT = 4.0  # weight of the losses on pseudo-instances (Unbiased Teacher COCO: 4.0)
    # Unsupervised losses: RPN objectness + RoI classification always; box regression off (Unbiased Teacher:
    # pseudo-box coordinates are too noisy to regress to); mask loss on pseudo-masks on.
    cfg.SEMI_INSTANCE.UNSUP_BOX_REGRESSION = False
    cfg.SEMI_INSTANCE.UNSUP_MASK = True
    # Cutout on the strong view, one [p, area_lo, area_hi, ratio_lo, ratio_hi] per pass (Unbiased Teacher's three)
    cfg.SEMI_INSTANCE.STRONG_ERASING = [[0.7, 0.05, 0.2, 0.3, 3.3], [0.5, 0.02, 0.2, 0.1, 6.0], [0.3, 0.02, 0.2, 0.05, 8.0]]
    # roi_memory_contrast: also enqueue teacher features of pseudo-boxes (score >= CONFIDENCE_THRESHOLD) of the weak
    # views; False = labeled GT boxes only (Alonso et al. fill the bank from labeled data only)
    cfg.SEMI_INSTANCE.BANK_FROM_PSEUDO = False
    return cfg


def get_semi_instance_cfg() -> CN:
    """detectron2 defaults (R-CNN) + the engine's keys + SEMI_INSTANCE; see the module docstring."""
    return add_semi_instance_config(get_cfg())
