"""Pseudo-label filters and the pseudo_label term keep exactly the expected pixels."""
import math

import pytest
import torch
import torch.nn.functional as F

from semiseg_d2.layers.label_ops import entropy_keep_mask, softmax_entropy, threshold_keep_mask
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
