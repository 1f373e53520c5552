"""SEMI.TEACHER_MODE: "student" (UniMatch V1) takes the teacher maps from the student itself, no EMA copy."""
import copy

import pytest
import torch
from detectron2.modeling import build_model

from semiseg_d2.engine.hooks import EMAHook, build_ema_hook
from tests.tiny import fake_batch, semi_cfg

STUDENT_MODE = {"SEMI.TEACHER_MODE": "student", "TEST.EVAL_TEACHER": False, "SEMI.WEIGHTS_FOR_EXPORT": "student"}


def _student_model(**extra):
    torch.manual_seed(0)
    model = build_model(semi_cfg(**{**STUDENT_MODE, "SEMI.MIX.PROB": 1.0, **extra}))
    model.train()
    return model


def test_student_mode_has_no_teacher_copy_and_nothing_to_average():
    model = _student_model()
    assert model.teacher is None
    assert not any(k.startswith("teacher.") for k in model.state_dict())
    assert model.ema_pairs() == []  # the EMAHook (built for every semi-supervised run) averages nothing here
    assert isinstance(build_ema_hook(semi_cfg(**STUDENT_MODE)), EMAHook)
    model.eval_network = "teacher"
    with pytest.raises(ValueError, match="no teacher network"):
        model.inference_network


@pytest.mark.parametrize(
    "key, value", [("TEST.EVAL_TEACHER", True), ("SEMI.WEIGHTS_FOR_EXPORT", "teacher"), ("SEMI.TEACHER_MODE", "x")]
)
def test_student_mode_rejects_keys_that_name_a_teacher(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(semi_cfg(**{**STUDENT_MODE, key: value}))


def test_student_mode_teacher_maps_are_the_students_own_train_and_eval_passes():
    """Weak maps = the train-mode pass over cat(labeled, weak) (detached); pasted partner maps = an eval-mode
    pass run first (BN running statistics of before the step); two student passes, the second on strong views."""
    # No dropout in the head: the train-mode pass is then deterministic and can be repeated.
    model = _student_model(**{"MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.0, "MODEL.SEM_SEG_HEAD.DECODER_DROPOUT": 0.0})
    reference = copy.deepcopy(model.student)
    calls = []
    orig = model.student.extract
    model.student.extract = lambda x: calls.append((x.shape[0], model.student.training)) or orig(x)
    labeled, unlabeled = fake_batch(bu=3)
    losses = model((labeled, unlabeled))
    assert calls == [(3, False), (5, True), (3, True)]  # eval partners, cat(labeled, weak), strong
    step = model._last_step

    images_l = reference.normalize(torch.stack([x["image"] for x in labeled]))
    weak = reference.normalize(torch.stack([x["image"] for x in unlabeled]))
    with torch.no_grad():
        reference.eval()
        partner_logits = reference.extract(weak)["logits"]
        reference.train()
        train_logits = reference.extract(torch.cat([images_l, weak]))["logits"][2:]
    assert torch.allclose(step.teacher_weak["logits"], train_logits, atol=1e-5)
    assert not step.teacher_weak["logits"].requires_grad

    up = torch.nn.functional.interpolate(partner_logits, size=(48, 64), mode="bilinear", align_corners=False)
    partner_pl = torch.where(step.unlabeled_valid, up.argmax(1), torch.full_like(up.argmax(1), 255))
    mask, partner = step.mix_mask, step.mix_partner
    assert mask.any() and (~mask).any()
    expected = torch.where(mask, partner_pl[partner], step.teacher_weak["pseudo_label"])
    assert torch.equal(step.teacher_strong["pseudo_label"], expected)
    # The train-mode (batch statistics) and eval-mode maps differ: the test tells the two passes apart.
    assert not torch.allclose(partner_logits, train_logits, atol=1e-3)

    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert model.student.training  # the eval pass leaves the student in train mode


def test_ema_mode_still_runs_one_student_pass_with_the_ema_teacher():
    torch.manual_seed(0)
    model = build_model(semi_cfg())
    model.train()
    calls = []
    orig = model.student.extract
    model.student.extract = lambda x: calls.append(x.shape[0]) or orig(x)
    model(fake_batch())
    assert calls == [4] and model.teacher is not None and model.teacher_mode == "ema"
