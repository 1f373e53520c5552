"""Every config key semiseg_d2 adds to Detectron2's defaults, with its default and why it exists.

Nothing in the package reads a key that is not declared here. Sections:
  MODEL.*            backbone/head/segmentor options (on top of detectron2.projects.deeplab's keys)
  INPUT.*            train-time geometry and the strong (photometric) augmentation of unlabeled views
  DATASETS.*         labeled / unlabeled training sets, several labeled sources with ratios
  DATALOADER.*       what an unreadable unlabeled image does (error / skip)
  SOLVER.*           LR multipliers, bf16 autocast, unlabeled batch size
  TEST.*             sliding-window and multi-scale/flip inference, evaluating student and teacher
  SEMI.*             the semi-supervised engine: loss terms, EMA teacher, burn-in, mixing
  SEMI.<TERM>.*      one sub-node per loss term (weight + its own options)

Allowed values (the schema): a key whose values are limited is declared with :func:`declare` instead of a plain
assignment, with its check beside its default, e.g.

    declare(cfg, "SEMI.DGCL.TEMPERATURE", 0.5, POSITIVE)  # InfoNCE temperature
    declare(cfg, "SEMI.DGCL.MIN_FILL", 10000, Range(0, "SEMI.DGCL.MEMORY_SIZE"))  # a bound may name another key
    declare(cfg, "SEMI.PSEUDO_LABEL.START_ITER", 0, ITERATION)  # = Range(0, "SOLVER.MAX_ITER")
    declare(cfg, "DATALOADER.UNREADABLE_UNLABELED", "error", OneOf("error", "skip"))

:func:`check_semiseg_config` (called at start-up by the trainers, models and predictor) checks every declared key
and raises one ValueError naming each key, its value and the allowed range. Lists are checked element by element
(``Range(..., length=2, ordered=True)`` for a ``[lo, hi]`` pair). Keys of a loss term's node ``SEMI.<TERM>`` (a
name of SEMI_LOSS_REGISTRY, upper-cased) are checked only when the term is in ``SEMI.LOSSES``: a term that does
not run reads none of its keys. New keys (here, or in a project's ``add_*_config``) use the same call; the constants
below cover most keys, ``Range(lo, hi, lo_open=..., hi_open=...)`` the rest. tests/test_config_ranges.py walks every
declared key with a value outside its range.
"""
import math
from typing import Dict, List, Optional, Sequence, Union

from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

Bound = Union[None, int, float, str]  # a number, the dotted name of another key, or None (unbounded)


class Range:
    """Allowed numeric values ``lo <= v <= hi`` (``<`` with ``lo_open`` / ``hi_open``); a bound is a number or the
    dotted name of another key of the same config. List values are checked element-wise, with an optional
    ``length`` and ``ordered`` (non-decreasing: a ``[min, max]`` pair)."""

    def __init__(self, lo: Bound = None, hi: Bound = None, *, lo_open: bool = False, hi_open: bool = False,
                 length: Optional[int] = None, ordered: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.length, self.ordered = length, ordered

    @staticmethod
    def _bound(bound: Bound, cfg: CN):
        return lookup(cfg, bound) if isinstance(bound, str) else bound

    def describe(self, cfg: CN) -> str:
        """The allowed range as text, e.g. ``(0, inf)``, ``[0, 1]``, ``[0, SOLVER.MAX_ITER = 100]``."""
        def text(bound, default):
            if bound is None:
                return default
            return f"{bound} = {lookup(cfg, bound)}" if isinstance(bound, str) else f"{bound}"

        lo = ("(" if self.lo_open or self.lo is None else "[") + text(self.lo, "-inf")
        hi = text(self.hi, "inf") + (")" if self.hi_open or self.hi is None else "]")
        length = f", {self.length} values" if self.length is not None else ""
        return f"{lo}, {hi}{length}" + (", non-decreasing" if self.ordered else "")

    def _contains(self, v, cfg: CN) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        lo, hi = self._bound(self.lo, cfg), self._bound(self.hi, cfg)
        if lo is not None and (v < lo or (self.lo_open and v == lo)):
            return False
        return hi is None or (v < hi or (not self.hi_open and v == hi))

    def problem(self, value, cfg: CN) -> Optional[str]:
        """Why ``value`` is not allowed (None when it is)."""
        if isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                return f"{len(value)} value(s) where {self.length} are needed"
            bad = [i for i, v in enumerate(value) if not self._contains(v, cfg)]
            if bad:
                return f"element {bad[0]} ({value[bad[0]]!r}) out of range"
            if self.ordered and any(a > b for a, b in zip(value, value[1:])):
                return "not in non-decreasing order"
            return None
        if self.length is not None:
            return f"a single value where {self.length} are needed"
        return None if self._contains(value, cfg) else "out of range"

    def outside(self, cfg: CN, value):
        """A value of the shape of ``value`` that this range refuses (for the schema walk of the tests)."""
        lo, hi = self._bound(self.lo, cfg), self._bound(self.hi, cfg)
        bad = lo - 1 if lo is not None else hi + 1
        if isinstance(value, (list, tuple)):
            first = type(value[0])(bad) if value else bad
            return type(value)([first] + list(value[1:]))
        return type(value)(bad)


class OneOf:
    """Allowed values: one of ``choices``."""

    def __init__(self, *choices):
        self.choices = choices

    def describe(self, cfg: CN) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def problem(self, value, cfg: CN) -> Optional[str]:
        return None if value in self.choices else "unknown value"

    def outside(self, cfg: CN, value):
        return "_not_" + "_".join(str(c) for c in self.choices) if isinstance(value, str) else max(self.choices) + 1


Check = Union[Range, OneOf]
POSITIVE = Range(0, lo_open=True)  # temperatures, learning rates, sizes in units
NON_NEGATIVE = Range(0)  # loss weights (0 turns a part off), optional counts (0 = off / implied)
AT_LEAST_1 = Range(1)  # sizes and counts
UNIT = Range(0, 1)  # probabilities, confidence thresholds, fractions
UNIT_OPEN = Range(0, 1, hi_open=True)  # momenta and dropout rates (1 would freeze / drop everything)
PERCENT = Range(0, 100)


class IterationCount(Range):
    """An iteration count of the run's schedule (an iteration, a start iteration, a ramp length): allowed in
    ``[0, SOLVER.MAX_ITER]``, and rescaled with the schedule (:func:`schedule_keys`)."""

    def __init__(self):
        super().__init__(0, "SOLVER.MAX_ITER")


ITERATION = IterationCount()  # declare(cfg, key, default, ITERATION) makes ``key`` one of the schedule_keys

SCHEMA: Dict[str, Check] = {}  # dotted key -> its check, filled by declare() (add_semiseg_config and projects)
_DECLARED_HERE = False  # add_semiseg_config's declare()s ran in this process


def lookup(cfg: CN, key: str):
    """The value of the dotted ``key`` of ``cfg``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def declare(cfg: CN, key: str, default, check: Check) -> None:
    """Set the dotted ``key`` (its parent node must exist) to ``default`` and record ``check`` in :data:`SCHEMA`.
    A default outside its own range is a programming error (checked when the bounds are numbers)."""
    *path, last = key.split(".")
    (lookup(cfg, ".".join(path)) if path else cfg)[last] = default
    if not _names_keys(check) and check.problem(default, cfg) is not None:
        raise ValueError(f"declare: the default {default!r} of {key} is not in {check.describe(cfg)}")
    SCHEMA[key] = check


def _names_keys(check: Check) -> bool:
    return any(isinstance(getattr(check, b, None), str) for b in ("lo", "hi"))


def _inactive_term(cfg: CN, key: str, term_names: Sequence[str]) -> bool:
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "SEMI":
        return False
    term = parts[1].lower()
    return term in term_names and term not in [str(t).lower() for t in cfg.SEMI.LOSSES]


def _declared_and_read(cfg: CN, keys: Optional[Sequence[str]] = None):
    """(key, check, value) of every declared key (or of ``keys``) that ``cfg`` has and that is read: keys of a loss
    term that ``SEMI.LOSSES`` does not list are left out."""
    from .losses.registry import SEMI_LOSS_REGISTRY  # noqa: PLC0415  the registry imports modules that import this one

    if not _DECLARED_HERE:
        get_semiseg_cfg()  # a process given a pickled config (DDP spawn) never ran add_semiseg_config's declare()s
    term_names = [name.lower() for name, _ in SEMI_LOSS_REGISTRY]
    for key in keys if keys is not None else list(SCHEMA):
        check = SCHEMA.get(key)
        try:
            value = lookup(cfg, key)
        except KeyError:
            continue  # declared by a project whose keys this config does not have
        if check is None or _inactive_term(cfg, key, term_names):
            continue
        yield key, check, value


def schedule_keys(cfg: CN) -> List[str]:
    """The iteration counts of ``cfg``'s schedule that semiseg_d2 and its loss terms declare (with :data:`ITERATION`:
    SEMI.BURN_IN_ITERS, each running term's start iterations and ramp lengths), in declaration order. The trainer
    rescales them with SOLVER.REFERENCE_WORLD_SIZE and tools/run_study.py with --schedule-scale, next to detectron2's
    own SOLVER.MAX_ITER / WARMUP_ITERS / ... (not listed here). Keys of terms not in SEMI.LOSSES are not read and
    not listed."""
    return [key for key, check, _ in _declared_and_read(cfg) if isinstance(check, IterationCount)]


def range_errors(cfg: CN, keys: Optional[Sequence[str]] = None) -> List[str]:
    """One line per declared key (or of ``keys``) of ``cfg`` whose value its check refuses; keys of a loss
    term that ``SEMI.LOSSES`` does not list are skipped."""
    errors = []
    for key, check, value in _declared_and_read(cfg, keys):
        problem = check.problem(value, cfg)
        if problem is not None:
            errors.append(f"{key} = {value!r}: {problem}; allowed: {check.describe(cfg)}")
    return errors


def check_ranges(cfg: CN, keys: Optional[Sequence[str]] = None) -> None:
    """Raise ValueError listing every declared key (or every one of ``keys``) whose value is not allowed."""
    errors = range_errors(cfg, keys)
    if errors:
        raise ValueError("config value(s) out of range:\n  " + "\n  ".join(errors))

# Marker that add_semiseg_config() ran; tools check it to give a clear error for plain detectron2 configs.
_MARKER = "SEMISEG_CONFIG_VERSION"


def add_semiseg_config(cfg: CN) -> CN:
    """Add semiseg_d2's keys to a detectron2 config (in place) and return it."""
    if _MARKER in cfg:
        return cfg
    add_deeplab_config(cfg)  # RESNETS.STEM_TYPE/RES4_DILATION/RES5_MULTI_GRID, ASPP_*, POLY_LR_*
    cfg[_MARKER] = 1  # bump when a key changes meaning

    # ------------------------------------------------------------------ MODEL
    cfg.MODEL.META_ARCHITECTURE = "Segmentor"
    cfg.MODEL.BACKBONE.NAME = "build_semiseg_resnet_backbone"  # OUTPUT_STRIDE-aware DeepLab ResNet (modeling/backbone)
    # RGB, 0..255 (INPUT.FORMAT "RGB"): ImageNet statistics of torchvision/timm weights (tools/convert_pretrained.py)
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    declare(cfg, "MODEL.PIXEL_STD", [58.395, 57.12, 57.375], Range(0, lo_open=True, length=3))
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # segmentation fine-tunes every stage (detectron2 default 2 freezes stem+res2)
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res4", "res5"]  # res2: low-level, res4: aux head, res5: ASPP
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 128  # DeepLab deep stem 3x(3x3): 64-64-128
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision/DeepLab ResNet put stride in the 3x3 conv
    cfg.MODEL.RESNETS.NORM = "BN"  # "BN" or "SyncBN" (SyncBN needs a process group; BN on CPU)
    # Output stride of the backbone: 8 (res4 dilation 2, res5 dilation 4) or 16 (res5 dilation 2).
    # Sets RESNETS.RES4_DILATION / RES5_DILATION when the model is built (see modeling/backbone).
    declare(cfg, "MODEL.RESNETS.OUTPUT_STRIDE", 16, OneOf(8, 16))
    cfg.MODEL.FREEZE_BN = False  # keep backbone BN in eval mode (small-batch fine-tuning)
    cfg.MODEL.CHANNELS_LAST = False  # run convolutions in channels_last memory format (GPU speed)
    cfg.MODEL.DEVICE = "cpu"  # detectron2 default is "cuda"; GPU configs set "cuda"
    # Training from MODEL.WEIGHTS (not --resume): every model key under these prefixes must load from the file with
    # the model's shape, else training stops naming the keys (engine/checkpoint.py); keys outside them (heads, loss
    # terms) start from their initialisation when the file lacks them.
    cfg.MODEL.WEIGHTS_REQUIRED_PREFIXES = ["backbone."]
    # Regexes (re.match on model keys) of required-prefix keys a config adds on purpose, i.e. that pretrained
    # weights cannot hold (e.g. an FPN on a pretrained ResNet: projects/SemiInstance); they may be absent.
    cfg.MODEL.WEIGHTS_NEW_KEYS = []

    # DINOv2 ViT backbone (MODEL.BACKBONE.NAME "D2DinoV2", modeling/backbone/dinov2.py; README "Foundation encoders")
    cfg.MODEL.DINOV2 = CN()
    # "small" (ViT-S/14), "base" (ViT-B/14), "large" (ViT-L/14)
    declare(cfg, "MODEL.DINOV2.SIZE", "base", OneOf("small", "base", "large"))
    cfg.MODEL.DINOV2.REGISTERS = False  # the 4-register variants (dinov2_vit*14_reg4)
    # Blocks whose normed patch tokens feed the head as layer1..layer4; [] = UniMatch V2's (S/B: 2,5,8,11; L: 4,11,17,23)
    cfg.MODEL.DINOV2.OUT_INDICES = []
    cfg.MODEL.DINOV2.GRAD_CHECKPOINT = False  # recompute every block in backward (activation memory of one block)
    cfg.MODEL.DINOV2.FREEZE = False  # no gradient for the encoder (UniMatch V2's lock_backbone)
    declare(cfg, "MODEL.DINOV2.DROP_PATH_RATE", 0.0, UNIT_OPEN)  # stochastic depth while fine-tuning (UniMatch V2: 0)
    # Position-embedding resampling to the input grid as the official code: bicubic, scale (grid + offset) / 37.
    # Official hub: 0.1 / no antialias for the plain models (UniMatch V2), 0.0 / antialias for the _reg4 ones.
    declare(cfg, "MODEL.DINOV2.INTERPOLATE_OFFSET", 0.1, NON_NEGATIVE)
    cfg.MODEL.DINOV2.INTERPOLATE_ANTIALIAS = False
    # Download timm's copy of the official weights (vit_*_patch14[_reg4]_dinov2.lvd142m; needs internet). Without
    # internet, point MODEL.WEIGHTS at the official dinov2_vit*14[_reg4]_pretrain.pth (converted on load).
    cfg.MODEL.DINOV2.TIMM_PRETRAINED = False
    # Architecture overrides for tests and experiments; 0 = the size's own (S: 384/12/6, B: 768/12/12, L: 1024/24/16)
    declare(cfg, "MODEL.DINOV2.EMBED_DIM", 0, NON_NEGATIVE)
    declare(cfg, "MODEL.DINOV2.DEPTH", 0, NON_NEGATIVE)
    declare(cfg, "MODEL.DINOV2.NUM_HEADS", 0, NON_NEGATIVE)

    # "DeepLabV3PlusFeatHead" (detectron2 / Alonso shape), "U2PLDeepLabV3PlusHead" (U2PL / DGCL / DDFP decoder),
    # "DeepLabV2Head", or "DPTHead" (ViT encoders)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3PlusFeatHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res5"]  # low-level + ASPP input (v2 uses only the last)
    declare(cfg, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 19, AT_LEAST_1)
    declare(cfg, "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", 255, Range(0, 255))
    declare(cfg, "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS", [6, 12, 18], AT_LEAST_1)  # v3+: 3 atrous branches + image pooling
    # DeepLabv2: 4 branches, outputs summed
    declare(cfg, "MODEL.SEM_SEG_HEAD.V2_DILATIONS", [6, 12, 18, 24], AT_LEAST_1)
    declare(cfg, "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 256, AT_LEAST_1)
    # after the ASPP (U2PL head: Dropout2d after its 3x3 "head" conv)
    declare(cfg, "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT", 0.1, UNIT_OPEN)
    declare(cfg, "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [48], AT_LEAST_1)  # low-level projection width (res2 -> 48)
    # decoder width = dimension of the feature the methods use
    declare(cfg, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 256, AT_LEAST_1)
    # dropout before the 1x1 classifier (U2PL head: after each 3x3 decoder block)
    declare(cfg, "MODEL.SEM_SEG_HEAD.DECODER_DROPOUT", 0.1, UNIT_OPEN)
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    # Loss on labeled pixels: "cross_entropy" or "ohem" (online hard example mining).
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    declare(cfg, "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT", 1.0, NON_NEGATIVE)
    # keep pixels whose GT-class probability is below this ...
    declare(cfg, "MODEL.SEM_SEG_HEAD.OHEM_THRESH", 0.7, UNIT)
    # ... but at least this many pixels per batch
    declare(cfg, "MODEL.SEM_SEG_HEAD.OHEM_MIN_KEPT", 100000, NON_NEGATIVE)
    # Auxiliary FCN head on res4 (PSPNet/DGCL style); 0 disables it (and it is not built).
    declare(cfg, "MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT", 0.0, NON_NEGATIVE)
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = "res4"
    declare(cfg, "MODEL.SEM_SEG_HEAD.AUX_CHANNELS", 256, AT_LEAST_1)

    # ------------------------------------------------------------------ INPUT
    cfg.INPUT.FORMAT = "RGB"
    # random resize factor of the original image (train)
    declare(cfg, "INPUT.SCALE_RANGE", [0.5, 2.0], Range(0, lo_open=True, length=2, ordered=True))
    # how the factor is drawn (data/mapper.sample_scale): "uniform" U(lo, hi), or "u2pl" (U2PL/DGCL RandResize:
    # U(lo, 1) or U(1, hi) with probability 1/2 each)
    declare(cfg, "INPUT.SCALE_SAMPLING", "uniform", OneOf("uniform", "u2pl"))
    # if > 0, the long side is first resized to this before SCALE_RANGE (VOC: 0)
    declare(cfg, "INPUT.BASE_SIZE", 0, NON_NEGATIVE)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    # (h, w); images smaller than this are padded (labels with ignore); detectron2 crop types "relative*" take fractions
    declare(cfg, "INPUT.CROP.SIZE", (512, 512), Range(0, lo_open=True, length=2))
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    # DefaultPredictor and the evaluation loader both resize by MIN_SIZE_TEST / MAX_SIZE_TEST (detectron2 default
    # 800) before the model, which upsamples its prediction to the original size; 0 is the no-op: native size
    # (TEST.SLIDING_WINDOW / TEST.AUG do the rest).
    declare(cfg, "INPUT.MIN_SIZE_TEST", 0, NON_NEGATIVE)
    # Strong view of unlabeled images (UniMatch defaults): photometric only, same geometry as the weak view.
    cfg.INPUT.STRONG = CN()
    declare(cfg, "INPUT.STRONG.COLOR_JITTER_PROB", 0.8, UNIT)
    # brightness, contrast, saturation, hue
    declare(cfg, "INPUT.STRONG.COLOR_JITTER", [0.5, 0.5, 0.5, 0.25], Range(0, length=4))
    declare(cfg, "INPUT.STRONG.GRAYSCALE_PROB", 0.2, UNIT)
    declare(cfg, "INPUT.STRONG.BLUR_PROB", 0.5, UNIT)
    declare(cfg, "INPUT.STRONG.BLUR_SIGMA", [0.1, 2.0], Range(0, lo_open=True, length=2, ordered=True))

    # ------------------------------------------------------------------ DATASETS
    cfg.DATASETS.TRAIN_LABELED = ()  # semi-supervised: labeled training sets
    # One sampling weight per TRAIN_LABELED entry (e.g. GTA5 + Cityscapes subset); empty = concatenate.
    declare(cfg, "DATASETS.TRAIN_LABELED_RATIOS", [], NON_NEGATIVE)
    cfg.DATASETS.TRAIN_UNLABELED = ()  # semi-supervised: unlabeled training sets (labels never read)
    # Your own data, no code (data/datasets/register_folder.py, docs/datasets.md "Your own data"): one child per
    # dataset, registered under its key by tools/train_net.py; children take exactly these keys:
    #   IMAGE_DIR     folder of images (.jpg .jpeg .png .bmp .tif .tiff .webp; not recursive); required
    #   MASK_DIR      folder of <image stem><MASK_SUFFIX>.png class-index masks; absent/"" = unlabeled dataset
    #   CLASSES       class names, mask value i = CLASSES[i]; required
    #   IGNORE_LABEL  mask value of unannotated pixels (default 255; must be >= len(CLASSES))
    #   COLORS        one [r, g, b] per class (default: a fixed palette)
    #   MASK_SUFFIX   text between stem and ".png" in mask names (default ""; "_mask": a.jpg -> a_mask.png)
    #   LIST          split list of image stems selecting a subset, in its order (default: every image)
    #   SELECT        "all" (every image needs a mask; default), "with_mask" or "without_mask" (-> unlabeled)
    #   CHECK_MASKS   read every mask at the first DatasetCatalog.get and check values/sizes (default True)
    # Relative paths are relative to the working directory (like OUTPUT_DIR); ~ and $VARS are expanded.
    cfg.DATASETS.FOLDERS = CN(new_allowed=True)

    # ------------------------------------------------------------------ DATALOADER
    # An unlabeled image that cannot be decoded: "error" stops the run naming file and dataset; "skip" replaces it
    # by another sample of the same stream (deterministic: resume stays exact), logs each file once and counts them
    # in the metric data/unreadable (data/stream.py). Labeled and test images are never skipped.
    declare(cfg, "DATALOADER.UNREADABLE_UNLABELED", "error", OneOf("error", "skip"))
    # with "skip": stop once more than this fraction of the unlabeled images turned out unreadable (the error names them)
    declare(cfg, "DATALOADER.MAX_UNREADABLE", 0.01, UNIT)

    # ------------------------------------------------------------------ SOLVER
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    declare(cfg, "SOLVER.POLY_LR_POWER", 0.9, NON_NEGATIVE)
    # "SGD" (momentum SOLVER.MOMENTUM, DeepLab recipes) or "AdamW" (betas below; UniMatch V2: lr 5e-6, head x40,
    # weight decay 0.01 on every parameter: WEIGHT_DECAY = WEIGHT_DECAY_NORM = 0.01)
    declare(cfg, "SOLVER.OPTIMIZER", "SGD", OneOf("SGD", "AdamW"))
    declare(cfg, "SOLVER.ADAMW_BETAS", [0.9, 0.999], UNIT_OPEN)
    declare(cfg, "SOLVER.BACKBONE_LR_MULTIPLIER", 1.0, NON_NEGATIVE)  # lr of backbone params = BASE_LR * this
    # lr of every non-backbone param (heads, projectors) = BASE_LR * this
    declare(cfg, "SOLVER.HEAD_LR_MULTIPLIER", 10.0, NON_NEGATIVE)
    # global unlabeled batch (SOLVER.IMS_PER_BATCH is the labeled one)
    declare(cfg, "SOLVER.IMS_PER_BATCH_UNLABELED", 2, AT_LEAST_1)
    # SOLVER.REFERENCE_WORLD_SIZE (detectron2's): the GPU count a recipe was written for. Recipes given in epochs
    # (DGCL, DDFP) state MAX_ITER / BURN_IN_ITERS / *START_ITER at that world size W, counting an epoch as the
    # official loaders do (DistributedSampler pads the N_u unlabeled images to a multiple of W; DataLoader
    # drop_last=True over b = IMS_PER_BATCH_UNLABELED / W images per GPU; the labeled list is resampled to N_u):
    #     iterations per epoch = floor(ceil(N_u / W) / b)       (epoch_iterations(); e.g. 2975 - 372, W 8, b 2 -> 163)
    # autocast dtype when SOLVER.AMP.ENABLED ("bfloat16"/"float16")
    declare(cfg, "SOLVER.AMP.PRECISION", "bfloat16", OneOf("bfloat16", "float16"))

    # ------------------------------------------------------------------ TEST
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    declare(cfg, "TEST.SLIDING_WINDOW.SIZE", (769, 769), Range(1, length=2))  # (h, w) window
    declare(cfg, "TEST.SLIDING_WINDOW.STRIDE", (513, 513), Range(1, length=2))  # (h, w) step between windows
    declare(cfg, "TEST.SLIDING_WINDOW.BATCH_SIZE", 4, AT_LEAST_1)  # windows per forward pass (memory vs speed)
    declare(cfg, "TEST.AUG.SCALES", [1.0], POSITIVE)  # multi-scale test factors (used when TEST.AUG.ENABLED)
    cfg.TEST.AUG.FLIP = True  # add horizontal flips (used when TEST.AUG.ENABLED)
    cfg.TEST.EVAL_TEACHER = True  # semi-supervised runs: also evaluate the EMA teacher
    cfg.TEST.EVAL_STUDENT = True  # semi-supervised runs: evaluate the student

    # ------------------------------------------------------------------ SEMI
    cfg.SEMI = CN()
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label"]  # loss terms from SEMI_LOSS_REGISTRY, in order
    # supervised-only iterations; the teacher is then copied from the student
    declare(cfg, "SEMI.BURN_IN_ITERS", 0, ITERATION)
    # The network a semi-supervised model predicts with by default: DefaultPredictor / SemiSegPredictor on a trainer
    # checkpoint, tools/demo.py, tools/export_model.py and results.json's "default_network" ("teacher"/"student").
    declare(cfg, "SEMI.WEIGHTS_FOR_EXPORT", "teacher", OneOf("teacher", "student"))
    # Where the teacher outputs come from. "ema": the EMA teacher (a frozen copy, eval-mode BN, SEMI.EMA.*).
    # "student" (UniMatch V1): no copy; the student itself without gradient: its weak-view maps are the detached
    # outputs of its train-mode pass over cat(labeled, weak), the mixing partners' maps come from a no-grad
    # eval-mode pass (BN running statistics), as UniMatch's model.eval() on img_u_w_mix. No teacher exists:
    # TEST.EVAL_TEACHER and SEMI.WEIGHTS_FOR_EXPORT "teacher" are errors, SEMI.EMA.* is unused.
    declare(cfg, "SEMI.TEACHER_MODE", "ema", OneOf("ema", "student"))
    cfg.SEMI.EMA = CN()
    declare(cfg, "SEMI.EMA.MOMENTUM", 0.999, UNIT)
    # "constant": m; "warm_start": min(1 - 1/(it+1), m) (DGCL/U2PL);
    # "cosine": m -> 1 over training, m_t = 1 - (1 - m) * (cos(pi*t/T) + 1) / 2 (Alonso et al.)
    cfg.SEMI.EMA.SCHEDULE = "warm_start"
    # True: the teacher's BN running statistics are EMA-averaged with its weights (UniMatch V2), so they belong to
    # the averaged weights; False: copied from the student after every update (statistics of other weights).
    cfg.SEMI.EMA.AVERAGE_BUFFERS = True
    # Pseudo-label diagnostics (semiseg_d2/evaluation/pseudo_label_diagnostics.py): the ground truth of the unlabeled
    # frames, looked up in GT_DATASETS (e.g. ("camvid_train",)), rides along as `diagnostic_sem_seg` (never read by a
    # loss) and the accuracy / kept fraction / per-class precision and recall of the pseudo-labels over the last
    # WINDOW steps go to metrics.json ("pl_diag/*"). Measurement only: losses and gradients do not change.
    cfg.SEMI.DIAGNOSTICS = CN()
    cfg.SEMI.DIAGNOSTICS.ENABLED = False
    cfg.SEMI.DIAGNOSTICS.GT_DATASETS = ()
    declare(cfg, "SEMI.DIAGNOSTICS.WINDOW", 20, AT_LEAST_1)
    cfg.SEMI.MIX = CN()
    cfg.SEMI.MIX.TYPE = "cutmix"  # "none", "cutmix" (one box), "classmix" (half of the teacher's classes)
    declare(cfg, "SEMI.MIX.PROB", 0.5, UNIT)  # probability that a strong image is mixed
    # CutMix box area as a fraction of the crop (UniMatch)
    declare(cfg, "SEMI.MIX.CUTMIX_AREA", [0.02, 0.4], Range(0, 1, lo_open=True, length=2, ordered=True))
    # CutMix box aspect ratio range
    declare(cfg, "SEMI.MIX.CUTMIX_RATIO", [0.3, 3.3], Range(0, lo_open=True, length=2, ordered=True))
    cfg.SEMI.STUDENT_WEAK = False  # also run the student on weak views (set by terms that need it, e.g. dgcl)
    # teacher forward under SOLVER.AMP's autocast (True) or in fp32 (False: every official code; docs/benchmarks.md)
    cfg.SEMI.TEACHER_AUTOCAST = False
    # teacher forward with train-mode BN (batch statistics over cat(weak unlabeled, labeled), dropout on; running
    # statistics untouched) as the official DGCL / DDFP codes (True), or eval-mode BN (False: ours, the EMA's statistics)
    cfg.SEMI.TEACHER_TRAIN_MODE = False
    # TensorBoard images of the step, put by SemiSegmentor.forward every N iterations (0 = off), detectron2's VIS_PERIOD
    # convention (it % N == 0) under its own name: VIS_PERIOD drives GeneralizedRCNN's proposal pictures
    declare(cfg, "SEMI.VIS_PERIOD", 0, NON_NEGATIVE)
    cfg.SEMI.NONFINITE_CHECK = True  # stop on NaN/inf loss naming the iteration and the term

    # Each loss term declares its keys SEMI.<TERM>.* beside it (losses/<term>.py, add_<term>_config), in this order;
    # imported here, not at the top: the term modules import this one.
    from .losses import class_balance, ddfp, dgcl, entropy, memory_contrast, pseudo_label, supervised, unimatch, unimatch_v2  # noqa: PLC0415
    supervised.add_supervised_config(cfg)
    pseudo_label.add_pseudo_label_config(cfg)
    ddfp.add_ddfp_config(cfg)
    unimatch.add_unimatch_config(cfg)
    unimatch_v2.add_unimatch_v2_config(cfg)
    dgcl.add_dgcl_config(cfg)
    memory_contrast.add_memory_contrast_config(cfg)
    entropy.add_entropy_config(cfg)
    class_balance.add_class_balance_config(cfg)

    global _DECLARED_HERE
    _DECLARED_HERE = True
    return cfg


def epoch_iterations(num_images: int, world_size: int, images_per_gpu: int, drop_last: bool = True) -> int:
    """Iterations in one epoch of ``num_images`` as a ``DistributedSampler`` over ``world_size`` ranks (padding
    the list to a multiple of ``world_size``) with a per-GPU ``DataLoader`` of ``images_per_gpu`` counts them:
    ``floor(ceil(N / W) / b)`` with ``drop_last`` (DGCL / DDFP / U2PL semi loaders), ``ceil(ceil(N / W) / b)``
    without. The epoch schedules of configs/*/dgcl_*.yaml and ddfp_*.yaml are this times the epoch count."""
    if num_images <= 0 or world_size <= 0 or images_per_gpu <= 0:
        raise ValueError(
            f"epoch_iterations: num_images, world_size and images_per_gpu must be positive, got "
            f"{num_images}, {world_size}, {images_per_gpu}"
        )
    per_rank = -(-num_images // world_size)
    return per_rank // images_per_gpu if drop_last else -(-per_rank // images_per_gpu)


def check_semiseg_config(cfg: CN) -> None:
    """Raise a clear error when a config was not extended with add_semiseg_config(), holds a value outside its
    declared range (:func:`check_ranges`), or asks for a GPU that this machine does not have."""
    if _MARKER not in cfg:
        raise KeyError(
            "this config has no semiseg_d2 keys: call semiseg_d2.add_semiseg_config(cfg) before "
            "cfg.merge_from_file(...) (tools/train_net.py and tools/demo.py do)"
        )
    check_ranges(cfg)
    import torch

    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' (the GPU recipes' default) but no CUDA GPU is available: add "
            "`MODEL.DEVICE cpu SOLVER.AMP.ENABLED False MODEL.CHANNELS_LAST False` to run on the CPU (slowly)"
        )


def check_teacher_mode(cfg: CN) -> None:
    """``SEMI.TEACHER_MODE "student"`` has no teacher network: keys that name one are errors, not ignored."""
    if cfg.SEMI.TEACHER_MODE != "student":
        return
    if cfg.TEST.EVAL_TEACHER:
        raise ValueError("SEMI.TEACHER_MODE 'student' has no teacher network to evaluate: set TEST.EVAL_TEACHER False")
    if cfg.SEMI.WEIGHTS_FOR_EXPORT == "teacher":
        raise ValueError(
            "SEMI.TEACHER_MODE 'student' has no teacher network to export: set SEMI.WEIGHTS_FOR_EXPORT 'student'"
        )


def get_semiseg_cfg() -> CN:
    """A detectron2 default config extended with semiseg_d2's keys."""
    from detectron2.config import get_cfg

    return add_semiseg_config(get_cfg())
