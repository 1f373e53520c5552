"""DDFP term: perturbation geometry, flow training/skip, Adam state in checkpoints, tiny end-to-end steps."""
import copy
import logging
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from semiseg_d2.engine.checkpoint import SemiSegCheckpointer
from semiseg_d2.engine.optimizer import build_optimizer
from semiseg_d2.layers.flow import CouplingFlow
from semiseg_d2.losses.ddfp import (
    DDFPTerm,
    density_descending_perturbation,
    flow_nll,
    gather_pixels,
    sample_pixels,
)
from semiseg_d2.losses.step import SemiStep
from tests.tiny import fake_batch, tiny_cfg

C, D = 3, 8


def _toy(seed=0):
    """A smooth 'decoder' (3x3 conv + tanh, 6 -> D channels) and a flow on its output, in float64."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(6, D, 3, padding=1).double()
    flow = CouplingFlow(dim=D, num_classes=C, hidden=(16, 16), init_std=0.2).double()
    return (lambda x: torch.tanh(conv(x))), flow


def _total_nll(decode, flow, x, mask):
    f = decode(x).permute(0, 2, 3, 1).reshape(-1, D)
    return (-flow.log_prob(f) * mask.reshape(-1)).sum()


def test_perturbation_has_norm_eps_and_ascends_the_nll_to_first_order():
    decode, flow = _toy()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[1, :, :3] = False
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_total_nll(decode, flow, x_req, mask), x_req)
    grad_norm = grad.norm(dim=1)
    for eps in (4.0, 1e-5):
        delta = density_descending_perturbation(decode, flow, x, mask, eps)
        assert delta.shape == x.shape and not delta.requires_grad
        nz = grad_norm > 0
        torch.testing.assert_close(delta.norm(dim=1)[nz], torch.full_like(grad_norm[nz], eps))
    # first order: NLL(f(x + delta)) - NLL(f(x)) = eps * sum_i ||grad_i|| > 0
    eps = 1e-5
    delta = density_descending_perturbation(decode, flow, x, mask, eps)
    with torch.no_grad():
        increase = _total_nll(decode, flow, x + delta, mask) - _total_nll(decode, flow, x, mask)
    expected = eps * grad_norm.sum()
    assert float(increase) > 0
    torch.testing.assert_close(increase, expected, rtol=1e-3, atol=0)
    # and a random direction of the same size increases it less
    rand = torch.randn_like(x)
    rand = eps * rand / rand.norm(dim=1, keepdim=True)
    with torch.no_grad():
        other = _total_nll(decode, flow, x + rand, mask) - _total_nll(decode, flow, x, mask)
    assert float(other) < float(increase)


def test_perturbation_is_zero_without_mask_or_with_a_diverged_flow():
    decode, flow = _toy()
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    none = density_descending_perturbation(decode, flow, x, torch.zeros(1, 4, 4, dtype=torch.bool), 4.0)
    assert torch.equal(none, torch.zeros_like(x))
    with torch.no_grad():
        flow.means.fill_(float("nan"))
    bad = density_descending_perturbation(decode, flow, x, torch.ones(1, 4, 4, dtype=torch.bool), 4.0)
    assert torch.equal(bad, torch.zeros_like(x))


def test_feature_dim_mismatch_names_both_dims():
    decode, _ = _toy()
    flow = CouplingFlow(dim=D + 2, num_classes=C, hidden=(8,))
    with pytest.raises(ValueError, match=rf"{D}-d.*{D + 2}-d"):
        density_descending_perturbation(decode, flow.double(), torch.randn(1, 6, 3, 3).double(),
                                        torch.ones(1, 3, 3, dtype=torch.bool), 1.0)
    term = _term(feature_dim=D + 2)
    with pytest.raises(ValueError, match=rf"{D}-d.*{D + 2}-d"):
        term.update(_flow_step())


def test_sampling_without_sync_keeps_only_valid_distinct_pixels():
    valid = torch.zeros(50, dtype=torch.bool)
    valid[torch.randperm(50)[:7]] = True
    idx, keep = sample_pixels(valid, 20)
    assert idx.numel() == 20 and int(keep.sum()) == 7 and bool(valid[idx[keep]].all())
    assert idx.unique().numel() == 20
    idx, keep = sample_pixels(valid, 3)
    assert bool(keep.all()) and bool(valid[idx].all())
    feats = torch.randn(2, 4, 3, 5)
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 4)
    i = torch.tensor([0, 7, 15, 29])
    assert torch.equal(gather_pixels(feats, i), flat[i])


def test_flow_nll_mixes_conditional_and_marginal_rows():
    flow = CouplingFlow(dim=4, num_classes=3, hidden=(8,))
    x = torch.randn(5, 4)
    labels = torch.tensor([0, 2, -1, -1, 1])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    expected = -(flow.log_prob(x[[0, 1, 4]], labels[[0, 1, 4]]).sum() + flow.log_prob(x[[2]]).sum()) / 4
    torch.testing.assert_close(flow_nll(flow, x, labels, weight), expected)


# ---------------------------------------------------------------------------- flow training on a fake step
def _term(**kw):
    args = dict(num_classes=C, feature_dim=D, flow_hidden=(16, 16), flow_samples=64, perturbed_bn=False)
    args.update(kw)
    return DDFPTerm(**args)


def _flow_step(seed=0, scale=1.0, iteration=1):
    g = torch.Generator().manual_seed(seed)
    bl, bu, h, w, H, W = 2, 2, 4, 5, 8, 10
    targets = torch.randint(0, C, (bl, H, W), generator=g)
    targets[:, 0] = 255
    valid = torch.ones(bu, H, W, dtype=torch.bool)
    valid[:, :, -2:] = False
    conf = torch.rand(bu, H, W, generator=g)
    return SemiStep(
        iteration=iteration, max_iter=10, num_classes=C, ignore_value=255,
        labeled_images=torch.zeros(bl, 3, H, W), labeled_targets=targets,
        student_labeled={},  # the flow trains on teacher features only
        teacher_labeled={"features": scale * torch.randn(bl, D, h, w, generator=g)},
        teacher_weak={"features": scale * torch.randn(bu, D, h, w, generator=g), "valid": valid,
                      "confidence": conf, "pseudo_label": torch.randint(0, C, (bu, H, W), generator=g)},
    )


def _adam_state(term):
    state = term.flow_optimizer.optimizer.state
    return [{k: v.clone() for k, v in state[p].items()} for p in term.flow_optimizer.params if p in state]


@pytest.mark.parametrize("target", ["mixture", "pseudo_label"])
def test_flow_update_lowers_the_nll(target):
    torch.manual_seed(0)
    term = _term(flow_unlabeled_target=target, flow_noise=0.0, flow_samples=10_000, threshold=0.3)
    step = _flow_step()
    x, labels, weight = term.flow_batch(step)
    # labeled rows carry GT ids; unlabeled rows -1 (mixture) or pseudo-labels; padding never counted
    assert x.shape[1] == D and bool((labels[weight > 0] >= (0 if target == "pseudo_label" else -1)).all())
    start = float(flow_nll(term.flow, x, labels, weight).detach())
    for _ in range(20):
        term.update(step)
    assert float(flow_nll(term.flow, x, labels, weight).detach()) < start
    assert int(term.flow_skipped) == 0 and math.isfinite(float(term.flow_nll))


def test_flow_update_without_teacher_labeled_features_names_the_field():
    step = _flow_step()
    step.teacher_labeled = {}
    with pytest.raises(RuntimeError, match=r"teacher_labeled\['features'\]"):
        _term().update(step)


def test_nonfinite_flow_step_is_skipped_and_counted(caplog):
    torch.manual_seed(0)
    term = _term()
    before = copy.deepcopy(term.flow.state_dict())
    with caplog.at_level(logging.WARNING, logger="semiseg_d2.losses.ddfp"):
        term.update(_flow_step(scale=1e30))  # |z|^2 overflows -> inf NLL / NaN gradient
    assert int(term.flow_skipped) == 1
    assert any("flow step skipped" in r.getMessage() for r in caplog.records)
    for k, v in term.flow.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not term.flow_optimizer.optimizer.state and all(p.grad is None for p in term.flow_optimizer.params)
    term.update(_flow_step())  # and a finite step afterwards trains normally
    assert int(term.flow_skipped) == 1 and len(term.flow_optimizer.optimizer.state) == len(term.flow_optimizer.params)


def test_flow_weights_and_adam_state_survive_state_dict_round_trip():
    torch.manual_seed(0)
    a = _term()
    for i in range(3):
        a.update(_flow_step(seed=i))
    b = _term(flow_seed=5)  # different initial weights
    sd = copy.deepcopy(a.state_dict())
    assert any(".exp_avg_sq." in k for k in sd)
    assert not b.load_state_dict(sd, strict=True).missing_keys
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for sa, sb in zip(_adam_state(a), _adam_state(b)):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    # identical continuation
    torch.manual_seed(1)
    a.update(_flow_step(seed=9))
    torch.manual_seed(1)
    b.update(_flow_step(seed=9))
    for pa, pb in zip(a.flow.parameters(), b.flow.parameters()):
        assert torch.equal(pa, pb)
    # a fresh term's (empty) optimizer state round-trips to empty
    c, d = _term(), _term()
    d.load_state_dict(c.state_dict(), strict=True)
    assert not d.flow_optimizer.optimizer.state
    # missing optimizer keys are reported under strict loading
    partial = {k: v for k, v in sd.items() if "flow_optimizer" not in k}
    with pytest.raises(RuntimeError, match="flow_optimizer"):
        _term().load_state_dict(partial, strict=True)


# ---------------------------------------------------------------------------- the term inside SemiSegmentor
def _ddfp_cfg():
    cfg = tiny_cfg(crop=(48, 64))
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label", "ddfp"]
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.0  # the random teacher is unconfident: keep every pixel
    cfg.SEMI.DDFP.THRESHOLD = 0.0
    cfg.SEMI.DDFP.FLOW_HIDDEN = [32, 32]
    cfg.SEMI.DDFP.FLOW_SAMPLES = 256
    cfg.SOLVER.MAX_ITER = 10
    cfg.SOLVER.BASE_LR = 0.01
    return cfg


def _train(model, optimizer, steps, seed0=0):
    losses = None
    for i in range(steps):
        with EventStorage(i):  # the step's iteration (the trainer's storage)
            losses = model(fake_batch(seed=seed0 + i))
        assert set(losses) == {"loss_sem_seg", "loss_pseudo_label", "loss_ddfp"}
        assert all(torch.isfinite(v) for v in losses.values()), losses
        metrics = model.pop_metrics()  # the trainer reads them right after the forward
        assert {"ddfp/flow_nll", "ddfp/flow_skipped"} <= set(metrics)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        model.after_optimizer_step()
    return losses


def test_tiny_semi_segmentor_trains_with_ddfp_and_keeps_flow_and_teacher_out_of_sgd():
    torch.manual_seed(0)
    cfg = _ddfp_cfg()
    model = build_model(cfg)
    model.train()
    term = model.terms["ddfp"]
    optimizer = build_optimizer(cfg, model)
    in_sgd = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_sgd for p in term.flow.parameters())
    assert not any(id(p) in in_sgd for p in model.teacher.parameters())
    assert all(id(p) in in_sgd for p in term.perturbed_norms.parameters())
    flow0 = [p.detach().clone() for p in term.flow.parameters()]
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    bn0 = term.perturbed_norms[0].running_mean.clone()
    losses = _train(model, optimizer, 3)
    assert float(losses["loss_ddfp"].detach()) > 0
    assert all(not torch.equal(a, b) for a, b in zip(flow0, term.flow.parameters()))
    for k, v in model.teacher.state_dict().items():  # only the EMA hook (not run here) moves the teacher
        assert torch.equal(v, teacher0[k]), k
    assert not torch.equal(bn0, term.perturbed_norms[0].running_mean)  # the perturbed pass has its own BN
    assert int(term.flow_skipped) == 0 and float(term.flow_nll) != 0


def test_ddfp_state_survives_checkpoint_save_and_load(tmp_path):
    torch.manual_seed(0)
    cfg = _ddfp_cfg()
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    _train(model, optimizer, 2)
    SemiSegCheckpointer(model, str(tmp_path)).save("model_final")
    fresh = build_model(cfg)
    SemiSegCheckpointer(fresh, str(tmp_path)).load(str(tmp_path / "model_final.pth"), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    a, b = model.terms["ddfp"], fresh.terms["ddfp"]
    assert len(_adam_state(a)) == len(a.flow_optimizer.params)
    for sa, sb in zip(_adam_state(a), _adam_state(b)):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
