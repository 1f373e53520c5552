"""sem_seg_cross_entropy / ohem_cross_entropy against hand-computed values."""
import math

import torch
from torch.nn import functional as F

from semiseg_d2.losses.segmentation import ohem_cross_entropy, sem_seg_cross_entropy

IGN = 255


def _binary_logits(gt_probs, gt_labels):
    """[1, 2, 1, N] logits whose softmax gives probability p to the listed class of each pixel."""
    logits = torch.zeros(1, 2, 1, len(gt_probs))
    for i, (p, c) in enumerate(zip(gt_probs, gt_labels)):
        logits[0, c, 0, i] = math.log(p / (1 - p))  # other class logit stays 0
    return logits


def test_cross_entropy_hand_computed_with_ignore():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[-1.0, 3.0]]]])  # [1, 3, 1, 2]
    target = torch.tensor([[[0, IGN]]])
    expected = -(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)))  # only pixel 0 counts
    assert math.isclose(float(sem_seg_cross_entropy(logits, target, IGN)), expected, rel_tol=1e-6)
    target = torch.tensor([[[0, 2]]])
    second = -(3.0 - math.log(1.0 + math.exp(1.0) + math.exp(3.0)))
    assert math.isclose(float(sem_seg_cross_entropy(logits, target, IGN)), (expected + second) / 2, rel_tol=1e-6)
    # per-pixel weight: sum(w * ce) / #valid
    w = torch.tensor([[[0.5, 2.0]]])
    got = float(sem_seg_cross_entropy(logits, target, IGN, weight=w))
    assert math.isclose(got, (0.5 * expected + 2.0 * second) / 2, rel_tol=1e-6)


def test_cross_entropy_upsamples_logits_to_label_size():
    # Spatially constant logits stay constant under bilinear upsampling: every pixel has the same CE.
    logits = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 3, 5).contiguous()
    target = torch.full((2, 12, 20), 2, dtype=torch.long)
    target[0, :4] = IGN
    expected = -(0.5 - math.log(math.exp(1.0) + math.exp(-2.0) + math.exp(0.5)))
    assert math.isclose(float(sem_seg_cross_entropy(logits, target, IGN)), expected, rel_tol=1e-6)
    # Non-constant logits: equals CE of the bilinear (align_corners=False) upsampled logits.
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3, 5)
    target = torch.randint(0, 3, (2, 12, 20))
    up = F.interpolate(logits, size=(12, 20), mode="bilinear", align_corners=False)
    ref = -up.log_softmax(1).gather(1, target[:, None]).mean()
    torch.testing.assert_close(sem_seg_cross_entropy(logits, target, IGN), ref)


def test_all_ignored_gives_zero_without_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGN)
    for loss in (sem_seg_cross_entropy(logits, target, IGN), ohem_cross_entropy(logits, target, IGN, min_kept=3)):
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_ohem_hand_computed():
    probs = [0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 0.05]
    labels = [1, 0, 1, 0, 1, 1, 1]
    logits = _binary_logits(probs, labels)
    target = torch.tensor([labels[:6] + [IGN]]).view(1, 1, 7)  # last (lowest-prob) pixel is ignored
    ce = [-math.log(p) for p in probs[:6]]

    def ohem(min_kept):
        return float(ohem_cross_entropy(logits, target, IGN, thresh=0.7, min_kept=min_kept))

    assert math.isclose(ohem(0), sum(ce[:3]) / 3, rel_tol=1e-5)  # p < 0.7
    assert math.isclose(ohem(2), sum(ce[:3]) / 3, rel_tol=1e-5)  # threshold already keeps more than 2
    assert math.isclose(ohem(5), sum(ce[:5]) / 5, rel_tol=1e-5)  # 5 hardest
    assert math.isclose(ohem(100), sum(ce) / 6, rel_tol=1e-5)  # fewer valid pixels than min_kept: all valid
    # gradient only reaches kept pixels
    logits.requires_grad_(True)
    ohem_cross_entropy(logits, target, IGN, thresh=0.7, min_kept=4).backward()
    grad_per_pixel = logits.grad.abs().sum(1).flatten()
    assert (grad_per_pixel[:4] > 0).all() and (grad_per_pixel[4:] == 0).all()


def test_ohem_upsamples_and_matches_cross_entropy_when_everything_is_kept():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 20, 24))
    target[1, :3] = IGN
    torch.testing.assert_close(
        ohem_cross_entropy(logits, target, IGN, thresh=1.01, min_kept=0), sem_seg_cross_entropy(logits, target, IGN)
    )
