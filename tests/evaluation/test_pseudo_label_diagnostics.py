"""SEMI.DIAGNOSTICS: the unlabeled frames' ground truth rides along pixel-aligned with the views, never changes a
loss or a gradient, and the logged figures are the hand-computed ones."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from detectron2.modeling import build_model

from semiseg_d2.data.build import build_semi_train_loader
from semiseg_d2.data.mapper import SemSegDatasetMapper
from semiseg_d2.evaluation.pseudo_label_diagnostics import DIAGNOSTIC_GT_KEY, PseudoLabelDiagnostics
from tests.tiny import semi_cfg


def _cfg(diagnostics: bool):
    cfg = semi_cfg(**{"SEMI.PSEUDO_LABEL.THRESHOLD": 0.1, "SEMI.MIX.PROB": 1.0})
    cfg.DATASETS.TRAIN_LABELED = ("camvid_mini_train_5_labeled",)
    cfg.DATASETS.TRAIN_UNLABELED = ("camvid_mini_train_5_unlabeled",)
    cfg.INPUT.SCALE_RANGE = [0.1, 0.15]
    cfg.SEMI.DIAGNOSTICS.ENABLED = diagnostics
    cfg.SEMI.DIAGNOSTICS.GT_DATASETS = ("camvid_mini_train",)
    return cfg


def _first_batch(cfg):
    loader = build_semi_train_loader(cfg)
    loader.set_start(0)
    return next(iter(loader))


def test_ground_truth_follows_the_views_geometry():
    cfg = _cfg(True)
    _, unlabeled = _first_batch(cfg)
    by_file = {r["file_name"]: r for r in DatasetCatalog.get("camvid_mini_train")}
    labeled_mapper = SemSegDatasetMapper(cfg, True)
    for u in unlabeled:
        gt = u[DIAGNOSTIC_GT_KEY]
        assert gt.shape == u["valid"].shape and gt.dtype == torch.long
        assert bool((gt[~u["valid"]] == 255).all()) and bool((gt[u["valid"]] != 255).any())
    # same random draws: the unlabeled view with its GT equals the labeled mapper's crop of that frame
    from semiseg_d2.data.build import _unlabeled_mapper

    mapper = _unlabeled_mapper(cfg, cfg.DATASETS.TRAIN_UNLABELED)
    record = {k: v for k, v in by_file[unlabeled[0]["file_name"]].items() if k != "sem_seg_file_name"}
    np.random.seed(3)
    view = mapper(record)
    np.random.seed(3)
    reference = labeled_mapper(by_file[record["file_name"]])
    assert torch.equal(view["image"], reference["image"])
    assert torch.equal(view[DIAGNOSTIC_GT_KEY], reference["sem_seg"])


def test_losses_and_gradients_are_identical_with_and_without_the_ground_truth():
    with_gt, without = _first_batch(_cfg(True)), _first_batch(_cfg(False))
    assert all(DIAGNOSTIC_GT_KEY in u for u in with_gt[1]) and not any(DIAGNOSTIC_GT_KEY in u for u in without[1])
    for a, b in zip(with_gt[1], without[1]):
        for key in ("image", "image_strong", "valid"):
            assert torch.equal(a[key], b[key]), key
    results = []
    for cfg, batch in ((_cfg(True), with_gt), (_cfg(False), without)):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        torch.manual_seed(1)  # the mixing masks
        with EventStorage(1):
            losses = model(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        results.append((losses, grads, model.pop_metrics()))
    (l1, g1, m1), (l2, g2, m2) = results
    assert set(l1) == set(l2) == {"loss_sem_seg", "loss_pseudo_label"}
    for k in l1:
        assert torch.equal(l1[k], l2[k]), k
    assert set(g1) == set(g2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert not any(k.startswith("pl_diag/") for k in m2)
    assert 0.0 <= float(m1["pl_diag/kept_fraction"]) <= 1.0
    assert 0.0 <= float(m1["pl_diag/all_accuracy"]) <= 1.0
    assert "pl_diag/precision-road" in m1 and "pl_diag/recall-sky" in m1


def test_figures_match_hand_counts_over_the_window():
    diag = PseudoLabelDiagnostics(["a", "b", "c"], ignore_value=255, window=2)
    pseudo = torch.tensor([[[0, 0, 1, 1, 2, 255]]])
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    kept = torch.tensor([[[True, True, True, False, True, False]]])
    gt = torch.tensor([[[0, 1, 1, 1, 255, 255]]])
    step = SimpleNamespace(teacher_strong={"pseudo_label": pseudo, "valid": valid}, keep_masks={"pseudo_label": kept})
    out = diag(step, gt)
    assert float(out["pl_diag/kept_fraction"]) == pytest.approx(4 / 5)
    # kept with GT: pixels 0,1,2 (pixel 4 has no GT): right 0 and 2 -> 2/3
    assert float(out["pl_diag/kept_accuracy"]) == pytest.approx(2 / 3)
    # all valid with GT: pixels 0..3, right 0, 2, 3 -> 3/4
    assert float(out["pl_diag/all_accuracy"]) == pytest.approx(3 / 4)
    assert float(out["pl_diag/precision-a"]) == pytest.approx(1 / 2)  # kept 'a' with GT: pixels 0, 1
    assert float(out["pl_diag/precision-b"]) == pytest.approx(1.0)  # kept 'b' with GT: pixel 2
    assert math.isnan(float(out["pl_diag/precision-c"]))  # kept 'c' only where there is no GT
    assert float(out["pl_diag/recall-b"]) == pytest.approx(1 / 3)  # GT 'b': 1, 2, 3; kept right: 2
    assert float(out["pl_diag/kept_share-c"]) == pytest.approx(1 / 4)
    # a second step (window 2) adds its counts; a third drops the first
    step2 = SimpleNamespace(teacher_strong={"pseudo_label": torch.tensor([[[1]]]), "valid": torch.tensor([[[True]]])},
                            keep_masks={"pseudo_label": torch.tensor([[[True]]])})
    out = diag(step2, torch.tensor([[[1]]]))
    assert float(out["pl_diag/recall-b"]) == pytest.approx(2 / 4)
    assert float(out["pl_diag/kept_accuracy"]) == pytest.approx(3 / 4)
    out = diag(step2, torch.tensor([[[1]]]))
    assert float(out["pl_diag/recall-b"]) == pytest.approx(1.0)


def test_missing_ground_truth_dataset_is_named():
    cfg = _cfg(True)
    cfg.SEMI.DIAGNOSTICS.GT_DATASETS = ()
    with pytest.raises(ValueError, match="GT_DATASETS"):
        build_semi_train_loader(cfg)
    cfg.SEMI.DIAGNOSTICS.GT_DATASETS = ("camvid_mini_val",)  # other frames
    with pytest.raises(KeyError, match="no ground truth"):
        build_semi_train_loader(cfg)


@pytest.mark.parametrize("term", ["pseudo_label", "unimatch", "unimatch_v2"])
def test_kept_pixels_are_those_of_the_runs_filtering_term(term):
    """UniMatch runs have no pseudo_label term: their kept pixels are the unimatch term's, not every valid pixel."""
    diag = PseudoLabelDiagnostics(["a", "b"], ignore_value=255)
    pseudo = torch.tensor([[[0, 1, 1, 0]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    kept = torch.tensor([[[True, False, False, False]]])
    step = SimpleNamespace(teacher_strong={"pseudo_label": pseudo, "valid": valid}, keep_masks={term: kept})
    assert float(diag(step, torch.tensor([[[0, 1, 0, 0]]]))["pl_diag/kept_fraction"]) == pytest.approx(1 / 4)
    none = SimpleNamespace(teacher_strong={"pseudo_label": pseudo, "valid": valid}, keep_masks={"dgcl": kept})
    assert float(PseudoLabelDiagnostics(["a", "b"], 255)(none, torch.zeros(1, 1, 4, dtype=torch.long))[
        "pl_diag/kept_fraction"]) == 1.0  # no filtering term: every valid pixel
