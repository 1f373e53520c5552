"""Reproduction fidelity (issue 15): the DGCL / DDFP / memory-contrast configs train the settings of the official
code that produced the published numbers (docs/methods/*.md "Reproduction fidelity: settings")."""
import glob
import math
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from semiseg_d2.config import epoch_iterations, get_semiseg_cfg
from semiseg_d2.data.mapper import UnlabeledDatasetMapper, sample_scale
from semiseg_d2.data.splits.splits import read_list
from tests.tiny import TINY_DGCL, apply_overrides, semi_cfg, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(ROOT, "semiseg_d2", "data", "splits")


def _configs(pattern):
    """The ResNet reproduction configs of ``pattern``: the ``*_dinov2_*`` files put the same terms on DINOv2 + DPT
    with UniMatch V2's recipe (AdamW, weight decay 0.01, crops of 14), checked in tests/modeling/test_dinov2.py."""
    return sorted(p for p in glob.glob(os.path.join(ROOT, "configs", pattern)) if "_dinov2_" not in p)


def _load(path):
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(path)
    return cfg


DGCL = _configs("*/dgcl_*.yaml") + _configs("dgcl_city.yaml")
DDFP = _configs("*/ddfp_*.yaml")
MEMORY_V3P = _configs("*/memory_contrast_*R50_dlv3p*.yaml")
MEMORY = _configs("*/memory_contrast_*.yaml")
_ids = dict(ids=lambda p: os.path.relpath(p, ROOT))


# ---------------------------------------------------------------------------------------------- 1. decoder
@pytest.mark.parametrize("path", DGCL + DDFP + _configs("camvid/study_*.yaml"), **_ids)
def test_dgcl_ddfp_configs_train_the_u2pl_decoder(path):
    cfg = _load(path)
    assert cfg.MODEL.SEM_SEG_HEAD.NAME == "U2PLDeepLabV3PlusHead"  # the CamVid study: one network for every row
    assert cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT == cfg.MODEL.SEM_SEG_HEAD.DECODER_DROPOUT == 0.1


# ---------------------------------------------------------------------------------------------- 2. scale
def test_u2pl_scale_sampling_is_half_below_half_above_one():
    np.random.seed(0)
    s = np.array([sample_scale((0.5, 2.0), "u2pl") for _ in range(20000)])
    assert 0.5 <= s.min() and s.max() <= 2.0
    assert abs((s < 1.0).mean() - 0.5) < 0.015
    assert abs(s.mean() - 1.125) < 0.01  # (0.75 + 1.5) / 2
    below, above = s[s < 1.0], s[s >= 1.0]
    assert abs(below.mean() - 0.75) < 0.01 and abs(above.mean() - 1.5) < 0.02  # uniform within each half
    np.random.seed(0)
    u = np.array([sample_scale((0.5, 2.0)) for _ in range(20000)])
    assert abs((u < 1.0).mean() - 1 / 3) < 0.015 and abs(u.mean() - 1.25) < 0.01  # the default is unchanged
    np.random.seed(0)
    first = sample_scale((0.5, 2.0), "u2pl")
    np.random.seed(0)
    assert sample_scale((0.5, 2.0), "u2pl") == first  # seeded


def test_scale_sampling_errors_name_the_key():
    with pytest.raises(ValueError, match="INPUT.SCALE_SAMPLING: unknown 'u2p'"):
        sample_scale((0.5, 2.0), "u2p")
    with pytest.raises(ValueError, match="INPUT.SCALE_RANGE to contain 1"):
        sample_scale((1.2, 2.0), "u2pl")
    cfg = tiny_cfg()
    cfg.INPUT.SCALE_SAMPLING = "gauss"
    with pytest.raises(ValueError, match="INPUT.SCALE_SAMPLING"):
        UnlabeledDatasetMapper(cfg)


@pytest.mark.parametrize("path", DGCL + DDFP, **_ids)
def test_dgcl_uses_u2pl_randresize_and_ddfp_its_uniform_resize(path):
    cfg = _load(path)
    # DGCL: U2PL's RandResize; DDFP: UniMatch's resize(img, mask, (0.5, 2.0)), a uniform long side
    expected = "u2pl" if "dgcl" in os.path.basename(path) else "uniform"
    assert cfg.INPUT.SCALE_SAMPLING == expected
    assert list(cfg.INPUT.SCALE_RANGE) == [0.5, 2.0]
    assert UnlabeledDatasetMapper(cfg).scale_sampling == expected


# ---------------------------------------------------------------------------------------------- 3. weight decay
@pytest.mark.parametrize("path", DGCL + DDFP + MEMORY, **_ids)
def test_method_configs_decay_norm_weights_like_every_other_weight(path):
    cfg = _load(path)
    # SGD(params, weight_decay) over every parameter: DGCL / DDFP 1e-4, Alonso et al. 5e-4
    assert cfg.SOLVER.WEIGHT_DECAY == pytest.approx(5e-4 if "memory_contrast" in path else 1e-4)
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == cfg.SOLVER.WEIGHT_DECAY


def test_built_optimizer_gives_bn_weights_the_decay():
    from detectron2.modeling import build_model

    from semiseg_d2.engine.optimizer import build_optimizer

    cfg = tiny_cfg(head="U2PLDeepLabV3PlusHead")
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    recipe = _load(os.path.join(ROOT, "configs/cityscapes/dgcl_372.yaml"))
    cfg.SOLVER.WEIGHT_DECAY_NORM = recipe.SOLVER.WEIGHT_DECAY_NORM
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms
    assert {decay[id(m.weight)] for m in norms} == {decay[id(m.bias)] for m in norms} == {1e-4}


# ---------------------------------------------------------------------------------------------- 4. sliding window
@pytest.mark.parametrize("path", _configs("cityscapes/dgcl_*.yaml") + _configs("cityscapes/mean_teacher_*.yaml")
                         + _configs("dgcl_city.yaml"), **_ids)
def test_cityscapes_sliding_window_is_dgcl_eval_800_534(path):
    cfg = _load(path)
    sw = cfg.TEST.SLIDING_WINDOW
    assert sw.ENABLED and tuple(sw.SIZE) == (800, 800)
    assert tuple(sw.STRIDE) == (math.ceil(800 * 2 / 3),) * 2 == (534, 534)  # eval.py: ceil(crop * stride_rate 2/3)


@pytest.mark.parametrize("path", _configs("cityscapes/ddfp_*.yaml"), **_ids)
def test_ddfp_cityscapes_sliding_window_is_its_validate_801_534(path):
    sw = _load(path).TEST.SLIDING_WINDOW
    assert tuple(sw.SIZE) == (801, 801) and tuple(sw.STRIDE) == (int(801 * 2 / 3),) * 2 == (534, 534)


# ---------------------------------------------------------------------------------------------- 7. SyncBN heads
@pytest.mark.parametrize("norm,cls", [("BN", nn.BatchNorm1d), ("SyncBN", nn.SyncBatchNorm)])
def test_projection_and_selector_norms_follow_the_head_norm(norm, cls):
    from semiseg_d2.losses.dgcl import DGCLTerm
    from semiseg_d2.losses.memory_contrast import MemoryContrastTerm
    from semiseg_d2.modeling.heads.spec import HeadSpec

    cfg = apply_overrides(semi_cfg(), TINY_DGCL)
    cfg.MODEL.SEM_SEG_HEAD.NORM = norm
    spec = HeadSpec("TestHead", cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    dgcl = DGCLTerm(cfg, spec)
    cfg.SEMI.MEMORY_CONTRAST.NUM_LABELED = 4
    memory = MemoryContrastTerm(cfg, spec)
    row_norms = [m for t in (dgcl, memory) for m in t.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # DGCL projection; memory contrast g, q and the teacher's copy of g
    assert len(row_norms) == 4 and all(type(m) is cls for m in row_norms)
    selectors = [memory.selector, memory.memory_selector, memory.teacher_memory_selector]
    assert all(s.norm.sync == (norm == "SyncBN") for s in selectors)
    x = torch.randn(6, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
    assert dgcl.proj(x).shape == (6, cfg.SEMI.DGCL.PROJ_DIM)  # SyncBatchNorm runs as plain BN without a group


# ---------------------------------------------------------------------------------------------- 8. Alonso ASPP
@pytest.mark.parametrize("path", MEMORY_V3P, **_ids)
def test_alonso_deeplabv3plus_aspp_dropout_is_half(path):
    cfg = _load(path)
    assert cfg.MODEL.SEM_SEG_HEAD.NAME == "DeepLabV3PlusFeatHead"
    assert cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT == 0.5
    tiny = tiny_cfg()
    tiny.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT
    from detectron2.modeling import build_model

    assert build_model(tiny).sem_seg_head.aspp.dropout == 0.5


# ---------------------------------------------------------------------------------------------- 9. epochs
def test_epoch_iterations_counts_like_distributed_sampler_with_drop_last():
    assert epoch_iterations(2975 - 372, 8, 2) == 163  # 2603 -> 326 per rank (padded) -> 163 batches of 2
    assert epoch_iterations(10582 - 732, 4, 4) == 615  # the official DDFP logs: 49,200 / 80
    assert epoch_iterations(10582 - 1464, 4, 4) == 570  # 45,600 / 80; floor(9118 / 16) would be 569
    assert epoch_iterations(5, 2, 2, drop_last=False) == 2  # 3 per rank -> 2 batches (the last one of 1)
    with pytest.raises(ValueError, match="must be positive"):
        epoch_iterations(10, 0, 2)


SPLIT_CONFIGS = [p for p in _configs("*/dgcl_*.yaml") + _configs("*/ddfp_*.yaml")
                 if re.match(r"(dgcl|ddfp)_\d+\.yaml$", os.path.basename(p))]


def test_every_epoch_recipe_split_is_checked():
    assert len(SPLIT_CONFIGS) == 4 + 4 + 9 + 5  # Cityscapes dgcl / ddfp, VOC dgcl / ddfp


@pytest.mark.parametrize("path", SPLIT_CONFIGS, **_ids)
def test_epoch_schedules_use_the_official_epoch_length(path):
    method, n = re.match(r"(dgcl|ddfp)_(\d+)\.yaml$", os.path.basename(path)).groups()
    city = "cityscapes" in path
    cfg = _load(path)
    n_u = len(read_list(os.path.join(SPLITS, "cityscapes" if city else "pascal", n, "unlabeled.txt")))
    world = cfg.SOLVER.REFERENCE_WORLD_SIZE
    assert world == (8 if city else 4)
    per_epoch = epoch_iterations(n_u, world, cfg.SOLVER.IMS_PER_BATCH_UNLABELED // world)
    assert cfg.SOLVER.MAX_ITER == (200 if city else 80) * per_epoch
    burn_epochs = 10 if city and method == "dgcl" else 1
    assert cfg.SEMI.BURN_IN_ITERS == burn_epochs * per_epoch
    if method == "ddfp":
        assert cfg.SEMI.DDFP.FLOW_START_ITER == per_epoch and cfg.SEMI.DDFP.START_ITER == 2 * per_epoch


def test_synced_class_batch_norm_uses_the_statistics_of_every_rank(monkeypatch):
    """With sync, ClassBatchNorm on this rank's rows equals the local ClassBatchNorm over both ranks' rows (the
    other rank simulated: each rank-sum adds what that rank contributes), outputs and running statistics."""
    from semiseg_d2.layers import class_attention
    from semiseg_d2.layers.class_attention import ClassBatchNorm

    g = torch.Generator().manual_seed(0)
    C, H = 3, 4
    xa, la = torch.randn(7, H, generator=g), torch.tensor([0, 0, 1, 1, 1, 2, 0])
    xb, lb = torch.randn(5, H, generator=g) * 3 + 1, torch.tensor([1, 2, 2, 0, 2])
    calls = []

    def other_rank_sum(t):  # the 3 collectives of one training forward: counts, sums, centred squares
        calls.append(t)
        if len(calls) == 1:
            return t + torch.zeros(C).index_add_(0, lb, torch.ones(len(lb)))
        if len(calls) == 2:
            return t + torch.zeros(C, H).index_add_(0, lb, xb)
        n = calls[0] + torch.zeros(C).index_add_(0, lb, torch.ones(len(lb)))
        mean = (calls[1] + torch.zeros(C, H).index_add_(0, lb, xb)) / n[:, None]
        return t + torch.zeros(C, H).index_add_(0, lb, (xb - mean[lb]).square())

    monkeypatch.setattr(class_attention, "sum_over_ranks", other_rank_sum)
    synced, local = ClassBatchNorm(C, H, sync=True), ClassBatchNorm(C, H)
    got = synced(xa, la)
    ref = local(torch.cat([xa, xb]), torch.cat([la, lb]))[: len(xa)]
    assert len(calls) == 3
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(synced.running_mean, local.running_mean)
    torch.testing.assert_close(synced.running_var, local.running_var)
    unsynced = ClassBatchNorm(C, H)(xa, la)
    assert not torch.allclose(unsynced, got)  # the other rank's rows matter
