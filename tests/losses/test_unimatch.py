"""UniMatch: dual strong streams, the feature-perturbation stream and the loss against the official formula."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from semiseg_d2.data.mapper import UnlabeledDatasetMapper
from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY
from semiseg_d2.modeling.heads.spec import HeadSpec
from semiseg_d2.losses.step import SemiStep
from tests.tiny import BUNDLED_CAMVID, fake_batch, semi_cfg

STUDENT_MODE = {"SEMI.TEACHER_MODE": "student", "TEST.EVAL_TEACHER": False, "SEMI.WEIGHTS_FOR_EXPORT": "student"}
UNIMATCH = {"SEMI.LOSSES": ["supervised", "unimatch"], "SEMI.UNIMATCH.THRESHOLD": 0.0, "SEMI.MIX.PROB": 1.0}


def unimatch_batch(bu=2, seed=0):
    return fake_batch(bu=bu, seed=seed, strong2=True)


def _record():
    import glob
    import os

    return {"file_name": sorted(glob.glob(os.path.join(BUNDLED_CAMVID, "**", "*.png"), recursive=True))[0]}


def _map(mapper, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    return mapper(_record())


# ------------------------------------------------------------------ dual strong streams
def test_mapper_makes_the_second_strong_view_only_for_terms_that_need_it():
    cfg = semi_cfg()
    assert "image_strong2" not in _map(UnlabeledDatasetMapper(cfg), 0)
    cfg = semi_cfg(**UNIMATCH)
    one = _map(UnlabeledDatasetMapper(semi_cfg()), 0)
    two = _map(UnlabeledDatasetMapper(cfg), 0)
    # The first stream and the geometry are unchanged; the second is its own photometric draw of the same crop.
    assert torch.equal(one["image"], two["image"]) and torch.equal(one["image_strong"], two["image_strong"])
    assert two["image_strong2"].shape == two["image"].shape
    assert not torch.equal(two["image_strong"], two["image_strong2"])
    assert not torch.equal(two["image_strong2"], two["image"])


@pytest.mark.parametrize("mode", [{}, STUDENT_MODE], ids=["ema", "student"])
def test_streams_have_their_own_boxes_and_teacher_maps_are_mixed_with_the_same_boxes(mode):
    torch.manual_seed(3)
    model = build_model(semi_cfg(**UNIMATCH, **mode))
    model.train()
    labeled, unlabeled = fake_batch(bu=3)
    g = torch.Generator().manual_seed(5)
    for u in unlabeled:  # a second strong view unlike the first
        u["image_strong2"] = torch.randint(0, 256, u["image"].shape, dtype=torch.uint8, generator=g)
    model((labeled, unlabeled))
    step = model._last_step
    m1, m2, partner = step.mix_mask, step.mix_mask2, step.mix_partner
    assert m1.any() and m2.any() and not torch.equal(m1, m2)
    for key, mask, images, teacher in (
        ("image_strong", m1, step.strong_images, step.teacher_strong),
        ("image_strong2", m2, step.strong_images2, step.teacher_strong2),
    ):
        raw = model.student.normalize(torch.stack([u[key] for u in unlabeled]))
        assert torch.allclose(images, torch.where(mask[:, None], raw[partner], raw))
        for k in ("pseudo_label", "confidence", "valid"):
            own = step.teacher_weak[k]
            assert torch.equal(teacher[k][~mask], own[~mask]), k  # outside the boxes: the image's own maps
    if mode:  # student mode: the pasted maps come from the eval-mode pass (checked in test_teacher_mode)
        return
    for mask, teacher in ((m1, step.teacher_strong), (m2, step.teacher_strong2)):
        own = step.teacher_weak["pseudo_label"]
        assert torch.equal(teacher["pseudo_label"], torch.where(mask, own[partner], own))


def test_other_methods_pay_nothing_for_the_extra_streams():
    model = build_model(semi_cfg())
    model.train()
    calls = []
    orig = model.student.extract
    model.student.extract = lambda x: calls.append(x.shape[0]) or orig(x)
    model.student.extract_fp = lambda *a: pytest.fail("no term asked for the fp stream")
    model(fake_batch())
    step = model._last_step
    assert calls == [4] and step.student_strong2 == {} and step.mix_mask2 is None and step.student_weak_fp == {}


# ------------------------------------------------------------------ feature perturbation
def test_fp_perturbs_encoder_features_not_the_image_in_one_head_batch():
    torch.manual_seed(0)
    model = build_model(semi_cfg(**UNIMATCH, **STUDENT_MODE))
    model.train()
    student = model.student
    calls = []
    backbone_forward, head_forward = student.backbone.forward, student.sem_seg_head.forward

    def backbone(x):
        out = backbone_forward(x)
        calls.append(("backbone", x.clone(), {k: v.clone() for k, v in out.items()}))
        return out

    def head(features):
        calls.append(("head", {k: v.clone() for k, v in features.items()}))
        return head_forward(features)

    student.backbone.forward, student.sem_seg_head.forward = backbone, head
    losses = model(unimatch_batch())
    step = model._last_step
    # eval-mode partner pass, then the fp pass over cat(labeled, weak), then the strong streams
    (_, _, _), (_, _), (_, images, clean), (_, head_in) = calls[0][:3], calls[1], calls[2], calls[3]
    assert torch.equal(images, torch.cat([step.labeled_images, step.weak_images]))  # the image is not perturbed
    for k, v in clean.items():
        n = v.shape[0]
        assert head_in[k].shape[0] == 2 * n  # clean and perturbed in one head batch (one BN batch)
        assert torch.equal(head_in[k][:n], v)
        perturbed = head_in[k][n:]
        dropped = perturbed.flatten(2).abs().sum(-1) == 0  # Dropout2d zeroes whole channels
        assert 0.2 < dropped.float().mean().item() < 0.8, k
        assert torch.allclose(perturbed[~dropped], 2 * v[~dropped])  # survivors scaled by 1 / (1 - p)
    fp, weak = step.student_weak_fp["logits"], step.student_weak["logits"]
    assert fp.shape == weak.shape and not torch.allclose(fp, weak) and "loss_unimatch_fp" in losses


def test_fp_trains_the_student_and_is_absent_when_the_term_is_off():
    torch.manual_seed(0)
    model = build_model(semi_cfg(**UNIMATCH, **STUDENT_MODE))
    model.train()
    losses = model(unimatch_batch())
    losses["loss_unimatch_fp"].backward()
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    off = build_model(semi_cfg(**{**UNIMATCH, "SEMI.UNIMATCH.FP_DROPOUT": 0.0, "SEMI.UNIMATCH.WEIGHT_FP": 0.0}))
    off.train()
    off.student.extract_fp = lambda *a: pytest.fail("fp stream must not run with FP_DROPOUT 0")
    assert "loss_unimatch_fp" not in off(unimatch_batch()) and off._last_step.student_weak_fp == {}
    with pytest.raises(ValueError, match="WEIGHT_FP"):
        build_model(semi_cfg(**{**UNIMATCH, "SEMI.UNIMATCH.FP_DROPOUT": 0.0}))


# ------------------------------------------------------------------ the loss
def _official_unimatch_loss(pred_x, mask_x, pred_s1, pred_s2, pred_fp, mask_w, conf_w, ignore, mask_mix, conf_mix,
                            ignore_mix, box1, box2, thresh):
    """Hand transcription of LiheYoung/UniMatch unimatch.py (V1) on given tensors (logits at label size)."""
    criterion_l = torch.nn.CrossEntropyLoss(ignore_index=255)
    criterion_u = torch.nn.CrossEntropyLoss(reduction="none")
    m1, c1, i1 = mask_w.clone(), conf_w.clone(), ignore.clone()
    m2, c2, i2 = mask_w.clone(), conf_w.clone(), ignore.clone()
    m1[box1 == 1], c1[box1 == 1], i1[box1 == 1] = mask_mix[box1 == 1], conf_mix[box1 == 1], ignore_mix[box1 == 1]
    m2[box2 == 1], c2[box2 == 1], i2[box2 == 1] = mask_mix[box2 == 1], conf_mix[box2 == 1], ignore_mix[box2 == 1]
    loss_x = criterion_l(pred_x, mask_x)
    l1 = criterion_u(pred_s1, m1) * ((c1 >= thresh) & (i1 != 255))
    l1 = l1.sum() / (i1 != 255).sum().item()
    l2 = criterion_u(pred_s2, m2) * ((c2 >= thresh) & (i2 != 255))
    l2 = l2.sum() / (i2 != 255).sum().item()
    lfp = criterion_u(pred_fp, mask_w) * ((conf_w >= thresh) & (ignore != 255))
    lfp = lfp.sum() / (ignore != 255).sum().item()
    return (loss_x + l1 * 0.25 + l2 * 0.25 + lfp * 0.5) / 2.0


def test_loss_equals_the_official_formula_on_fixed_tensors():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 5, 12, 16
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pred_x, pred_s1, pred_s2, pred_fp = r(b, c, h, w), r(b, c, h, w), r(b, c, h, w), r(b, c, h, w)
    mask_x = torch.randint(0, c, (b, h, w), generator=g)
    mask_x[:, :2] = 255
    probs_w = (3 * r(b, c, h, w)).softmax(1)
    conf_w, mask_w = probs_w.max(1)
    ignore = torch.zeros(b, h, w, dtype=torch.long)
    ignore[:, :, -3:] = 255  # padding of the unlabeled crops
    partner = torch.tensor([1, 0])
    box1 = torch.zeros(b, h, w, dtype=torch.bool)
    box1[:, 2:8, 5:14] = True
    box2 = torch.zeros(b, h, w, dtype=torch.bool)
    box2[0, 6:12, 0:6] = True
    thresh = 0.6
    expected = _official_unimatch_loss(
        pred_x, mask_x, pred_s1, pred_s2, pred_fp, mask_w, conf_w, ignore, mask_w[partner], conf_w[partner],
        ignore[partner], box1, box2, thresh,
    )

    cfg = semi_cfg(**{"SEMI.LOSSES": ["supervised", "unimatch"], "SEMI.SUPERVISED.WEIGHT": 0.5,
                      "SEMI.UNIMATCH.THRESHOLD": thresh, "MODEL.SEM_SEG_HEAD.NUM_CLASSES": c})
    spec = HeadSpec("TestHead", num_classes=c, feature_dim=32)  # neither term reads the head's widths
    sup, term = SEMI_LOSS_REGISTRY.get("supervised")(cfg, spec), SEMI_LOSS_REGISTRY.get("unimatch")(cfg, spec)
    valid = ignore != 255
    pl = torch.where(valid, mask_w, torch.full_like(mask_w, 255))
    weak = {"confidence": conf_w, "pseudo_label": pl, "valid": valid}

    def mixed(box):
        return {k: torch.where(box, v[partner], v) for k, v in weak.items()}

    student = build_model(cfg).student
    step = SemiStep(
        iteration=0, max_iter=1, num_classes=c, ignore_value=255, labeled_images=None, labeled_targets=mask_x,
        student_labeled={"logits": pred_x}, supervised_losses=student.losses,
        student_strong={"logits": pred_s1}, student_strong2={"logits": pred_s2}, student_weak_fp={"logits": pred_fp},
        teacher_weak=weak, teacher_strong=mixed(box1), teacher_strong2=mixed(box2),
    )
    losses = {**sup(step), **term(step)}
    assert set(losses) == {"loss_sem_seg", "loss_unimatch_s1", "loss_unimatch_s2", "loss_unimatch_fp"}
    assert torch.allclose(sum(losses.values()), expected, rtol=1e-6, atol=1e-7)
    # Normalised by the stream's non-ignored pixels, not by the kept ones: a higher threshold shrinks the loss.
    term.threshold = 0.99
    assert term(step)["loss_unimatch_s1"] < losses["loss_unimatch_s1"]


# ------------------------------------------------------------------ the recipe
def _resolved(name, world):
    import os

    from semiseg_d2.config import get_semiseg_cfg
    from semiseg_d2.engine.trainer import SemiSegTrainer

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", name))
    return SemiSegTrainer.auto_scale_workers(cfg, world)


def _epochs(cfg, split_dir, world=4, per_gpu=2):
    """Iterations -> epochs as the official loop counts them (DistributedSampler + drop_last on each rank)."""
    import math
    import os

    from semiseg_d2.data.splits.splits import SHIPPED_SPLITS_DIR, read_list

    n_unlabeled = len(read_list(os.path.join(SHIPPED_SPLITS_DIR, split_dir, "unlabeled.txt")))
    return cfg.SOLVER.MAX_ITER / (math.ceil(n_unlabeled / world) // per_gpu)


@pytest.mark.parametrize("name, split, official", [
    ("voc/unimatch_92.yaml", "pascal/92", dict(crop=321, epochs=80, lr=1e-3, lr_multi=10.0, thresh=0.95, loss="cross_entropy")),
    ("cityscapes/unimatch_186.yaml", "cityscapes/186", dict(crop=801, epochs=240, lr=5e-3, lr_multi=1.0, thresh=0.0, loss="ohem")),
])  # fmt: skip
def test_configs_resolve_to_the_official_recipe(name, split, official):
    """UniMatch's configs/{pascal,cityscapes}.yaml + unimatch.py, on its 4 GPUs x (2 + 2), and the same recipe per
    GPU on 1 process (REFERENCE_WORLD_SIZE: batch and lr / 4, iterations x 4)."""
    cfg = _resolved(name, 4)
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.IMS_PER_BATCH_UNLABELED, s.REFERENCE_WORLD_SIZE) == (8, 8, 4)
    assert s.BASE_LR == official["lr"] and s.HEAD_LR_MULTIPLIER == official["lr_multi"] and s.BACKBONE_LR_MULTIPLIER == 1
    assert (s.MOMENTUM, s.WEIGHT_DECAY, s.POLY_LR_POWER, s.WARMUP_ITERS, s.LR_SCHEDULER_NAME) == (
        0.9, 1e-4, 0.9, 0, "WarmupPolyLR")
    assert _epochs(cfg, split) == official["epochs"]
    assert tuple(cfg.INPUT.CROP.SIZE) == (official["crop"],) * 2 and list(cfg.INPUT.SCALE_RANGE) == [0.5, 2.0]
    assert cfg.INPUT.RANDOM_FLIP == "horizontal" and cfg.INPUT.BASE_SIZE == 0
    st = cfg.INPUT.STRONG
    assert (st.COLOR_JITTER_PROB, list(st.COLOR_JITTER), st.GRAYSCALE_PROB, st.BLUR_PROB, list(st.BLUR_SIGMA)) == (
        0.8, [0.5, 0.5, 0.5, 0.25], 0.2, 0.5, [0.1, 2.0])
    m = cfg.MODEL
    assert (m.RESNETS.DEPTH, m.RESNETS.OUTPUT_STRIDE, list(m.RESNETS.RES5_MULTI_GRID), m.RESNETS.STEM_TYPE) == (
        101, 16, [1, 1, 1], "deeplab")
    assert list(m.SEM_SEG_HEAD.ASPP_DILATIONS) == [6, 12, 18] and m.SEM_SEG_HEAD.AUX_LOSS_WEIGHT == 0
    assert m.SEM_SEG_HEAD.LOSS_TYPE == official["loss"]
    if official["loss"] == "ohem":
        assert (m.SEM_SEG_HEAD.OHEM_THRESH, m.SEM_SEG_HEAD.OHEM_MIN_KEPT) == (0.7, 200000)
        assert cfg.TEST.SLIDING_WINDOW.ENABLED and tuple(cfg.TEST.SLIDING_WINDOW.SIZE) == (801, 801)
        assert tuple(cfg.TEST.SLIDING_WINDOW.STRIDE) == (int(801 * 2 / 3),) * 2
    else:
        assert not cfg.TEST.SLIDING_WINDOW.ENABLED and not cfg.TEST.AUG.ENABLED
    semi = cfg.SEMI
    assert list(semi.LOSSES) == ["supervised", "unimatch"] and semi.TEACHER_MODE == "student" and semi.BURN_IN_ITERS == 0
    u = semi.UNIMATCH
    # (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2
    assert (semi.SUPERVISED.WEIGHT, u.WEIGHT_S1 * u.LOSS_SCALE, u.WEIGHT_S2 * u.LOSS_SCALE, u.WEIGHT_FP * u.LOSS_SCALE) == (
        0.5, 0.125, 0.125, 0.25)
    assert u.THRESHOLD == official["thresh"] and u.FP_DROPOUT == 0.5
    mix = semi.MIX
    assert (mix.TYPE, mix.PROB, list(mix.CUTMIX_AREA)) == ("cutmix", 0.5, [0.02, 0.4])
    assert mix.CUTMIX_RATIO[0] == 0.3 and mix.CUTMIX_RATIO[1] == pytest.approx(1 / 0.3)

    one = _resolved(name, 1)  # one process: the per-GPU batch, lr / 4, 4x the iterations
    assert (one.SOLVER.IMS_PER_BATCH, one.SOLVER.IMS_PER_BATCH_UNLABELED) == (2, 2)
    assert one.SOLVER.BASE_LR == pytest.approx(official["lr"] / 4) and one.SOLVER.MAX_ITER == 4 * cfg.SOLVER.MAX_ITER


# ------------------------------------------------------------------ engine: exact resume
def test_resume_is_exact(tmp_path):
    """Student-mode UniMatch (dual streams, fp dropout draws) resumed from a mid-run checkpoint ends bit-identical
    to the uninterrupted run: the RNG states (CutMix boxes, Dropout2d) and the data stream are restored."""
    import shutil

    from semiseg_d2.engine.trainer import SemiSegTrainer
    from tests.engine.test_train_e2e import camvid_semi_cfg

    extra = {"SEMI.LOSSES": ["supervised", "unimatch"], "SEMI.UNIMATCH.THRESHOLD": 0.0, **STUDENT_MODE,
             "SEMI.BURN_IN_ITERS": 1, "SOLVER.CHECKPOINT_PERIOD": 2}  # fmt: skip

    def train(out, resume=False):
        trainer = SemiSegTrainer(camvid_semi_cfg(out, 4, **extra))
        trainer.resume_or_load(resume=resume)
        trainer.train()
        return torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]

    ref = train(tmp_path / "ref")
    (tmp_path / "run").mkdir()
    shutil.copy(tmp_path / "ref" / "model_0000001.pth", tmp_path / "run")
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000001.pth")
    got = train(tmp_path / "run", resume=True)
    assert ref.keys() == got.keys() and not any(k.startswith("teacher.") for k in ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_unimatch_combines_with_dgcl_in_one_run():
    """["supervised", "unimatch", "dgcl"]: DGCL reads the weak views' student features of UniMatch's first pass and
    the teacher maps of the first stream; every term returns a finite loss that trains the student."""
    from tests.tiny import TINY_DGCL

    torch.manual_seed(0)
    cfg = semi_cfg(**{**TINY_DGCL, **STUDENT_MODE, "SEMI.LOSSES": ["supervised", "unimatch", "dgcl"],
                      "SEMI.UNIMATCH.THRESHOLD": 0.0, "SEMI.MIX.PROB": 1.0, "SEMI.DGCL.MIN_FILL": 1})
    model = build_model(cfg)
    model.train()
    for it in range(2):  # the bank fills after the first step, DGCL's loss runs on the second
        with EventStorage(it):
            losses = model(unimatch_batch(seed=it))
        total = sum(losses.values())
        total.backward()
        model.after_optimizer_step()
    assert {"loss_unimatch_s1", "loss_unimatch_fp", "loss_dgcl"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_dgcl"] > 0
