"""Engine pieces without a model: loss-term registry, EMA hook schedule, checkpoint safety."""
import os

import pytest
import torch
from detectron2.config import CfgNode

from semiseg_d2.config import get_semiseg_cfg
from semiseg_d2.engine.checkpoint import atomic_torch_save, config_differences
from semiseg_d2.engine.hooks import EMAHook
from semiseg_d2.losses.registry import build_loss_terms
from semiseg_d2.modeling.heads.spec import HeadSpec
from tests.tiny import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = HeadSpec("TestHead", num_classes=19, feature_dim=8)


def test_registry_error_names_unknown_term_and_lists_known():
    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "dgc"]
    with pytest.raises(KeyError) as e:
        build_loss_terms(cfg, SPEC)
    msg = str(e.value)
    assert "'dgc'" in msg and "pseudo_label" in msg and "supervised" in msg


def test_registry_rejects_duplicates_and_empty():
    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "supervised"]
    with pytest.raises(ValueError, match="twice"):
        build_loss_terms(cfg, SPEC)
    cfg.SEMI.LOSSES = []
    with pytest.raises(ValueError, match="empty"):
        build_loss_terms(cfg, SPEC)


def test_ema_hook_schedule_counts_from_end_of_burn_in():
    hook = EMAHook(0.99, "warm_start", burn_in_iters=10, max_iter=110)
    assert hook.momentum_at(5) is None  # burn-in: teacher untouched
    assert hook.momentum_at(9) == 0.0  # last burn-in step: copy
    assert hook.momentum_at(10) == 0.0  # first semi step: min(1 - 1/1, m)
    assert hook.momentum_at(11) == pytest.approx(0.5)
    assert hook.momentum_at(10 + 999) == pytest.approx(0.99)
    cos = EMAHook(0.995, "cosine", burn_in_iters=0, max_iter=100)
    assert cos.momentum_at(0) == pytest.approx(0.995)
    assert cos.momentum_at(50) == pytest.approx(1 - 0.005 * 0.5)
    assert cos.momentum_at(100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown"):
        EMAHook(0.9, "linear", 0, 10)


def _bn_pair():
    """(teacher, student) one-BN networks whose weights and running statistics differ."""
    teacher, student = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        teacher.running_mean.fill_(1.0)
        teacher.running_var.fill_(4.0)
        teacher.weight.fill_(2.0)
        student.running_mean.fill_(3.0)
        student.running_var.fill_(8.0)
        student.num_batches_tracked.fill_(7)
    return teacher, student


def _run_ema_hook(hook, teacher, student, iteration):
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from semiseg_d2.layers.ema import EMAPair

    model = SimpleNamespace(ema_pairs=lambda: [EMAPair(teacher, student)])
    with EventStorage(iteration) as storage:
        hook.trainer = SimpleNamespace(iter=iteration, model=model, storage=storage)
        hook.after_step()


def test_ema_hook_averages_bn_statistics_with_the_weights_by_default_or_copies_them():
    cfg = get_semiseg_cfg()
    cfg.SEMI.EMA.MOMENTUM, cfg.SEMI.EMA.SCHEDULE, cfg.SEMI.BURN_IN_ITERS = 0.75, "constant", 0
    assert cfg.SEMI.EMA.AVERAGE_BUFFERS is True
    teacher, student = _bn_pair()
    _run_ema_hook(EMAHook.from_config(cfg), teacher, student, iteration=5)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.75 * 2.0 + 0.25 * 1.0))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.allclose(teacher.running_var, torch.full((3,), 0.75 * 4.0 + 0.25 * 8.0))
    assert int(teacher.num_batches_tracked) == 7  # integer buffer: copied

    cfg.SEMI.EMA.AVERAGE_BUFFERS = False
    teacher, student = _bn_pair()
    _run_ema_hook(EMAHook.from_config(cfg), teacher, student, iteration=5)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.75 * 2.0 + 0.25 * 1.0))
    assert torch.equal(teacher.running_mean, student.running_mean)
    assert torch.equal(teacher.running_var, student.running_var)


def test_config_differences_lists_keys_and_ignores_free_ones():
    a = get_semiseg_cfg()
    b = a.clone()
    b.OUTPUT_DIR = "elsewhere"
    b.TEST.EVAL_PERIOD = 7
    assert config_differences(a, b) == []
    b.SOLVER.BASE_LR = 0.5
    b.SEMI.LOSSES = ["supervised"]
    diffs = config_differences(a, b)
    assert len(diffs) == 2
    assert any(d.startswith("SOLVER.BASE_LR:") and "0.5" in d for d in diffs)
    assert any(d.startswith("SEMI.LOSSES:") for d in diffs)
    # A dumped-and-reloaded config compares equal to the original.
    assert config_differences(CfgNode.load_cfg(a.dump()), a) == []


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def test_atomic_save_never_corrupts_the_previous_file(tmp_path):
    path = str(tmp_path / "model.pth")
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"w": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pth"]  # no temporary file left behind


def test_reference_world_size_scales_both_batches_lr_and_semi_iterations():
    from semiseg_d2.engine.trainer import SegTrainer

    cfg = get_semiseg_cfg()
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 4
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 16
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = 1000
    cfg.SEMI.BURN_IN_ITERS = 100
    cfg.SEMI.PSEUDO_LABEL.START_ITER = 40
    cfg.freeze()
    one = SegTrainer.auto_scale_workers(cfg, 1)
    assert (one.SOLVER.IMS_PER_BATCH, one.SOLVER.IMS_PER_BATCH_UNLABELED) == (4, 4)
    assert one.SOLVER.BASE_LR == pytest.approx(0.0025)
    assert one.SOLVER.MAX_ITER == 4000
    assert one.SEMI.BURN_IN_ITERS == 400 and one.SEMI.PSEUDO_LABEL.START_ITER == 160
    assert one.is_frozen()
    same = SegTrainer.auto_scale_workers(cfg, 4)
    assert same.SOLVER.BASE_LR == 0.01 and same.SEMI.BURN_IN_ITERS == 100


def test_schedule_keys_are_the_declared_iteration_counts_and_both_scalings_use_them(monkeypatch):
    """A term declares its iteration counts with ITERATION (whatever their names); SOLVER.REFERENCE_WORLD_SIZE and
    tools/run_study.py --schedule-scale rescale exactly those (and keys of terms that do not run are left alone)."""
    import importlib.util

    from detectron2.config import CfgNode as CN

    from semiseg_d2 import config
    from semiseg_d2.engine.trainer import SegTrainer

    monkeypatch.setattr(config, "SCHEMA", dict(config.SCHEMA))  # the toy term's keys stay in this test
    cfg = get_semiseg_cfg()
    cfg.SEMI.TOY_SCHEDULE = CN()  # a term from outside the package: its config function
    config.declare(cfg, "SEMI.TOY_SCHEDULE.RAMP_LENGTH", 40, config.ITERATION)  # no *_ITER suffix
    config.declare(cfg, "SEMI.TOY_SCHEDULE.QUEUE_ITER", 7, config.AT_LEAST_1)  # *_ITER, but not an iteration count
    cfg.SOLVER.MAX_ITER = 1000
    cfg.SEMI.BURN_IN_ITERS = 100
    cfg.SEMI.PSEUDO_LABEL.START_ITER = 40
    cfg.SEMI.DDFP.START_ITER = 30  # ddfp is not in SEMI.LOSSES
    keys = config.schedule_keys(cfg)
    assert {"SEMI.BURN_IN_ITERS", "SEMI.PSEUDO_LABEL.START_ITER", "SEMI.PSEUDO_LABEL.RAMPUP_ITERS",
            "SEMI.TOY_SCHEDULE.RAMP_LENGTH"} <= set(keys)
    assert not [k for k in keys if k.startswith(("SEMI.DDFP.", "SEMI.DGCL.")) or k == "SEMI.TOY_SCHEDULE.QUEUE_ITER"]
    assert "SEMI.DDFP.START_ITER" in config.schedule_keys(apply_overrides(cfg.clone(), {"SEMI.LOSSES": ["ddfp"]}))

    cfg.SOLVER.REFERENCE_WORLD_SIZE = 4
    cfg.SOLVER.IMS_PER_BATCH = cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 16
    one = SegTrainer.auto_scale_workers(cfg, 1)
    assert (one.SEMI.TOY_SCHEDULE.RAMP_LENGTH, one.SEMI.BURN_IN_ITERS, one.SEMI.PSEUDO_LABEL.START_ITER) == (160, 400, 160)
    assert one.SEMI.TOY_SCHEDULE.QUEUE_ITER == 7 and one.SEMI.DDFP.START_ITER == 30

    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    spec = importlib.util.spec_from_file_location("run_study", os.path.join(ROOT, "tools", "run_study.py"))
    run_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_study)  # puts tools/ (the study package) on sys.path
    from study.configs import schedule_overrides

    pairs = schedule_overrides(cfg, 0.5)
    scaled = dict(zip(pairs[::2], pairs[1::2]))
    assert scaled["SEMI.TOY_SCHEDULE.RAMP_LENGTH"] == "20" and scaled["SEMI.BURN_IN_ITERS"] == "50"
    assert "SEMI.TOY_SCHEDULE.QUEUE_ITER" not in scaled and "SEMI.DDFP.START_ITER" not in scaled


def test_evaluation_leaves_the_random_generators_untouched():
    """detectron2's own test loaders draw from the global torch generator (projects/SemiInstance uses them):
    evaluating mid-training must not change the rest of the run (mixing masks, dropout, samplers)."""
    import random

    import numpy as np

    from semiseg_d2.engine.trainer import SemiSegTrainer
    from tests.tiny import semi_cfg

    class Trainer(SemiSegTrainer):
        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            torch.rand(1), np.random.rand(), random.random()  # as a DataLoader's base seed does
            return super().build_test_loader(cfg, dataset_name)

    cfg = semi_cfg(**{"DATASETS.TEST": ("camvid_mini_val",), "TEST.EVAL_TEACHER": False})
    model = Trainer.build_model(cfg)
    model.eval()
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    results = Trainer.test(cfg, model)
    assert "mIoU" in results["student"]["sem_seg"]
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
