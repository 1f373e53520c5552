"""memory_contrast / entropy / class_balance terms (Alonso et al. ICCV 2021): loss value, gradients, bank filling,
config errors, the shipped configs and split lists (training steps: test_numerics.py, test_train_e2e.py)."""
import glob
import itertools
import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage
from torch import nn

from semiseg_d2.config import get_semiseg_cfg
from semiseg_d2.data.splits.splits import SHIPPED_SPLITS_DIR, entry_id, read_list
from semiseg_d2.layers.class_attention import ClassAttentionSelectors
from semiseg_d2.losses.class_balance import ClassBalanceTerm, median_frequency_weights
from semiseg_d2.losses.entropy import EntropyTerm
from semiseg_d2.losses.memory_contrast import MemoryContrastTerm, memory_contrast_loss
from semiseg_d2.losses.step import SemiStep
from semiseg_d2.modeling.heads import build_sem_seg_head_checked
from semiseg_d2.modeling.heads.spec import HeadSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pairwise_eq_8_11(pred, labels, s_p, memory, valid, s_z):
    """Eqs. 8-11 written literally: per class, w = N S / sum S, mean over all (p, z) pairs of w_p w_z (1 - cos)."""
    C = memory.shape[0]
    total = torch.zeros(())
    for c in range(C):
        P = pred[labels == c]
        Z = memory[c][valid[c]]
        if len(P) == 0 or len(Z) == 0:
            continue
        wp = len(P) * s_p[labels == c] / s_p[labels == c].sum()
        wz = len(Z) * s_z[c][valid[c]] / s_z[c][valid[c]].sum()
        cos = torch.nn.functional.cosine_similarity(P[:, None], Z[None], dim=-1)
        total = total + (wp[:, None] * wz[None] * (1 - cos)).sum() / (len(P) * len(Z))
    return total / C


def test_loss_hand_computed():
    # class 0: p = (1, 0); memory (1, 0) and (0, 1) with selector scores 0.5 and 0.25 -> w_z = 4/3, 2/3;
    # distances 0 and 1 -> (4/3 * 0 + 2/3 * 1) / 2 = 1/3. Class 1 has an empty bank -> 0. Loss = (1/3) / C = 1/6.
    pred = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    labels = torch.tensor([0, 1])
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True], [False, False]])
    s_z = torch.tensor([[0.5, 0.25], [0.9, 0.9]])
    loss, per_class = memory_contrast_loss(pred, labels, torch.tensor([0.7, 0.2]), memory, valid, s_z)
    assert torch.allclose(per_class, torch.tensor([1 / 3, 0.0]))
    assert torch.allclose(loss, torch.tensor(1 / 6))


def test_loss_equals_literal_pairwise_form_and_masks():
    g = torch.Generator().manual_seed(0)
    C, M, D, N = 4, 5, 6, 30
    pred = torch.randn(N, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[:3] = 255  # ignored
    labels[labels == 2] = 1  # class 2 absent from the predictions
    memory = torch.randn(C, M, D, generator=g)
    valid = torch.rand(C, M, generator=g) > 0.3
    valid[3] = False  # class 3: empty bank
    s_p, s_z = torch.rand(N, generator=g), torch.rand(C, M, generator=g)
    loss, per_class = memory_contrast_loss(pred, labels, s_p, memory, valid, s_z)
    assert torch.allclose(loss, pairwise_eq_8_11(pred, labels, s_p, memory, valid, s_z), atol=1e-6)
    assert per_class[2] == 0 and per_class[3] == 0
    mask = torch.arange(N) < 15
    part, _ = memory_contrast_loss(pred, labels, s_p, memory, valid, s_z, pixel_mask=mask)
    kept = labels.clone()
    kept[~mask] = 255
    assert torch.allclose(part, pairwise_eq_8_11(pred, kept, s_p, memory, valid, s_z), atol=1e-6)
    empty, _ = memory_contrast_loss(pred, labels, s_p, memory, torch.zeros_like(valid), s_z)
    assert empty == 0 and torch.isfinite(empty)


def test_selectors_are_per_class_modules():
    torch.manual_seed(0)
    C, D, H = 3, 5, 4
    sel = ClassAttentionSelectors(C, D, H).eval()
    sel.norm.running_mean.uniform_(-1, 1)
    sel.norm.running_var.uniform_(0.5, 2)
    x, labels = torch.randn(7, D), torch.tensor([0, 2, 1, 1, 0, 2, 2])
    got = sel.score_pixels(x, labels)
    for n in range(7):  # reference: class c's own Linear-BN(eval)-LeakyReLU-Linear-sigmoid
        c = labels[n]
        h = x[n] @ sel.weight1[c] + sel.bias1[c]
        h = (h - sel.norm.running_mean[c]) / torch.sqrt(sel.norm.running_var[c] + 1e-5) * sel.norm.weight[c] + sel.norm.bias[c]
        want = torch.sigmoid(torch.nn.functional.leaky_relu(h, 0.2) @ sel.weight2[c] + sel.bias2[c])
        assert torch.allclose(got[n], want, atol=1e-5)
    assert sel.score_pixels(x[:0], labels[:0]).shape == (0,)  # no rows (e.g. no confident teacher pixel)
    dense = sel.score_per_class(x[:6].view(3, 2, D), torch.ones(3, 2, dtype=torch.bool))
    assert torch.allclose(dense.view(-1), sel.score_pixels(x[:6], torch.tensor([0, 0, 1, 1, 2, 2])), atol=1e-5)
    sel.train()  # training mode: per-class batch statistics over the valid entries only
    x3 = torch.randn(3, 4, D)
    valid = torch.tensor([[True, True, True, False]] * 3)
    a = sel.score_per_class(x3, valid)[:, :3]
    b = sel.score_per_class(x3[:, :3], valid[:, :3])
    assert torch.allclose(a, b, atol=1e-5)


def make_term(**kw):
    args = dict(num_classes=3, feature_dim=8, projection_dim=4, hidden_dim=6, selector_hidden_dim=5, bank_size=4,
                per_class_per_image=2, weight=0.1, start_iter=0)
    args.update(kw)
    return MemoryContrastTerm(**args)


def hand_step(term_dim=8, B=2, h=4, w=4, C=3, seed=0, feats_grad=True):
    g = torch.Generator().manual_seed(seed)
    fl = torch.randn(B, term_dim, h, w, generator=g).requires_grad_(feats_grad)
    fu = torch.randn(B, term_dim, h, w, generator=g).requires_grad_(feats_grad)
    targets = torch.randint(0, C, (B, 2 * h, 2 * w), generator=g)
    targets[:, :2] = 255
    pl = torch.randint(0, C, (B, 2 * h, 2 * w), generator=g)
    step = SemiStep(
        iteration=5, max_iter=10, num_classes=C, ignore_value=255, labeled_images=torch.zeros(B, 3, 2 * h, 2 * w),
        labeled_targets=targets, student_labeled={"features": fl}, student_strong={"features": fu},
        teacher_strong={"pseudo_label": pl, "valid": pl != 255},
    )
    return step, fl, fu


def test_gradients_reach_student_heads_and_selectors_not_teacher_or_bank():
    torch.manual_seed(0)
    term = make_term().train()
    term.bank.enqueue({"feat": torch.randn(6, 4)}, torch.tensor([0, 0, 1, 1, 2, 2]))
    step, fl, fu = hand_step()
    losses = term(step)
    assert set(losses) == {"loss_memory_contrast_labeled", "loss_memory_contrast_unlabeled"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert fl.grad is not None and fl.grad.abs().sum() > 0 and fu.grad.abs().sum() > 0
    for mod in (term.projection, term.prediction, term.selector, term.memory_selector):
        grads = [p.grad for p in mod.parameters()]
        assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads), mod
    for mod in (term.teacher_projection, term.teacher_memory_selector):
        assert all(p.grad is None and not p.requires_grad for p in mod.parameters())
    assert not term.bank.get("feat").requires_grad
    assert not term.teacher_projection.training and not term.teacher_memory_selector.training


def test_empty_bank_gives_zero_loss_and_start_iter():
    term = make_term(start_iter=0).train()
    step, _, _ = hand_step()
    losses = term(step)
    assert all(v == 0 and torch.isfinite(v) for v in losses.values())
    term = make_term(start_iter=100)
    assert all(v == 0 for v in term(hand_step()[0]).values())


RESNET_SHAPES = {"res2": ShapeSpec(channels=256, stride=4), "res4": ShapeSpec(channels=1024, stride=16),
                 "res5": ShapeSpec(channels=2048, stride=16)}


def head_spec(cfg, input_shape=RESNET_SHAPES) -> HeadSpec:
    """The spec of the head ``cfg`` builds on ``input_shape`` (what SemiSegmentor hands the terms)."""
    return build_sem_seg_head_checked(cfg, input_shape).spec()


def test_config_errors_name_the_keys():
    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "memory_contrast"]
    cfg.SEMI.MEMORY_CONTRAST.NUM_LABELED = 100
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV2Head"
    cfg.SEMI.MEMORY_CONTRAST.FEATURE_DIM = 256
    spec = head_spec(cfg)
    assert (spec.name, spec.feature_dim, spec.decode) == ("DeepLabV2Head", 2048, None)
    with pytest.raises(ValueError, match=r"FEATURE_DIM = 256.*DeepLabV2Head.*2048"):
        MemoryContrastTerm(cfg, spec)
    cfg.SEMI.MEMORY_CONTRAST.FEATURE_DIM = 2048
    assert MemoryContrastTerm(cfg, spec).per_class_per_image == 3  # max(1, round(256 / 100))
    for size in (0, -4):
        cfg.SEMI.MEMORY_CONTRAST.BANK_SIZE = size
        with pytest.raises(ValueError, match="SEMI.MEMORY_CONTRAST.BANK_SIZE"):
            MemoryContrastTerm(cfg, spec)
    cfg.SEMI.MEMORY_CONTRAST.BANK_SIZE = 256
    cfg.SEMI.MEMORY_CONTRAST.BANK_DATASETS = ["nope"]
    with pytest.raises(ValueError, match="BANK_DATASETS"):
        MemoryContrastTerm(cfg, spec)
    # The head's actual features disagree with the term (e.g. a custom head): error names both.
    term = make_term(feature_dim=16)
    with pytest.raises(ValueError, match=r"= 16 but the head's 'features' \(student, labeled\) have 8 channels"):
        term(hand_step()[0])
    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "class_balance"]
    with pytest.raises(ValueError, match="'class_balance' must come before"):
        ClassBalanceTerm(cfg, spec)


def test_feature_dim_comes_from_the_built_head_not_from_config_arithmetic():
    """FEATURE_DIM 0: the width of the head's 'features' as the built head reports it (a DPT head on a ViT: its own
    width, whatever RESNETS.* says)."""
    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "memory_contrast"]
    cfg.SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE = 1
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DPTHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["layer1", "layer2", "layer3", "layer4"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 24
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [8, 8, 8, 8]
    vit = {f"layer{i}": ShapeSpec(channels=40, stride=14) for i in range(1, 5)}
    term = MemoryContrastTerm(cfg, head_spec(cfg, vit))
    assert term.feature_dim == 24 and term.projection.in_dim == 24
    # a head whose width no config key states: the spec is all the term reads
    term = MemoryContrastTerm(cfg, HeadSpec("MyHead", num_classes=5, feature_dim=37))
    assert (term.feature_dim, term.num_classes) == (37, 5)


def test_labeled_image_count_is_derived_outside_the_term():
    """NUM_LABELED and PER_CLASS_PER_IMAGE 0: the term is built without K (no dataset read), filling the bank says
    which keys to set, and the trainer's config_with_dataset_values counts BANK_DATASETS' images."""
    from detectron2.data import DatasetCatalog

    from semiseg_d2.losses.registry import config_with_dataset_values

    cfg = get_semiseg_cfg()
    cfg.SEMI.LOSSES = ["supervised", "memory_contrast"]
    cfg.DATASETS.TRAIN_LABELED = ("mc_count_a", "mc_count_b")
    cfg.SEMI.MEMORY_CONTRAST.BANK_DATASETS = ["mc_count_b"]
    spec = HeadSpec("MyHead", num_classes=3, feature_dim=8)
    read = []
    for name, n in (("mc_count_a", 3), ("mc_count_b", 64)):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda name=name, n=n: read.append(name) or [{}] * n)
    term = MemoryContrastTerm(cfg, spec)
    assert term.per_class_per_image is None and not read
    step, _, _, _ = _filtered_step(C=3, D=8)
    with pytest.raises(ValueError, match="NUM_LABELED or PER_CLASS_PER_IMAGE"):
        term.candidates(step)
    resolved = config_with_dataset_values(cfg)
    assert read == ["mc_count_b"] and resolved.SEMI.MEMORY_CONTRAST.NUM_LABELED == 64
    assert cfg.SEMI.MEMORY_CONTRAST.NUM_LABELED == 0  # the caller's config is left as it was
    assert MemoryContrastTerm(resolved, spec).per_class_per_image == 4  # max(1, round(256 / 64))


def _filtered_step(C=3, B=2, h=4, w=4, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, C, (B, h, w), generator=g)
    targets[0, 0, :2] = 255
    logits = torch.nn.functional.one_hot(targets.clamp(0, C - 1), C).permute(0, 3, 1, 2).float() * 10
    wrong = torch.rand(B, h, w, generator=g) < 0.2  # teacher wrong there
    logits[:, 0][wrong] += 30
    logits[:, 1][wrong] += 20
    unsure = torch.rand(B, h, w, generator=g) < 0.2  # right but not confident enough
    logits = torch.where(unsure[:, None], logits * 0.1, logits)
    feats = torch.randn(B, D, h, w, generator=g)
    step, _, _ = hand_step(term_dim=D, B=B, h=h, w=w, C=C)
    step.labeled_targets = targets
    step.teacher_labeled = {"features": feats, "logits": logits}  # the engine's contract (semi.py adds it)
    conf, pred = logits.softmax(1).max(1)
    ok = (pred == targets) & (conf > 0.95)
    return step, feats, targets, ok


def test_bank_gets_only_filtered_pixels_topk_highest_by_selector():
    torch.manual_seed(0)
    term = make_term(feature_dim=4, projection_dim=4, per_class_per_image=2)
    step, feats, targets, ok = _filtered_step(D=4)
    term.teacher_projection = nn.Identity()  # z' = teacher features, so we know what enters
    term.teacher_memory_selector.score_pixels = lambda z, labels: z[:, 0]  # rank by the first coordinate
    values, labels = term.candidates(step)
    expected = []  # (image, class, vector): per image and class, the 2 filtered pixels with the highest score
    for b, c in itertools.product(range(2), range(3)):
        cand = feats[b].permute(1, 2, 0)[ok[b] & (targets[b] == c)]
        expected += [(b, c, tuple(v.tolist())) for v in cand[cand[:, 0].argsort(descending=True)][:2]]
    got = sorted((int(c), tuple(v.tolist())) for v, c in zip(values, labels))
    assert len(got) > 0 and got == sorted((c, v) for _, c, v in expected)
    # SSDA: only images of BANK_DATASETS fill the bank
    term.bank_datasets = ("city",)
    step.labeled_datasets = ["gta", "city"]
    values, labels = term.candidates(step)
    got = sorted((int(c), tuple(v.tolist())) for v, c in zip(values, labels))
    assert got == sorted((c, v) for b, c, v in expected if b == 1)
    step.labeled_datasets = None
    with pytest.raises(RuntimeError, match="labeled_datasets"):
        term.candidates(step)


def test_update_enqueues_and_the_ema_hook_updates_teacher_heads():
    from types import SimpleNamespace

    from semiseg_d2.engine.hooks import EMAHook

    torch.manual_seed(0)
    term = make_term(per_class_per_image=1)
    step, _, _, ok = _filtered_step(D=8)
    with torch.no_grad():
        for p in term.projection.parameters():
            p.add_(1.0)
        for b in term.memory_selector.buffers():
            b.add_(2.0)
    before = [p.clone() for p in term.teacher_projection.parameters()]
    term.update(step)
    assert 0 < int(term.bank.counts.sum()) <= 2 * 3
    assert all(torch.equal(t, b) for t, b in zip(term.teacher_projection.parameters(), before))  # the hook's job
    pairs = term.ema_pairs()
    assert [(p.teacher, p.student) for p in pairs] == [(term.teacher_projection, term.projection),
                                                        (term.teacher_memory_selector, term.memory_selector)]
    hook = EMAHook(0.5, "constant", burn_in_iters=0, max_iter=10, average_buffers=True)
    with EventStorage(3) as storage:
        hook.trainer = SimpleNamespace(iter=3, model=SimpleNamespace(ema_pairs=lambda: pairs), storage=storage)
        hook.after_step()
    for t, b, s in zip(term.teacher_projection.parameters(), before, term.projection.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s)  # the hook's momentum 0.5
    for (name, t), s in zip(term.teacher_memory_selector.named_buffers(), term.memory_selector.buffers()):
        assert torch.equal(t, s), name  # this pair copies its statistics whatever AVERAGE_BUFFERS says
    del step.teacher_labeled
    with pytest.raises(RuntimeError, match="teacher_labeled"):
        term.update(step)


def test_entropy_and_class_balance():
    logits = torch.zeros(1, 4, 2, 2, requires_grad=True)  # uniform: entropy log 4
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    step, _, _ = hand_step()
    step.student_strong = {"logits": logits}
    step.teacher_strong = {"valid": valid}
    loss = EntropyTerm(weight=0.01)(step)["loss_entropy"]
    assert torch.allclose(loss, torch.tensor(0.01 * torch.log(torch.tensor(4.0)).item()))
    assert torch.allclose(EntropyTerm(weight=1.0, normalize=True)(step)["loss_entropy"], torch.tensor(1.0))
    # alpha_c = sqrt(f_median / f_c); unseen classes get 1
    a = median_frequency_weights(torch.tensor([100.0, 25.0, 400.0, 0.0, 100.0]))
    assert torch.allclose(a, torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0]))
    term = ClassBalanceTerm(num_classes=3, momentum=0.0)
    step.labeled_targets = torch.tensor([[0, 0, 0, 0, 1, 255]])
    step.teacher_weak = {"pseudo_label": torch.tensor([[2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]])}
    assert term(step) == {} and torch.equal(step.class_weights, torch.ones(3))
    term.update(step)
    term(step)
    assert torch.allclose(step.class_weights, torch.tensor([1.0, 2.0, 0.5]))


CONFIG_DIRS = ("cityscapes", "voc", "gta5_city")


@pytest.mark.parametrize("path", sorted(p for d in CONFIG_DIRS for p in glob.glob(
    os.path.join(REPO, "configs", d, "memory_contrast_*.yaml"))))
def test_configs_load_and_name_registered_splits(path):
    from detectron2.data import DatasetCatalog

    import semiseg_d2  # noqa: F401  registers the datasets

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(path)
    if "Base" in os.path.basename(path):
        return
    assert "memory_contrast" in cfg.SEMI.LOSSES and "entropy" in cfg.SEMI.LOSSES
    assert cfg.SOLVER.MAX_ITER == 150000 and cfg.SEMI.EMA.SCHEDULE == "cosine"
    for name in list(cfg.DATASETS.TRAIN_LABELED) + list(cfg.DATASETS.TRAIN_UNLABELED) + list(cfg.DATASETS.TEST):
        assert name in DatasetCatalog.list(), name
    n = cfg.SEMI.MEMORY_CONTRAST.NUM_LABELED
    bank_sets = list(cfg.SEMI.MEMORY_CONTRAST.BANK_DATASETS) or list(cfg.DATASETS.TRAIN_LABELED)
    lists = [s.replace("cityscapes_fine_train_", "cityscapes/").replace("voc_2012_seg_train_aug_", "pascal/")
             .replace("_labeled", "") for s in bank_sets]
    assert n == sum(len(read_list(os.path.join(SHIPPED_SPLITS_DIR, l, "labeled.txt"))) for l in lists)
    assert ("class_balance" in cfg.SEMI.LOSSES) == ("voc" not in path)
    term = MemoryContrastTerm(cfg, head_spec(cfg))  # feature dim agrees with the head, K from NUM_LABELED
    assert term.per_class_per_image == max(1, round(256 / n))


@pytest.mark.parametrize("n,ratio", [(99, 30), (198, 15), (496, 6), (992, 3)])
def test_ssda_cityscapes_subsets(n, ratio):
    full = set()
    for d in ("186", "372", "744", "1488"):
        for part in ("labeled", "unlabeled"):
            full |= {entry_id(e) for e in read_list(os.path.join(SHIPPED_SPLITS_DIR, "cityscapes", d, f"{part}.txt"))}
    assert len(full) == 2975
    lab = [entry_id(e) for e in read_list(os.path.join(SHIPPED_SPLITS_DIR, "cityscapes", str(n), "labeled.txt"))]
    unl = [entry_id(e) for e in read_list(os.path.join(SHIPPED_SPLITS_DIR, "cityscapes", str(n), "unlabeled.txt"))]
    assert len(lab) == n == round(2975 / ratio) and not set(lab) & set(unl) and set(lab) | set(unl) == full
