"""UniMatch V2: complementary channel dropout and the loss against a transcription of the official formula."""
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from semiseg_d2.layers.ema import ema_momentum
from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY
from semiseg_d2.modeling.heads.spec import HeadSpec
from semiseg_d2.losses.step import SemiStep
from semiseg_d2.layers.perturbation import complementary_channel_masks
from tests.tiny import apply_overrides, fake_batch, tiny_vit_cfg

V2 = {"SEMI.LOSSES": ["supervised", "unimatch_v2"], "SEMI.SUPERVISED.WEIGHT": 0.5, "SEMI.UNIMATCH_V2.THRESHOLD": 0.0}


def _cfg(**overrides):
    cfg = tiny_vit_cfg(crop=(56, 70))
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.SOLVER.MAX_ITER = 10
    return apply_overrides(cfg, {**V2, **overrides})


def _batch(seed=0, bu=4):
    labeled, unlabeled = fake_batch(bu=bu, h=56, w=70, seed=seed)
    for u in unlabeled:
        u["image_strong2"] = (u["image"].int() * 3 % 256).to(torch.uint8)
    return labeled, unlabeled


def test_complementary_masks_sum_to_two_and_keep_half_of_the_pairs():
    g = torch.Generator().manual_seed(0)
    masks = complementary_channel_masks(6, 32, 0.5, generator=g)
    m1, m2 = masks[:6], masks[6:]
    assert masks.shape == (12, 32)
    assert torch.equal(m1 + m2, torch.full((6, 32), 2.0))
    kept = (m1 == 1).all(1)
    assert int(kept.sum()) == 3 and torch.equal(kept, (m2 == 1).all(1))
    assert set(m1[~kept].unique().tolist()) == {0.0, 2.0}  # the perturbed pairs drop channels, and double the rest
    assert int(complementary_channel_masks(5, 8, 0.5, generator=g)[:5].eq(1).all(1).sum()) == 2  # int(5 * 0.5)


def _strong_logits(cfg, seed=0):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(seed)
    step = model.compute_step(*_batch())
    return step.student_strong["logits"], step.student_strong2["logits"], step


def test_kept_pairs_are_unchanged_and_the_others_perturbed():
    plain1, plain2, plain_step = _strong_logits(_cfg(**{"SEMI.UNIMATCH_V2.COMPLEMENTARY_DROPOUT": False}))
    kept1, kept2, _ = _strong_logits(_cfg(**{"SEMI.UNIMATCH_V2.UNPERTURBED_FRACTION": 1.0}))
    assert torch.equal(plain1, kept1) and torch.equal(plain2, kept2)
    drop1, drop2, _ = _strong_logits(_cfg(**{"SEMI.UNIMATCH_V2.UNPERTURBED_FRACTION": 0.0}))
    assert all((d - p).abs().amax() > 1e-3 for d, p in zip([*drop1, *drop2], [*plain1, *plain2]))
    half1, _, step = _strong_logits(_cfg())  # default: 2 of the 4 pairs unperturbed
    same = [bool(torch.allclose(h, p, atol=1e-6)) for h, p in zip(half1, plain1)]
    assert sum(same) == 2, same
    # the labeled images in the same student batch are never perturbed
    assert torch.allclose(step.student_labeled["logits"], plain_step.student_labeled["logits"], atol=1e-6)


def _official_unimatch_v2_loss(pred_x, mask_x, pred_s1, pred_s2, mask_w, conf_w, ignore, box1, box2, partner, thr):
    """unimatch_v2.py, line by line (partner = the official ``flip(0)`` permutation)."""
    def mixed(x, box):
        x = x.clone()
        x[box] = x[partner][box]
        return x

    criterion_u = torch.nn.CrossEntropyLoss(reduction="none")
    loss_x = F.cross_entropy(pred_x, mask_x, ignore_index=255)
    m1, c1, i1 = mixed(mask_w, box1), mixed(conf_w, box1), mixed(ignore, box1)
    m2, c2, i2 = mixed(mask_w, box2), mixed(conf_w, box2), mixed(ignore, box2)
    loss_u_s1 = criterion_u(pred_s1, m1)
    loss_u_s1 = loss_u_s1 * ((c1 >= thr) & (i1 != 255))
    loss_u_s1 = loss_u_s1.sum() / (i1 != 255).sum().item()
    loss_u_s2 = criterion_u(pred_s2, m2)
    loss_u_s2 = loss_u_s2 * ((c2 >= thr) & (i2 != 255))
    loss_u_s2 = loss_u_s2.sum() / (i2 != 255).sum().item()
    loss_u_s = (loss_u_s1 + loss_u_s2) / 2.0
    return (loss_x + loss_u_s) / 2.0


def test_loss_equals_the_official_formula():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 5, 14, 28
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pred_x, pred_s1, pred_s2 = r(b, c, h, w), r(b, c, h, w), r(b, c, h, w)
    mask_x = torch.randint(0, c, (b, h, w), generator=g)
    mask_x[:, :2] = 255
    conf_w, mask_w = (3 * r(b, c, h, w)).softmax(1).max(1)
    ignore = torch.zeros(b, h, w, dtype=torch.long)
    ignore[:, :, -4:] = 255
    partner = torch.tensor([1, 0])
    box1 = torch.zeros(b, h, w, dtype=torch.bool)
    box1[:, 2:8, 5:14] = True
    box2 = torch.zeros(b, h, w, dtype=torch.bool)
    box2[0, 6:12, 0:6] = True
    thr = 0.6
    expected = _official_unimatch_v2_loss(pred_x, mask_x, pred_s1, pred_s2, mask_w, conf_w, ignore, box1, box2,
                                          partner, thr)
    cfg = _cfg(**{"SEMI.UNIMATCH_V2.THRESHOLD": thr, "MODEL.SEM_SEG_HEAD.NUM_CLASSES": c})
    spec = HeadSpec("TestHead", num_classes=c, feature_dim=32)  # neither term reads the head's widths
    sup, term = SEMI_LOSS_REGISTRY.get("supervised")(cfg, spec), SEMI_LOSS_REGISTRY.get("unimatch_v2")(cfg, spec)
    valid = ignore != 255
    weak = {"confidence": conf_w, "pseudo_label": torch.where(valid, mask_w, torch.full_like(mask_w, 255)),
            "valid": valid}

    def mixed(box):
        return {k: torch.where(box, v[partner], v) for k, v in weak.items()}

    student = build_model(cfg).student
    step = SemiStep(
        iteration=0, max_iter=1, num_classes=c, ignore_value=255, labeled_images=None, labeled_targets=mask_x,
        student_labeled={"logits": pred_x}, supervised_losses=student.losses,
        student_strong={"logits": pred_s1}, student_strong2={"logits": pred_s2},
        teacher_weak=weak, teacher_strong=mixed(box1), teacher_strong2=mixed(box2),
    )
    losses = {**sup(step), **term(step)}
    assert set(losses) == {"loss_sem_seg", "loss_unimatch_v2_s1", "loss_unimatch_v2_s2"}
    assert torch.allclose(sum(losses.values()), expected, rtol=1e-6, atol=1e-7)
    assert "unimatch_v2/mask_ratio" in step.metrics


def test_ema_schedule_of_the_recipe_is_the_official_one():
    for it in (0, 1, 5, 249, 250, 10_000):
        assert ema_momentum("warm_start", 0.996, it, 10**6) == min(1 - 1 / (it + 1), 0.996)


def test_one_training_step_reaches_the_encoder():
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    with EventStorage(0):
        losses = model(_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss_unimatch_v2_s1"] + losses["loss_unimatch_v2_s2"]).backward()
    assert sum(float(p.grad.abs().sum()) for p in model.student.backbone.parameters() if p.grad is not None) > 0
