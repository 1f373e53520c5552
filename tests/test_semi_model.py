"""SemiSegmentor: one student pass, frozen eval-mode teacher, consistent mixing, burn-in."""
import pytest
import torch
from detectron2.modeling import build_model

from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY, SemiLossTerm
from tests.tiny import tiny_cfg


def semi_cfg(**overrides):
    cfg = tiny_cfg(crop=(48, 64))
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label"]
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.0  # keep everything: the random teacher is unconfident
    cfg.SOLVER.MAX_ITER = 10
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def fake_batch(bl=2, bu=2, h=48, w=64, seed=0):
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
    return labeled, unlabeled


def test_student_runs_once_on_all_views_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    model = build_model(semi_cfg())
    model.train()
    calls = []
    orig = model.student.extract
    model.student.extract = lambda x: calls.append(x.shape[0]) or orig(x)
    teacher_bn = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = model(fake_batch())
    assert set(losses) == {"loss_sem_seg", "loss_pseudo_label"}
    assert calls == [4]  # 2 labeled + 2 strong, one pass
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())
    assert not model.teacher.training  # BN of the teacher in eval mode while the model trains
    for k, v in model.teacher.state_dict().items():  # running stats untouched by training forwards
        assert torch.equal(v, teacher_bn[k]), k


def test_student_weak_pass_when_a_term_needs_it():
    model = build_model(semi_cfg(**{"SEMI.STUDENT_WEAK": True}))
    model.train()
    calls = []
    orig = model.student.extract
    model.student.extract = lambda x: calls.append(x.shape[0]) or orig(x)
    model(fake_batch(bl=1, bu=3))
    assert calls == [7]
    step = model._last_step
    assert step.student_weak["logits"].shape[0] == 3 and step.student_strong["logits"].shape[0] == 3


def test_mixing_moves_strong_images_and_teacher_maps_together():
    torch.manual_seed(1)
    model = build_model(semi_cfg(**{"SEMI.MIX.PROB": 1.0}))
    model.train()
    seen = {}
    orig = model.student.extract
    model.student.extract = lambda x: seen.setdefault("x", x.clone()) is not None and orig(x)
    labeled, unlabeled = fake_batch(bu=3)
    model((labeled, unlabeled))
    step = model._last_step
    mask, partner = step.mix_mask, step.mix_partner
    assert mask.any() and (~mask).any()
    strong = model.student.normalize(torch.stack([u["image_strong"] for u in unlabeled]))
    got = seen["x"][2:]
    for b in range(3):
        src = torch.where(mask[b], partner[b], torch.tensor(b))
        expected_img = strong[src, :, torch.arange(48)[:, None], torch.arange(64)[None]].permute(2, 0, 1)
        assert torch.allclose(got[b], expected_img)
        expected_pl = step.teacher_weak["pseudo_label"][src, torch.arange(48)[:, None], torch.arange(64)[None]]
        assert torch.equal(step.teacher_strong["pseudo_label"][b], expected_pl)
    # Padding of the weak view is ignored in its pseudo-label, and stays ignored where it is pasted.
    assert (step.teacher_weak["pseudo_label"][:, :, -5:] == 255).all()
    assert torch.equal(step.teacher_strong["valid"], step.teacher_strong["pseudo_label"] != 255)


def test_burn_in_runs_supervised_only_without_teacher():
    model = build_model(semi_cfg(**{"SEMI.BURN_IN_ITERS": 5}))
    model.train()
    model.teacher.extract = lambda x: pytest.fail("teacher must not run during burn-in")
    model.iteration = 4
    losses = model(fake_batch())
    assert set(losses) == {"loss_sem_seg"}


@SEMI_LOSS_REGISTRY.register_term
class _ExplodingTerm(SemiLossTerm):
    name = "test_exploding"

    def __init__(self, cfg):
        super().__init__()

    def forward(self, step):
        return {"loss_boom": step.student_strong["logits"].sum() * float("nan")}


def test_nonfinite_loss_names_iteration_and_term():
    from semiseg_d2.engine.trainer import SemiSegTrainLoop

    model = build_model(semi_cfg(**{"SEMI.LOSSES": ["supervised", "test_exploding"]}))
    batch = fake_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loop = SemiSegTrainLoop(model, [batch], opt)
    loop.iter = 3
    before = {k: v.clone() for k, v in model.student.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss_boom \(term 'test_exploding'\)"):
        loop.run_step()
    for k, v in model.student.named_parameters():  # the student was not stepped with NaN gradients
        assert torch.equal(v, before[k]), k


@SEMI_LOSS_REGISTRY.register_term
class _NeedsTeacherLabeled(SemiLossTerm):
    name = "test_teacher_labeled"
    needs_teacher_labeled = True

    def __init__(self, cfg):
        super().__init__()

    def forward(self, step):
        return {"loss_probe": step.student_strong["logits"].sum() * 0}


def test_teacher_labeled_outputs_equal_a_separate_teacher_pass():
    model = build_model(semi_cfg(**{"SEMI.LOSSES": ["supervised", "test_teacher_labeled"]}))
    model.train()
    labeled, unlabeled = fake_batch(bl=2, bu=3)
    model((labeled, unlabeled))
    step = model._last_step
    imgs = model.student.normalize(torch.stack([x["image"] for x in labeled]))
    with torch.no_grad():
        ref = model.teacher.extract(imgs)["logits"]
    assert torch.allclose(step.teacher_labeled["logits"], ref, atol=1e-5)
    assert step.teacher_weak["logits"].shape[0] == 3
    assert step.teacher_labeled["pseudo_label"].shape == (2, 48, 64)
