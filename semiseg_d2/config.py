"""Every config key semiseg_d2 adds to Detectron2's defaults, with its default and why it exists.

Nothing in the package reads a key that is not declared here. Sections:
  MODEL.*            backbone/head/segmentor options (on top of detectron2.projects.deeplab's keys)
  INPUT.*            train-time geometry and the strong (photometric) augmentation of unlabeled views
  DATASETS.*         labeled / unlabeled training sets, several labeled sources with ratios
  SOLVER.*           LR multipliers, bf16 autocast, unlabeled batch size
  TEST.*             sliding-window and multi-scale/flip inference, evaluating student and teacher
  SEMI.*             the semi-supervised engine: loss terms, EMA teacher, burn-in, mixing
  SEMI.<TERM>.*      one sub-node per loss term (weight + its own options)
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

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
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # segmentation fine-tunes every stage (detectron2 default 2 freezes stem+res2)
    cfg.MODEL.RESNETS.DEPTH = 101
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res4", "res5"]  # res2: low-level, res4: aux head, res5: ASPP
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 128  # DeepLab deep stem 3x(3x3): 64-64-128
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision/DeepLab ResNet put stride in the 3x3 conv
    cfg.MODEL.RESNETS.NORM = "BN"  # "BN" or "SyncBN" (SyncBN needs a process group; BN on CPU)
    # Output stride of the backbone: 8 (res4 dilation 2, res5 dilation 4) or 16 (res5 dilation 2).
    # Sets RESNETS.RES4_DILATION / RES5_DILATION when the model is built (see modeling/backbone).
    cfg.MODEL.RESNETS.OUTPUT_STRIDE = 16
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

    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3PlusFeatHead"  # or "DeepLabV2Head"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res5"]  # low-level + ASPP input (v2 uses only the last)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [6, 12, 18]  # v3+: 3 atrous branches + image pooling
    cfg.MODEL.SEM_SEG_HEAD.V2_DILATIONS = [6, 12, 18, 24]  # DeepLabv2: 4 branches, outputs summed
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.1
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [48]  # low-level projection width (res2 -> 48)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256  # decoder width = dimension of the feature the methods use
    cfg.MODEL.SEM_SEG_HEAD.DECODER_DROPOUT = 0.1  # dropout before the final 1x1 classifier
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    # Loss on labeled pixels: "cross_entropy" or "ohem" (online hard example mining).
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "cross_entropy"
    cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 1.0
    cfg.MODEL.SEM_SEG_HEAD.OHEM_THRESH = 0.7  # keep pixels whose GT-class probability is below this ...
    cfg.MODEL.SEM_SEG_HEAD.OHEM_MIN_KEPT = 100000  # ... but at least this many pixels per batch
    # Auxiliary FCN head on res4 (PSPNet/DGCL style); 0 disables it (and it is not built).
    cfg.MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT = 0.0
    cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = "res4"
    cfg.MODEL.SEM_SEG_HEAD.AUX_CHANNELS = 256

    # ------------------------------------------------------------------ INPUT
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.SCALE_RANGE = [0.5, 2.0]  # random resize factor of the original image (train)
    cfg.INPUT.BASE_SIZE = 0  # if > 0, the long side is first resized to this before SCALE_RANGE (VOC: 0)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (512, 512)  # (h, w); images smaller than this are padded (labels with ignore)
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    # DefaultPredictor resizes by MIN_SIZE_TEST (detectron2 default 800) before the model; 0 is its no-op, so
    # predictions are made at the native size like the evaluation loader (TEST.SLIDING_WINDOW / TEST.AUG do the rest).
    cfg.INPUT.MIN_SIZE_TEST = 0
    # Strong view of unlabeled images (UniMatch defaults): photometric only, same geometry as the weak view.
    cfg.INPUT.STRONG = CN()
    cfg.INPUT.STRONG.COLOR_JITTER_PROB = 0.8
    cfg.INPUT.STRONG.COLOR_JITTER = [0.5, 0.5, 0.5, 0.25]  # brightness, contrast, saturation, hue
    cfg.INPUT.STRONG.GRAYSCALE_PROB = 0.2
    cfg.INPUT.STRONG.BLUR_PROB = 0.5
    cfg.INPUT.STRONG.BLUR_SIGMA = [0.1, 2.0]

    # ------------------------------------------------------------------ DATASETS
    cfg.DATASETS.TRAIN_LABELED = ()  # semi-supervised: labeled training sets
    # One sampling weight per TRAIN_LABELED entry (e.g. GTA5 + Cityscapes subset); empty = concatenate.
    cfg.DATASETS.TRAIN_LABELED_RATIOS = []
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

    # ------------------------------------------------------------------ SOLVER
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.BACKBONE_LR_MULTIPLIER = 1.0  # lr of backbone params = BASE_LR * this
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 10.0  # lr of every non-backbone param (heads, projectors) = BASE_LR * this
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 2  # global unlabeled batch (SOLVER.IMS_PER_BATCH is the labeled one)
    cfg.SOLVER.AMP.PRECISION = "bfloat16"  # autocast dtype when SOLVER.AMP.ENABLED ("bfloat16"/"float16")

    # ------------------------------------------------------------------ TEST
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.SIZE = (769, 769)  # (h, w) window
    cfg.TEST.SLIDING_WINDOW.STRIDE = (513, 513)  # (h, w) step between windows
    cfg.TEST.SLIDING_WINDOW.BATCH_SIZE = 4  # windows per forward pass (memory vs speed)
    cfg.TEST.AUG.SCALES = [1.0]  # multi-scale test factors (used when TEST.AUG.ENABLED)
    cfg.TEST.AUG.FLIP = True  # add horizontal flips (used when TEST.AUG.ENABLED)
    cfg.TEST.EVAL_TEACHER = True  # semi-supervised runs: also evaluate the EMA teacher
    cfg.TEST.EVAL_STUDENT = True  # semi-supervised runs: evaluate the student

    # ------------------------------------------------------------------ SEMI
    cfg.SEMI = CN()
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label"]  # loss terms from SEMI_LOSS_REGISTRY, in order
    cfg.SEMI.BURN_IN_ITERS = 0  # supervised-only iterations; the teacher is then copied from the student
    # The network a semi-supervised model predicts with by default: DefaultPredictor / SemiSegPredictor on a trainer
    # checkpoint, tools/demo.py, tools/export_model.py and results.json's "default_network" ("teacher"/"student").
    cfg.SEMI.WEIGHTS_FOR_EXPORT = "teacher"
    cfg.SEMI.EMA = CN()
    cfg.SEMI.EMA.MOMENTUM = 0.999
    # "constant": m; "warm_start": min(1 - 1/(it+1), m) (DGCL/U2PL);
    # "cosine": m -> 1 over training, m_t = 1 - (1 - m) * (cos(pi*t/T) + 1) / 2 (Alonso et al.)
    cfg.SEMI.EMA.SCHEDULE = "warm_start"
    cfg.SEMI.MIX = CN()
    cfg.SEMI.MIX.TYPE = "cutmix"  # "none", "cutmix" (one box), "classmix" (half of the teacher's classes)
    cfg.SEMI.MIX.PROB = 0.5  # probability that a strong image is mixed
    cfg.SEMI.MIX.CUTMIX_AREA = [0.02, 0.4]  # CutMix box area as a fraction of the crop (UniMatch)
    cfg.SEMI.MIX.CUTMIX_RATIO = [0.3, 3.3]  # CutMix box aspect ratio range
    cfg.SEMI.STUDENT_WEAK = False  # also run the student on weak views (set by terms that need it, e.g. dgcl)
    cfg.SEMI.TEACHER_AUTOCAST = True  # teacher forward under autocast when SOLVER.AMP.ENABLED
    cfg.SEMI.VIS_PERIOD = 0  # TensorBoard images every N iterations (0 = off)
    cfg.SEMI.NONFINITE_CHECK = True  # stop on NaN/inf loss naming the iteration and the term

    # supervised term: CE/OHEM on labeled pixels (+ aux head), as in MODEL.SEM_SEG_HEAD.LOSS_*
    cfg.SEMI.SUPERVISED = CN()
    cfg.SEMI.SUPERVISED.WEIGHT = 1.0

    # pseudo_label term: CE of the student on strong (mixed) views against the teacher's pseudo-labels
    cfg.SEMI.PSEUDO_LABEL = CN()
    cfg.SEMI.PSEUDO_LABEL.WEIGHT = 1.0
    # "none", "threshold" (keep confidence >= THRESHOLD, FixMatch/UniMatch) or
    # "entropy" (drop the DROP_PERCENT * (1 - t) % highest-entropy pixels, U2PL/DGCL; t = progress of the
    # semi-supervised phase, 0 at the end of BURN_IN_ITERS)
    cfg.SEMI.PSEUDO_LABEL.FILTER = "threshold"
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.95
    cfg.SEMI.PSEUDO_LABEL.DROP_PERCENT = 20.0
    cfg.SEMI.PSEUDO_LABEL.CONF_POWER = 0.0  # s > 0: weight each pixel by p^s (Alonso et al., s = 6)
    # Loss normalisation: "all" divides by every valid unlabeled pixel (UniMatch), "kept" by kept ones,
    # "u2pl" = mean over kept x (B*H*W / kept), what U2PL/DGCL's code computes (docs/methods/dgcl.md).
    cfg.SEMI.PSEUDO_LABEL.NORMALIZE = "all"
    cfg.SEMI.PSEUDO_LABEL.RAMPUP = "none"  # "none", "sigmoid" (exp(-5(1-t)^2)) or "linear"
    cfg.SEMI.PSEUDO_LABEL.RAMPUP_ITERS = 0  # ramp length after burn-in
    cfg.SEMI.PSEUDO_LABEL.START_ITER = 0  # term is zero before this iteration (Alonso: 2000)

    # ddfp term (Wang et al., CVPR 2024): CE of the student's decoder on density-descending perturbed
    # decoder inputs of the strong (mixed) views; a normalizing flow (layers/flow.py) trained online on teacher features
    cfg.SEMI.DDFP = CN()
    cfg.SEMI.DDFP.WEIGHT = 0.5  # lambda_p of the perturbed-feature CE
    cfg.SEMI.DDFP.THRESHOLD = 0.95  # teacher confidence to keep a pixel (loss and perturbation mask)
    cfg.SEMI.DDFP.NORMALIZE = "kept"  # CE normalisation as SEMI.PSEUDO_LABEL.NORMALIZE (reference: "kept")
    cfg.SEMI.DDFP.EPS = 4.0  # L2 norm of the perturbation of each pixel's decoder input
    cfg.SEMI.DDFP.PERTURBED_BN = True  # separate BN set for the perturbed decoder pass (reference MixSyncBN)
    cfg.SEMI.DDFP.START_ITER = 0  # no perturbation loss before this iteration (reference: burn-in + 1 epoch)
    cfg.SEMI.DDFP.FLOW_START_ITER = 0  # the flow trains from this iteration on (reference: end of burn-in)
    cfg.SEMI.DDFP.FLOW_BLOCKS = 2  # GLOW coupling blocks
    cfg.SEMI.DDFP.FLOW_HIDDEN = [256, 256]  # hidden widths of every coupling subnet
    cfg.SEMI.DDFP.FLOW_CLAMP = 2.0  # soft clamp of the coupling log-scales
    cfg.SEMI.DDFP.FLOW_SEED = 0  # seeds the flow's permutations and initialisation (identical on every rank)
    cfg.SEMI.DDFP.FLOW_LR = 1e-3  # Adam learning rate of the flow (own optimizer, not SOLVER.*)
    cfg.SEMI.DDFP.FLOW_BETAS = [0.5, 0.9]  # Adam betas of the flow
    cfg.SEMI.DDFP.FLOW_LR_END_FACTOR = 0.01  # flow lr decays geometrically to FLOW_LR * this at MAX_ITER
    cfg.SEMI.DDFP.FLOW_GRAD_CLIP = 50.0  # max global grad norm of a flow step (0 = off)
    cfg.SEMI.DDFP.FLOW_SAMPLES = 20480  # teacher pixel features per flow step (per rank)
    cfg.SEMI.DDFP.FLOW_NOISE = 0.05  # std of the Gaussian noise added to those features
    # unlabeled pixels in the flow's NLL: "mixture" (every valid pixel, marginal density; reference code) or
    # "pseudo_label" (confident pixels, class-conditional on the teacher's pseudo-label, THRESHOLD)
    cfg.SEMI.DDFP.FLOW_UNLABELED_TARGET = "mixture"

    # dgcl term (losses/dgcl.py, docs/methods/dgcl.md): density-guided contrastive loss + class-wise memory bank
    cfg.SEMI.DGCL = CN()
    cfg.SEMI.DGCL.WEIGHT = 0.5  # lambda_c of L = L_sup + lambda_u L_u + lambda_c L_dgcl (paper/reference: 0.5)
    cfg.SEMI.DGCL.TEMPERATURE = 0.5  # InfoNCE temperature
    cfg.SEMI.DGCL.PROJ_DIM = 256  # projection MLP width (Linear-BN-ReLU-Linear on the head's "features")
    cfg.SEMI.DGCL.NUM_ANCHORS = 200  # lowest-density pixels per class used as anchors
    cfg.SEMI.DGCL.NUM_POSITIVES = 50  # highest-density keys per class, taken from the batch AND from the bank
    cfg.SEMI.DGCL.NUM_NEGATIVES = 512  # random pixels of other classes per class
    cfg.SEMI.DGCL.MAX_PIXELS_PER_CLASS = 10000  # random subset of a class's batch pixels whose density is computed
    cfg.SEMI.DGCL.MEMORY_SIZE = 10000  # bank entries per class (FIFO)
    cfg.SEMI.DGCL.UPDATE_PER_CLASS = 1000  # at most this many new bank entries per class per step (all ranks together)
    cfg.SEMI.DGCL.MIN_FILL = 10000  # a class contributes once its bank holds this many entries (ref: all classes full)
    cfg.SEMI.DGCL.DENSITY_KS = [8, 16, 32]  # kNN sizes of the multi-scale density
    # contrastive labels / bank entries drop the max(DROP_PERCENT * (1 - progress), MIN_DROP_PERCENT) % highest-
    # entropy pseudo-labelled pixels; progress counts from the end of SEMI.BURN_IN_ITERS
    cfg.SEMI.DGCL.DROP_PERCENT = 80.0
    cfg.SEMI.DGCL.MIN_DROP_PERCENT = 10.0
    cfg.SEMI.DGCL.SKIP_CLASSES = []  # classes that never get anchors (ref: [0] on every dataset; VOC background)
    cfg.SEMI.DGCL.BANK_SOURCE = "student"  # bank features from the "student" (ref) or the "teacher" (weak views)
    cfg.SEMI.DGCL.DENSITY_MAX_ELEMENTS = 134217728  # similarities materialised at once in the kNN density (memory)

    # memory_contrast term (losses/memory_contrast.py, docs/methods/memory_contrast.md): Alonso et al. ICCV 2021
    cfg.SEMI.MEMORY_CONTRAST = CN()
    cfg.SEMI.MEMORY_CONTRAST.WEIGHT = 0.1  # lambda_contr, applied to the labeled and to the unlabeled part each
    cfg.SEMI.MEMORY_CONTRAST.START_ITER = 2000  # loss is zero before this iteration (paper: 2K)
    cfg.SEMI.MEMORY_CONTRAST.BANK_START_ITER = 0  # bank filled from this iteration on (paper: every iteration; code: 1000)
    cfg.SEMI.MEMORY_CONTRAST.FEATURE_DIM = 0  # D of the head's "features" (v2: 2048, v3+: 256); 0 = implied by the head
    cfg.SEMI.MEMORY_CONTRAST.PROJECTION_DIM = 256  # output of the projection g and prediction q heads (= bank width)
    cfg.SEMI.MEMORY_CONTRAST.HIDDEN_DIM = 256  # hidden width of g and q (Linear-BN-ReLU-Linear)
    cfg.SEMI.MEMORY_CONTRAST.SELECTOR_HIDDEN_DIM = 256  # hidden width of the class attention selectors S_c
    cfg.SEMI.MEMORY_CONTRAST.BANK_SIZE = 256  # psi: entries per class (FIFO)
    cfg.SEMI.MEMORY_CONTRAST.CONFIDENCE_THRESHOLD = 0.95  # phi of the feature quality filter (teacher right and > phi)
    cfg.SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE = 0  # K entries per image and class; 0 = max(1, round(BANK_SIZE / |X_l|))
    cfg.SEMI.MEMORY_CONTRAST.NUM_LABELED = 0  # |X_l| for K; 0 = count the images of BANK_DATASETS (or TRAIN_LABELED)
    # DATASETS.TRAIN_LABELED entries whose images fill the bank (SSDA: the Cityscapes subset, not GTA5); empty = all
    cfg.SEMI.MEMORY_CONTRAST.BANK_DATASETS = []

    # entropy term (losses/memory_contrast.py): direct entropy minimisation on the strong unlabeled views (Alonso Eq. 7)
    cfg.SEMI.ENTROPY = CN()
    cfg.SEMI.ENTROPY.WEIGHT = 0.01  # lambda_ent
    cfg.SEMI.ENTROPY.START_ITER = 0  # zero before this iteration (paper: from the start)
    cfg.SEMI.ENTROPY.NORMALIZE = False  # divide by log(C) (the reference code divides by log2(C)); paper: no

    # class_balance term (losses/class_balance.py): CE class weights alpha_c = sqrt(f_median / f_c) for the terms
    # listed after it (supervised, pseudo_label) from labels + pseudo-labels (Alonso: Cityscapes/GTA5 on, VOC off)
    cfg.SEMI.CLASS_BALANCE = CN()
    cfg.SEMI.CLASS_BALANCE.MOMENTUM = 0.999  # EMA of the per-step class pixel counts
    cfg.SEMI.CLASS_BALANCE.FROM_PSEUDO_LABELS = True  # also count the teacher's pseudo-labels (paper: yes)
    cfg.SEMI.CLASS_BALANCE.START_ITER = 0  # weights are 1 before this iteration (counting starts at once)
    return cfg


def check_semiseg_config(cfg: CN) -> None:
    """Raise a clear error when a config was not extended with add_semiseg_config(), or asks for a GPU that
    this machine does not have."""
    if _MARKER not in cfg:
        raise KeyError(
            "this config has no semiseg_d2 keys: call semiseg_d2.add_semiseg_config(cfg) before "
            "cfg.merge_from_file(...) (tools/train_net.py and tools/demo.py do)"
        )
    import torch

    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' (the GPU recipes' default) but no CUDA GPU is available: add "
            "`MODEL.DEVICE cpu SOLVER.AMP.ENABLED False MODEL.CHANNELS_LAST False` to run on the CPU (slowly)"
        )


def get_semiseg_cfg() -> CN:
    """A detectron2 default config extended with semiseg_d2's keys."""
    from detectron2.config import get_cfg

    return add_semiseg_config(get_cfg())
