"""Extending semiseg_d2 from outside the package (docs/architecture.md, "Add a method" / "Add an encoder"): a loss
term and a backbone defined in this module, registered in SEMI_LOSS_REGISTRY / detectron2's BACKBONE_REGISTRY, the
term's keys declared by its own ``add_ext_toy_config``, each trained one step by the real SemiSegTrainer on the
bundled CamVid frames. No package file knows about them."""
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from semiseg_d2.config import ITERATION, NON_NEGATIVE, declare, schedule_keys
from semiseg_d2.engine.trainer import SemiSegTrainer
from semiseg_d2.layers.distributed import unwrap_model
from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY, SemiLossTerm
from tests.tiny import apply_overrides, tiny_cfg

TERM = "ext_toy"  # registries are global: names no package module uses
BACKBONE = "ExtToyBackbone"
TOY_CHANNELS = 24  # the toy backbone's output width (the tiny ResNet's res5 has 256)


def add_ext_toy_config(cfg):
    """Declare ``SEMI.EXT_TOY`` (the term's node: its name upper-cased), as a term module of the package does."""
    cfg.SEMI.EXT_TOY = CN()
    declare(cfg, "SEMI.EXT_TOY.WEIGHT", 1.0, NON_NEGATIVE)  # loss weight
    declare(cfg, "SEMI.EXT_TOY.START_ITER", 0, ITERATION)  # first iteration with the loss: a schedule key


class ExtToyTerm(SemiLossTerm):
    """``ext_toy``: the mean squared student feature on the strong views, through a projection whose width comes
    from the head's spec (so a wrong ``spec.feature_dim`` fails at the matmul)."""

    name = TERM

    @configurable
    def __init__(self, *, weight: float, start_iter: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.weight, self.start_iter = weight, start_iter
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.register_buffer("projection", torch.ones(feature_dim, 4) / feature_dim)
        self.updates = []  # the iteration of each update() call

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.EXT_TOY
        return {"weight": c.WEIGHT, "start_iter": c.START_ITER, "feature_dim": spec.feature_dim,
                "num_classes": spec.num_classes}

    def forward(self, step):
        if step.iteration < self.start_iter:
            return {}
        features = step.student_strong["features"].float()  # [Bu, D, h, w]
        projected = torch.einsum("bdhw,dk->bkhw", features, self.projection)
        return {"loss_ext_toy": self.weight * projected.pow(2).mean()}

    def update(self, step):
        self.updates.append(step.iteration)


class ExtToyBackbone(Backbone):
    """One strided conv: ``res5 [B, TOY_CHANNELS, H/8, W/8]``, built as detectron2 builds any backbone."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        self.conv = torch.nn.Conv2d(input_shape.channels, TOY_CHANNELS, 3, stride=8, padding=1)

    def forward(self, x):
        return {"res5": F.relu(self.conv(x))}

    def output_shape(self):
        return {"res5": ShapeSpec(channels=TOY_CHANNELS, stride=8)}


# Registries are global: a second import of this module in the same process registers nothing twice, and the names
# below are the registered classes (what the trainer builds).
if TERM not in SEMI_LOSS_REGISTRY:
    SEMI_LOSS_REGISTRY.register_term(ExtToyTerm)
if BACKBONE not in BACKBONE_REGISTRY:
    BACKBONE_REGISTRY.register(ExtToyBackbone)
ExtToyTerm, ExtToyBackbone = SEMI_LOSS_REGISTRY.get(TERM), BACKBONE_REGISTRY.get(BACKBONE)


def toy_cfg(out_dir, **overrides):
    """The semi-supervised CamVid config of the other trainer tests, the toy term's keys added on top."""
    cfg = tiny_cfg(crop=(64, 96))
    add_ext_toy_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.DATASETS.TRAIN_LABELED = ("camvid_mini_train_5_labeled",)
    cfg.DATASETS.TRAIN_UNLABELED = ("camvid_mini_train_5_unlabeled",)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.SCALE_RANGE = [0.2, 0.3]
    cfg.SOLVER.MAX_ITER = 1
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SEMI.LOSSES = ["supervised", TERM]
    cfg.SEMI.MIX.PROB = 1.0
    cfg.SEED = 3
    cfg.OUTPUT_DIR = str(out_dir)
    return apply_overrides(cfg, overrides)


def train_one_step(cfg):
    """(initial student state, the trained model, the trainer) after one SemiSegTrainer step."""
    torch.manual_seed(cfg.SEED)  # what default_setup does before the trainer builds the model
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    model = unwrap_model(trainer.model)
    initial = {k: v.detach().clone() for k, v in model.student.state_dict().items()}
    trainer.train()
    return initial, model, trainer


def test_a_term_from_outside_the_package_trains_the_student(tmp_path):
    cfg = toy_cfg(tmp_path / "on")
    assert "SEMI.EXT_TOY.START_ITER" in schedule_keys(cfg)  # its ITERATION key scales with the schedule
    assert "SEMI.EXT_TOY.START_ITER" not in schedule_keys(apply_overrides(cfg.clone(), {"SEMI.LOSSES": ["supervised"]}))

    initial, model, trainer = train_one_step(cfg)
    term = model.terms[TERM]
    head = model.student.sem_seg_head
    assert (term.feature_dim, term.num_classes) == (head.feature_dim, head.num_classes) == (32, 11)  # the head's spec
    assert "loss_ext_toy" in trainer.storage.histories()
    assert model.loss_owner["loss_ext_toy"] == TERM
    assert term.updates == [0]  # after_optimizer_step ran the term's update once, for step 0

    _, model_off, trainer_off = train_one_step(toy_cfg(tmp_path / "off", **{"SEMI.EXT_TOY.WEIGHT": 0.0}))
    assert "loss_ext_toy" in trainer_off.storage.histories()
    on, off = model.student.state_dict(), model_off.student.state_dict()
    moved_by_term = [k for k in on if k.endswith("weight") and not torch.equal(on[k], off[k])]
    # same seed, same batches: only the term's gradient separates the two students
    assert any(k.startswith("backbone.") for k in moved_by_term), moved_by_term
    assert any(k.startswith("sem_seg_head.") for k in moved_by_term), moved_by_term
    assert any(not torch.equal(initial[k], off[k]) for k in off)  # the supervised loss trained both


def test_a_backbone_from_outside_the_package_drives_the_head_and_trains(tmp_path):
    cfg = toy_cfg(tmp_path, **{"MODEL.BACKBONE.NAME": BACKBONE, "MODEL.SEM_SEG_HEAD.NAME": "DeepLabV2Head",
                               "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res5"]})
    initial, model, trainer = train_one_step(cfg)
    student = model.student
    assert isinstance(student.backbone, ExtToyBackbone)
    head = student.sem_seg_head
    assert {conv.in_channels for conv in head.branches} == {TOY_CHANNELS}  # the head was built from output_shape()
    assert head.spec().feature_dim == TOY_CHANNELS == model.terms[TERM].feature_dim
    assert "loss_sem_seg" in trainer.storage.histories() and "loss_ext_toy" in trainer.storage.histories()
    trained = student.state_dict()
    for key in ("backbone.conv.weight", "backbone.conv.bias"):
        assert not torch.equal(initial[key], trained[key]), key
