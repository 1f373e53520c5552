"""SemiSegmentor: one student pass, frozen eval-mode teacher, consistent mixing, burn-in."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY, SemiLossTerm
from tests.tiny import fake_batch, semi_cfg, tiny_cfg  # noqa: F401  (re-exported for other tests)


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
    with EventStorage(4):
        losses = model(fake_batch())
    assert set(losses) == {"loss_sem_seg"}


def _register_once(cls):
    # pytest may import this file under two module names; register each test term once.
    if cls.name not in SEMI_LOSS_REGISTRY:
        SEMI_LOSS_REGISTRY.register_term(cls)
    return cls


@_register_once
class _ExplodingTerm(SemiLossTerm):
    name = "test_exploding"

    def __init__(self, cfg, spec):
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


@_register_once
class _NeedsTeacherLabeled(SemiLossTerm):
    name = "test_teacher_labeled"
    needs_teacher_labeled = True

    def __init__(self, cfg, spec):
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


def test_class_weights_scale_supervised_and_pseudo_label_ce_per_pixel():
    from semiseg_d2.losses.segmentation import sem_seg_cross_entropy

    torch.manual_seed(0)
    model = build_model(semi_cfg())
    model.train()
    model(fake_batch())
    step = model._last_step
    plain = model.terms["supervised"](step)["loss_sem_seg"]
    step.class_weights = torch.linspace(0.5, 2.0, 11)
    weighted = model.terms["supervised"](step)["loss_sem_seg"]
    t = step.labeled_targets
    expected = sem_seg_cross_entropy(step.student_labeled["logits"], t, 255, weight=step.class_weights[t])
    assert torch.allclose(weighted, expected) and not torch.allclose(weighted, plain)
    step.class_weights = torch.ones(11)
    assert torch.allclose(model.terms["supervised"](step)["loss_sem_seg"], plain)
    step.class_weights = torch.zeros(11)
    assert model.terms["pseudo_label"](step)["loss_pseudo_label"].item() == 0.0


def _normalized(model, parts, key="image"):
    return model.student.normalize(torch.stack([x[key] for x in parts]))


@pytest.mark.parametrize("teacher_autocast", [False, True])
def test_teacher_runs_in_fp32_under_amp_unless_teacher_autocast(teacher_autocast):
    torch.manual_seed(0)
    model = build_model(semi_cfg(**{"SEMI.TEACHER_AUTOCAST": teacher_autocast}))
    model.train()
    raw = []
    orig = model.teacher.extract
    model.teacher.extract = lambda x: raw.append(orig(x)) or raw[-1]
    labeled, unlabeled = fake_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what SemiSegTrainLoop does with SOLVER.AMP.ENABLED
        model((labeled, unlabeled))
    got = model._last_step.teacher_weak["logits"]
    with torch.no_grad():
        fp32 = orig(_normalized(model, unlabeled))["logits"]
    assert fp32.dtype == got.dtype == torch.float32
    if teacher_autocast:
        assert raw[0]["logits"].dtype == torch.bfloat16
        assert float((got - fp32).abs().max()) > 1e-4  # bf16 rounding, 100x the fp32 tolerance below
    else:
        assert raw[0]["logits"].dtype == torch.float32
        torch.testing.assert_close(got, fp32, atol=1e-6, rtol=1e-6)


def test_teacher_autocast_and_train_mode_are_off_by_default():
    from semiseg_d2.config import get_semiseg_cfg

    cfg = get_semiseg_cfg()
    assert cfg.SEMI.TEACHER_AUTOCAST is False and cfg.SEMI.TEACHER_TRAIN_MODE is False


def test_teacher_train_mode_is_the_official_forward():
    """Official DGCL / DDFP: ``model_teacher.train()`` then, under no_grad, one forward on cat(labeled, unlabeled):
    BN batch statistics over both, dropout on. Our running statistics stay untouched, the teacher returns to eval."""
    import copy

    torch.manual_seed(0)
    model = build_model(semi_cfg(**{"SEMI.TEACHER_TRAIN_MODE": True}))
    model.train()
    assert model.student.sem_seg_head.dropout.p > 0  # so that "dropout on" is part of what is compared
    buffers = {k: v.clone() for k, v in model.teacher.named_buffers()}
    labeled, unlabeled = fake_batch(bl=2, bu=3)
    torch.manual_seed(7)  # the teacher forward is the step's first random draw (dropout)
    model((labeled, unlabeled))
    step = model._last_step
    weak, images_l = _normalized(model, unlabeled), _normalized(model, labeled)
    official = copy.deepcopy(model.teacher).train()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = official.extract(torch.cat([weak, images_l]))["logits"]
        eval_mode = model.teacher.extract(weak)["logits"]
    torch.testing.assert_close(step.teacher_weak["logits"], ref[:3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(step.teacher_labeled["logits"], ref[3:], atol=1e-6, rtol=1e-6)
    assert float((step.teacher_weak["logits"] - eval_mode).abs().max()) > 1e-3
    assert not model.teacher.training
    for k, v in model.teacher.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_student_teacher_in_train_mode_is_the_official_ddfp_teacher():
    """Official DDFP: the "EMA teacher" aliases the student's parameters (docs/methods/ddfp.md §4.1) and runs
    ``train()`` under no_grad on cat(labeled, unlabeled): a no-grad train-mode pass of the student's own weights,
    then the usual single student pass on cat(labeled, strong)."""
    import copy

    torch.manual_seed(0)
    model = build_model(semi_cfg(**{"SEMI.TEACHER_MODE": "student", "SEMI.TEACHER_TRAIN_MODE": True,
                                    "TEST.EVAL_TEACHER": False, "SEMI.WEIGHTS_FOR_EXPORT": "student"}))
    model.train()
    assert model.teacher is None  # no EMA copy: nothing for an EMA update to move
    before = copy.deepcopy(model.student)  # weights and BN buffers as the teacher pass sees them
    calls = []
    orig = model.student.extract
    model.student.extract = lambda x: calls.append((x.shape[0], torch.is_grad_enabled())) or orig(x)
    labeled, unlabeled = fake_batch(bl=2, bu=3)
    torch.manual_seed(7)
    model((labeled, unlabeled))
    step = model._last_step
    assert calls == [(5, False), (5, True)]  # teacher pass on weak + labeled, then student on labeled + strong
    assert model.student.training
    with torch.no_grad():
        torch.manual_seed(7)
        ref = before.train().extract(torch.cat([_normalized(model, unlabeled), _normalized(model, labeled)]))["logits"]
    torch.testing.assert_close(step.teacher_weak["logits"], ref[:3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(step.teacher_labeled["logits"], ref[3:], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- #18: spec, EMA, clock
def test_terms_are_built_from_the_built_students_head_spec():
    """DGCL reads the width of the head's 'features' from the built head (DeepLabV2: its res5 input, which no
    CONVS_DIM states), DDFP the head's decode and its norm count."""
    from tests.tiny import TINY_DGCL

    cfg = semi_cfg(**dict(TINY_DGCL, **{"MODEL.SEM_SEG_HEAD.NAME": "DeepLabV2Head"}))
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    model = build_model(cfg)
    d = model.student.sem_seg_head.feature_dim
    assert d != cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    assert model.terms["dgcl"].feature_dim == d and model.terms["dgcl"].proj.in_dim == d

    cfg = semi_cfg(**{"SEMI.LOSSES": ["supervised", "pseudo_label", "ddfp"], "SEMI.DDFP.FLOW_HIDDEN": [8],
                      "MODEL.SEM_SEG_HEAD.NAME": "U2PLDeepLabV3PlusHead"})
    model = build_model(cfg)
    head, term = model.student.sem_seg_head, model.terms["ddfp"]
    spec = head.spec()
    assert (spec.name, spec.feature_dim, spec.decoder_input_dim, spec.num_decoder_norms) == (
        "U2PLDeepLabV3PlusHead", head.feature_dim, head.decoder_input_dim, 2)
    assert term.decode.__self__ is head  # the student's head, not the teacher's copy
    assert term.flow.dim == head.feature_dim and len(term.perturbed_norms) == len(head.decoder_norms)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV2Head"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    with pytest.raises(ValueError, match="'ddfp' perturbs the decoder input.*the head 'DeepLabV2Head' has none"):
        build_model(cfg)


def test_is_semi_supervised_names_teacher_student_architectures():
    from semiseg_d2.modeling import is_semi_supervised

    assert is_semi_supervised(semi_cfg()) and not is_semi_supervised(tiny_cfg())
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentr"
    with pytest.raises(KeyError, match="MODEL.META_ARCHITECTURE: unknown name 'SemiSegmentr'.*SemiSegmentor"):
        is_semi_supervised(cfg)


_MC = {"SEMI.LOSSES": ["supervised", "pseudo_label", "memory_contrast"],
       "SEMI.MEMORY_CONTRAST.START_ITER": 0, "SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE": 1, "SEMI.MEMORY_CONTRAST.PROJECTION_DIM": 8,
       "SEMI.MEMORY_CONTRAST.HIDDEN_DIM": 8, "SEMI.MEMORY_CONTRAST.SELECTOR_HIDDEN_DIM": 4,
       "SEMI.MEMORY_CONTRAST.BANK_SIZE": 4, "SEMI.EMA.SCHEDULE": "constant", "SEMI.EMA.MOMENTUM": 0.75}


def _after_step(hook, model, iteration):
    from types import SimpleNamespace

    with EventStorage(iteration) as storage:
        hook.trainer = SimpleNamespace(iter=iteration, model=model, storage=storage)
        hook.after_step()
        return storage.latest()


@pytest.mark.parametrize("teacher_mode", ["ema", "student"])
def test_one_ema_hook_updates_the_teacher_and_every_terms_pairs(teacher_mode):
    from semiseg_d2.engine.hooks import build_ema_hook

    extra = {"SEMI.TEACHER_MODE": teacher_mode}
    if teacher_mode == "student":
        extra.update({"TEST.EVAL_TEACHER": False, "SEMI.WEIGHTS_FOR_EXPORT": "student"})
    cfg = semi_cfg(**_MC, **extra)
    model = build_model(cfg)
    term = model.terms["memory_contrast"]
    expected = [(term.teacher_projection, term.projection), (term.teacher_memory_selector, term.memory_selector)]
    if teacher_mode == "ema":
        expected.insert(0, (model.teacher, model.student))
    assert [(p.teacher, p.student) for p in model.ema_pairs()] == expected
    with torch.no_grad():
        for _, student in expected:
            for p in student.parameters():
                p.add_(1.0)
    before = [[p.clone() for p in t.parameters()] for t, _ in expected]
    latest = _after_step(build_ema_hook(cfg), model, iteration=3)
    assert latest["ema_momentum"][0] == 0.75  # SEMI.EMA.MOMENTUM, constant schedule
    for (teacher, student), old in zip(expected, before):
        for t, b, s in zip(teacher.parameters(), old, student.parameters()):
            assert torch.allclose(t, 0.75 * b + 0.25 * s)


def test_student_mode_without_averaging_terms_leaves_the_hook_nothing_to_do():
    from semiseg_d2.engine.hooks import build_ema_hook

    cfg = semi_cfg(**{"SEMI.TEACHER_MODE": "student", "TEST.EVAL_TEACHER": False, "SEMI.WEIGHTS_FOR_EXPORT": "student"})
    model = build_model(cfg)
    assert model.ema_pairs() == []
    assert "ema_momentum" not in _after_step(build_ema_hook(cfg), model, iteration=3)


def test_the_step_clock_is_the_event_storage():
    """The model reads the step's iteration from detectron2's event storage (the trainer sets storage.iter)."""
    model = build_model(semi_cfg(**{"SEMI.BURN_IN_ITERS": 5}))
    model.train()
    for it, burn_in in ((4, True), (5, False)):
        with EventStorage(it):
            assert model.iteration == it and model.in_burn_in() == burn_in
            model(fake_batch())
            assert model._last_step.iteration == it and model._last_step.burn_in == burn_in
