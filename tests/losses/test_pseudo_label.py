"""Pseudo-label filters and the pseudo_label term keep exactly the expected pixels."""
import math

import pytest
import torch
import torch.nn.functional as F

from semiseg_d2.config import get_semiseg_cfg
from semiseg_d2.layers.label_ops import (class_balanced_keep_mask, class_quantile_thresholds, entropy_keep_mask,
                                         softmax_entropy, threshold_keep_mask)
from semiseg_d2.losses.registry import build_loss_terms
from semiseg_d2.modeling.heads.spec import HeadSpec
from semiseg_d2.losses.pseudo_label import pseudo_label_cross_entropy, rampup_factor


def test_threshold_keeps_confident_valid_pixels_only():
    conf = torch.tensor([[[0.99, 0.95, 0.949], [0.2, 0.96, 1.0]]])
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    keep = threshold_keep_mask(conf, valid, 0.95)
    assert keep.tolist() == [[[True, True, False], [False, True, False]]]


def test_entropy_drop_removes_the_highest_entropy_fraction_of_valid_pixels():
    # 10 valid pixels with distinct entropies 0..9 plus 2 invalid pixels of huge entropy.
    ent = torch.tensor([[3.0, 9.0, 1.0, 7.0, 100.0, 5.0], [0.0, 8.0, 2.0, 6.0, 4.0, 100.0]])[None]
    valid = torch.ones_like(ent, dtype=torch.bool)
    valid[0, 0, 4] = valid[0, 1, 5] = False
    keep = entropy_keep_mask(ent, valid, 30.0)  # drop floor(10 * 0.3) = 3 pixels: entropies 9, 8, 7
    kept_values = sorted(ent[keep].tolist())
    assert kept_values == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert not keep[~valid].any()
    # 0 % drops nothing (U2PL's percentile form would drop the maximum), 100 % drops everything.
    assert entropy_keep_mask(ent, valid, 0.0).sum() == 10
    assert entropy_keep_mask(ent, valid, 100.0).sum() == 0
    # A progress schedule passed as tensor works too (no host sync needed).
    assert entropy_keep_mask(ent, valid, torch.tensor(50.0)).sum() == 5


def test_softmax_entropy_matches_formula():
    p = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert softmax_entropy(p).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_label_ce_normalisation_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 1]]])
    keep = torch.tensor([[[True, False], [True, True]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    ce = F.cross_entropy(logits, target, reduction="none")
    kept_sum = ce[keep].sum()
    assert pseudo_label_cross_entropy(logits, target, keep, valid, normalize="all").item() == pytest.approx(
        (kept_sum / 3).item(), rel=1e-6
    )
    assert pseudo_label_cross_entropy(logits, target, keep, valid, normalize="kept").item() == pytest.approx(
        (kept_sum / 3).item(), rel=1e-6
    )
    w = torch.tensor([[[0.5, 1.0], [0.1, 2.0]]])
    expected = (ce * w * keep).sum() / valid.sum()
    assert pseudo_label_cross_entropy(logits, target, keep, valid, w).item() == pytest.approx(expected.item(), rel=1e-6)
    # Nothing kept: zero, not NaN.
    none = torch.zeros_like(keep)
    assert pseudo_label_cross_entropy(logits, target, none, none, normalize="kept").item() == 0.0
    # Low-resolution logits are upsampled to the label size.
    up = pseudo_label_cross_entropy(logits[..., :1, :1], target, keep, valid)
    assert torch.isfinite(up)


def test_rampup():
    assert rampup_factor("none", 0, 0, 100) == 1.0
    assert rampup_factor("linear", 50, 0, 100) == pytest.approx(0.5)
    assert rampup_factor("sigmoid", 0, 0, 100) == pytest.approx(math.exp(-5))
    assert rampup_factor("sigmoid", 200, 0, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown 'cosine'"):
        rampup_factor("cosine", 0, 0, 10)


def test_u2pl_normalisation_reproduces_reference_scaling():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 1]]])
    keep = torch.tensor([[[True, False], [True, True]]])
    ce = F.cross_entropy(logits, target, reduction="none")
    # U2PL: F.cross_entropy(ignore dropped) * (B*h*w / kept)
    expected = ce[keep].mean() * (4 / 3)
    got = pseudo_label_cross_entropy(logits, target, keep, keep, normalize="u2pl")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_semi_progress_counts_from_the_end_of_burn_in():
    from semiseg_d2.losses.step import SemiStep

    step = SemiStep(iteration=50, max_iter=150, burn_in_iters=50, num_classes=2, ignore_value=255,
                    labeled_images=None, labeled_targets=None, student_labeled={})
    assert step.semi_progress == 0.0 and step.progress == pytest.approx(1 / 3)
    step.iteration = 100
    assert step.semi_progress == pytest.approx(0.5)


def _brute_force_class_thresholds(conf, label, valid, num_classes, fraction):
    out = []
    for c in range(num_classes):
        values = sorted(conf[valid & (label == c)].tolist(), reverse=True)
        n_keep = math.ceil(len(values) * fraction)
        out.append(values[n_keep - 1] if n_keep > 0 else float("inf"))
    return torch.tensor(out)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_class_quantile_thresholds_match_a_per_class_sort(fraction):
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(3, 9, 11, generator=g)
    label = torch.randint(0, 5, (3, 9, 11), generator=g)  # class 5 of 6 never occurs
    valid = torch.rand(3, 9, 11, generator=g) > 0.2
    label[~valid] = 255  # invalid pixels carry the ignore value and must not count in any class
    got = class_quantile_thresholds(conf, label, valid, 6, fraction)
    want = _brute_force_class_thresholds(conf, label, valid, 6, fraction)
    assert torch.equal(got, want.to(got.dtype))
    assert math.isinf(got[5])


def test_class_balanced_filter_keeps_the_top_fraction_of_every_class_and_the_confident_pixels():
    # class 0 ("road"): 8 pixels at 0.95-0.99, all above the threshold; class 1 ("pole"): 6 pixels at 0.3-0.8
    conf = torch.tensor([[0.95, 0.96, 0.97, 0.98, 0.99, 0.95, 0.96, 0.97, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])
    label = torch.tensor([[0] * 8 + [1] * 6])
    valid = torch.ones_like(label, dtype=torch.bool)
    plain = threshold_keep_mask(conf, valid, 0.9)
    assert plain[0, 8:].sum() == 0  # the global threshold keeps no pole pixel
    keep = class_balanced_keep_mask(conf, label, valid, 0.9, 2, 0.5)
    assert keep[0, :8].all()  # every road pixel clears the global threshold (min(0.9, q_road) = 0.9)
    assert keep[0, 8:].tolist() == [False, False, False, True, True, True]  # the top 3 of 6 pole pixels
    assert torch.equal(class_balanced_keep_mask(conf, label, valid, 0.9, 2, 0.0), plain)
    valid[0, 13] = False  # the most confident pole pixel is padding: never kept, and not counted
    keep = class_balanced_keep_mask(conf, label, valid, 0.9, 2, 0.5)
    assert keep[0, 8:].tolist() == [False, False, True, True, True, False]  # ceil(5 / 2) = 3: 0.7, 0.6, 0.5


def test_pseudo_label_term_builds_the_class_balanced_filter_from_the_config():
    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label"]
    cfg.SEMI.PSEUDO_LABEL.FILTER = "class_balanced"
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.9
    cfg.SEMI.PSEUDO_LABEL.CLASS_KEEP_FRACTION = 0.25
    term = build_loss_terms(cfg, HeadSpec("TestHead", num_classes=3, feature_dim=8))["pseudo_label"]
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(2, 6, 7, generator=g)
    label = torch.randint(0, 3, (2, 6, 7), generator=g)
    valid = torch.ones_like(label, dtype=torch.bool)
    keep = term.keep_mask({"confidence": conf, "pseudo_label": label}, valid, 0.0)
    assert torch.equal(keep, class_balanced_keep_mask(conf, label, valid, 0.9, 3, 0.25))
    for c in range(3):  # each class keeps ceil(n_c / 4) pixels (distinct confidences below 0.9) plus those >= 0.9
        in_c = label == c
        expected = max(math.ceil(in_c.sum().item() * 0.25), (conf[in_c] >= 0.9).sum().item())
        assert keep[in_c].sum().item() == expected
    cfg.SEMI.PSEUDO_LABEL.FILTER = "class_balance"
    with pytest.raises(ValueError, match="class_balanced"):
        build_loss_terms(cfg, HeadSpec("TestHead", num_classes=3, feature_dim=8))
