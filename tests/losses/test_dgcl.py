"""DGCL: sampling, loss against hand-computed InfoNCE, empty/unfilled classes, bank update (filtering,
density at insertion, identical on 2 gloo ranks), and a tiny SemiSegmentor training a few steps."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from semiseg_d2.layers.density import knn_density, knn_density_grouped
from semiseg_d2.losses.contrastive import (
    group_pixels_by_class,
    info_nce,
    sample_negatives_per_class,
    sample_pixels_per_class,
)
from semiseg_d2.layers.density import class_density_blocked
from semiseg_d2.losses.dgcl import (
    DGCLTerm,
    dgcl_contrastive_loss,
    select_anchors_and_positives,
)
from semiseg_d2.losses.step import SemiStep
from tests.tiny import TINY_DGCL, fake_batch, semi_cfg


def small_term(**kw):
    args = dict(num_classes=3, feature_dim=4, proj_dim=4, weight=1.0, num_anchors=2, num_positives=1,
                num_negatives=100, max_pixels_per_class=100, memory_size=8, update_per_class=100, min_fill=4,
                density_ks=(1, 2), drop_percent=0.0, min_drop_percent=0.0)
    args.update(kw)
    return DGCLTerm(**args)


# ------------------------------------------------------------------ sampling
def test_group_pixels_by_class_and_negatives():
    labels = torch.tensor([0, 1, 255, 0, 2, 0, 1, 0])
    index, valid = group_pixels_by_class(labels, 3, max_per_class=3)
    assert index.shape == (3, 3)
    assert valid.sum(1).tolist() == [3, 2, 1]
    for c in range(3):
        got = index[c][valid[c]]
        assert (labels[got] == c).all() and got.unique().numel() == got.numel()
    # with scores: the highest-scoring pixels of each class, in order
    scores = torch.tensor([0.1, 0.5, 9.0, 0.9, 0.2, 0.4, 0.6, 0.3])
    index, valid = group_pixels_by_class(labels, 3, 2, scores=scores)
    assert index[0][valid[0]].tolist() == [3, 5] and index[1][valid[1]].tolist() == [6, 1]
    keep = sample_pixels_per_class(labels, 3, 1)
    assert keep.sum() == 3 and not keep[2]
    n_index, n_ok = sample_negatives_per_class(labels, 3, 4)
    for c in range(3):
        got = n_index[c][n_ok[c]]
        assert ((labels[got] != c) & (labels[got] != 255)).all()
        assert n_ok[c].sum() == min(4, int(((labels != c) & (labels != 255)).sum()))


def test_blocked_density_equals_padded_density():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(23), torch.ones(5), torch.full((3,), 3), torch.full((4,), 255)]).long()
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    feats = torch.randn(labels.numel(), 6, generator=g)
    bank = torch.randn(4, 9, 6, generator=g)
    count = torch.tensor([9, 2, 0, 5])
    index, valid = group_pixels_by_class(labels, 4, 20)
    ref = knn_density_grouped(feats[index], bank, count, ks=(1, 3))
    for block, max_elements in ((4, 40), (7, 10 ** 6), (64, 1)):
        got = class_density_blocked(feats, index, valid, bank, count, (1, 3), block=block, max_elements=max_elements)
        assert torch.allclose(got[valid], ref[valid], atol=1e-6) and (got[~valid] == 0).all()


def test_select_anchors_and_positives_picks_expected_entries():
    density = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.0],
                            [0.2, 0.8, 0.4, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, True, False],  # the 0.0 entry is padding
                          [True, True, True, False, False, False]])
    a, a_ok, p, p_ok = select_anchors_and_positives(density, valid, num_anchors=2, num_positives=2)
    assert a[0].tolist() == [1, 3] and a_ok[0].all()  # lowest densities 0.1, 0.3 (padding 0.0 never picked)
    assert p[0].tolist() == [2, 4] and p_ok[0].all()  # highest 0.9, 0.7
    assert a[1].tolist() == [0, 2] and p[1].tolist() == [1, 2]
    # fewer valid entries than requested: all of them, then invalid slots
    a, a_ok, p, p_ok = select_anchors_and_positives(density, valid, num_anchors=4, num_positives=4)
    assert a_ok[1].tolist() == [True, True, True, False]
    assert set(a[1][:3].tolist()) == {0, 1, 2}


# ------------------------------------------------------------------ loss
def _hand_info_nce(a, p, negs, t):
    cos = lambda u, v: sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))
    pos = math.exp(cos(a, p) / t)
    return -math.log(pos / (pos + sum(math.exp(cos(a, n) / t) for n in negs)))


def test_info_nce_and_class_loss_match_hand_computation():
    a = [[1.0, 0.0], [0.6, 0.8]]
    p = [0.0, 2.0]
    negs = [[1.0, 1.0], [-1.0, 0.5]]
    expected = [_hand_info_nce(x, p, negs, 0.5) for x in a]
    got = info_nce(torch.tensor(a), torch.tensor([p]), torch.tensor(negs), 0.5)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    # class 0: two anchors, one invalid negative slot; class 1: inactive (no valid anchors) -> excluded
    anchors = torch.tensor([a, [[9.0, 9.0], [9.0, 9.0]]])
    negatives = torch.tensor([negs + [[5.0, -5.0]], negs + [[1.0, 0.0]]])
    n_ok = torch.tensor([[True, True, False], [True, True, True]])
    loss, per_class = dgcl_contrastive_loss(anchors, torch.tensor([[True, True], [False, False]]),
                                            torch.tensor([p, p]), negatives, n_ok, torch.tensor([True, True]), 0.5)
    assert math.isclose(loss.item(), sum(expected) / 2, rel_tol=1e-6)
    assert per_class[1] == 0


def _fill(term, c, feats, proj, density):
    term.bank.enqueue({"feat": feats, "proj": proj, "density": density}, torch.full((feats.shape[0],), c))


def test_loss_from_pixels_on_constructed_example():
    torch.manual_seed(0)
    term = small_term()
    e = torch.eye(4)
    # class 0 bank: 4 copies of e0 -> density of a pixel = its cosine to e0; class 1 bank: e1; class 2 empty
    _fill(term, 0, e[0].repeat(4, 1), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
          torch.tensor([0.1, 0.9, 0.3, 0.2]))  # best stored density: entry 1 (proj e1)
    _fill(term, 1, e[1].repeat(4, 1), e[2].repeat(4, 1), torch.zeros(4))
    angles = torch.tensor([0.0, 0.3, 0.6, 0.9])  # class 0 pixels: cos to e0 decreasing
    f0 = torch.stack([angles.cos(), angles.sin(), torch.zeros(4), torch.zeros(4)], 1)
    f1 = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    feats = torch.cat([f0, f1, torch.tensor([[0.0, 0.0, 0.0, 1.0]])])  # last pixel: ignore
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 255])
    proj = torch.randn(7, 4, requires_grad=True)
    loss, per_class, active = term.loss_from_pixels(feats, proj, labels)
    assert active.tolist() == [True, True, False]
    # class 0: anchors = pixels 3, 2 (lowest cos); positives: pixel 0 (highest) + bank entry 1 (proj e1)
    proto0 = (proj[0].detach() + e[1]) / 2
    l0 = info_nce(proj[[3, 2]], proto0[None], proj[[4, 5]].detach(), 0.5).mean()
    # class 1: bank e1 -> pixel 4 has density 1, pixel 5 lower: anchors both, positive pixel 4 + bank proj e2
    proto1 = (proj[4].detach() + e[2]) / 2
    l1 = info_nce(proj[[4, 5]], proto1[None], proj[[0, 1, 2, 3]].detach(), 0.5).mean()
    assert torch.allclose(per_class[:2], torch.stack([l0, l1]).detach(), atol=1e-6)
    assert torch.allclose(loss, (l0 + l1) / 2, atol=1e-6)
    loss.backward()
    assert proj.grad[[0, 1, 2, 3, 4, 5]].abs().sum(1).gt(0).tolist() == [False, False, True, True, True, True]
    assert proj.grad[6].abs().sum() == 0


def test_absent_and_unfilled_classes_give_zero_not_nan():
    term = small_term(min_fill=4)
    _fill(term, 0, torch.randn(3, 4), torch.randn(3, 4), torch.rand(3))  # 3 < MIN_FILL
    feats = torch.randn(5, 4)
    proj = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 255, 1])  # class 1 has an empty bank, class 2 is absent
    loss, per_class, active = term.loss_from_pixels(feats, proj, labels)
    assert not active.any() and loss.item() == 0 and torch.isfinite(per_class).all()
    loss.backward()
    assert torch.isfinite(proj.grad).all() and proj.grad.abs().sum() == 0
    # only ignore pixels at all
    loss, _, _ = term.loss_from_pixels(feats, proj, torch.full((5,), 255))
    assert loss.item() == 0


# ------------------------------------------------------------------ bank update
def _fake_step(bl=1, bu=1, h=4, w=4, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (bl, h, w), generator=g)
    targets[0, 0, :2] = 255
    logits = torch.randn(bu, c, h, w, generator=g) * 3
    logits[0, :, 1] = 0.0  # row 1 of the unlabeled image: uniform probabilities = highest entropy
    feats = torch.randn(bl + bu, d, h, w, generator=g)
    return SemiStep(
        iteration=0, max_iter=10, num_classes=c, ignore_value=255, labeled_images=None,
        labeled_targets=targets, student_labeled={"features": feats[:bl]}, student_weak={"features": feats[bl:]},
        teacher_weak={"logits": logits, "features": feats[bl:] * 2}, unlabeled_valid=torch.ones(bu, h, w, dtype=torch.bool),
    )


def test_update_enqueues_only_filtered_pixels_with_density_at_insertion():
    term = small_term(drop_percent=25.0, memory_size=64)  # drop 25 % of 16 unlabeled pixels = row 1
    step = _fake_step()
    labels = term.contrast_labels(step, (4, 4))
    assert (labels[1, 1] == 255).all() and (labels[1, [0, 2, 3]] != 255).all()
    assert (labels[0, 0, :2] == 255).all()
    # first update: empty bank -> density 0; entries = exactly the non-ignored pixels
    term(step)
    term.update(step)
    feats = torch.cat([step.student_labeled["features"], step.student_weak["features"]]).permute(0, 2, 3, 1).reshape(-1, 4)
    flat = labels.reshape(-1)
    for c in range(3):
        n = int(term.bank.count[c])
        assert n == int((flat == c).sum())
        stored = term.bank.get("feat")[c, :n]
        expected = feats[flat == c]
        assert torch.allclose(stored.sort(0).values, expected.sort(0).values)
    assert (term.bank.get("density") == 0).all()
    # second update: stored density = kNN density against the bank as it was before the insertion
    before = {k: v.clone() for k, v in term.bank.state_dict().items()}
    step2 = _fake_step(seed=1)
    term(step2)
    term.update(step2)
    for c in range(3):
        n0, n1 = int(before["count"][c]), int(term.bank.count[c])
        new = term.bank.get("feat")[c, n0:n1]
        dens = term.bank.get("density")[c, n0:n1]
        ref = knn_density(new, before["bank_feat"][c, :n0], ks=(1, 2))
        assert n1 > n0 and torch.allclose(dens, ref, atol=1e-6)


def test_feature_dim_mismatch_names_both_dims():
    term = small_term(feature_dim=8)
    try:
        term(_fake_step(d=4))
    except ValueError as e:
        assert "D=4" in str(e) and "D=8" in str(e)
    else:
        raise AssertionError("no error on a feature-dim mismatch")


def _ddp_worker(rank, world, init_file, out_dir):
    """One 2-rank gloo run for the tests below (spawning is the slow part): bank update, official gradient."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _bank_update_on_rank(rank, out_dir)
        _official_grad_on_rank(rank, world, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_gloo_ranks():
    """Directory with the files ``_ddp_worker`` wrote on 2 gloo ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        yield tmp


def _bank_update_on_rank(rank, out_dir):
    torch.manual_seed(rank)  # different local sampling streams on purpose
    term = small_term(update_per_class=5, memory_size=12)
    for it in range(3):
        step = _fake_step(seed=10 * it + rank, h=6, w=6)  # different data on each rank
        step.iteration = it
        term.train()
        term(step)
        term.update(step)
    torch.save(term.bank.state_dict(), os.path.join(out_dir, f"bank{rank}.pt"))


def test_bank_identical_on_two_gloo_ranks(two_gloo_ranks):
    a = torch.load(os.path.join(two_gloo_ranks, "bank0.pt"))
    b = torch.load(os.path.join(two_gloo_ranks, "bank1.pt"))
    assert int(a["count"].sum()) > 0 and (a["count"] <= 12).all()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_start_all_classes_waits_for_every_bank_like_check_if_full():
    """Official start: ``memobank.check_if_full()`` over every class (skipped ones included), class 0 skipped."""
    feats, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 255, 1])
    for start in ("per_class", "all_classes"):
        term = small_term(min_fill=4, memory_size=4, start=start, skip_classes=[0] if start == "all_classes" else [])
        _fill(term, 0, torch.randn(4, 4), torch.randn(4, 4), torch.rand(4))
        _fill(term, 1, torch.randn(4, 4), torch.randn(4, 4), torch.rand(4))
        _fill(term, 2, torch.randn(3, 4), torch.randn(3, 4), torch.rand(3))  # class 2 (absent) not full yet
        proj = torch.randn(6, 4, requires_grad=True)
        _, _, active = term.loss_from_pixels(feats, proj, labels)
        assert active.tolist() == ([True, True, False] if start == "per_class" else [False, False, False])
        _fill(term, 2, torch.randn(1, 4), torch.randn(1, 4), torch.rand(1))  # now every bank is full
        loss, per_class, active = term.loss_from_pixels(feats, proj, labels)
        # per_class: classes 0 and 1 contribute; official: class 1 only (class 0 skipped, class 2 absent)
        assert active.tolist() == ([True, True, False] if start == "per_class" else [False, True, False])
        assert torch.allclose(loss, per_class[active].mean())
    with pytest.raises(ValueError, match="SEMI.DGCL.START"):
        small_term(start="official")


def _official_grad_on_rank(rank, world, out_dir):
    """Both sides of one step on each rank: the official ``dist.all_reduce(contra_loss); contra_loss /= world_size;
    (0.5 * contra_loss).backward()`` and ours (WEIGHT 0.5 with OFFICIAL_WORLD_SIZE = world / = 0), each followed by
    DDP's gradient average."""
    step = _fake_step(seed=rank, h=6, w=6)  # different data on each rank

    def grads(**kw):
        torch.manual_seed(0)  # same projection head on every rank and both sides, same random draws
        term = small_term(min_fill=1, memory_size=12, **kw)
        g = torch.Generator().manual_seed(1)
        for c in range(3):
            _fill(term, c, torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.rand(6, generator=g))
        torch.manual_seed(2)
        loss = term(step)["loss_dgcl"]
        if kw.get("weight") == 1.0:  # the official code on the unweighted loss
            dist.all_reduce(loss)  # in place, not recorded by autograd
            loss = 0.5 * (loss / world)
        loss.backward()
        out = []
        for p in term.proj.parameters():
            dist.all_reduce(p.grad)  # DDP: mean of the ranks' gradients
            out.append(p.grad / world)
        return torch.cat([x.reshape(-1) for x in out])

    result = {"official": grads(weight=1.0), "switch": grads(weight=0.5, official_world_size=world),
              "ours": grads(weight=0.5)}
    torch.save(result, os.path.join(out_dir, f"grads{rank}.pt"))


def test_official_world_size_reproduces_the_official_contrastive_gradient(two_gloo_ranks):
    r = torch.load(os.path.join(two_gloo_ranks, "grads0.pt"))
    g_official, g_switch, g_ours = r["official"], r["switch"], r["ours"]
    assert g_official.abs().sum() > 0
    torch.testing.assert_close(g_switch, g_official, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g_ours, 2 * g_official, atol=1e-7, rtol=1e-6)  # ours: the full 0.5, not 0.5 / W


# ------------------------------------------------------------------ in the engine
def test_tiny_semi_segmentor_trains_with_dgcl():
    torch.manual_seed(0)
    cfg = semi_cfg(**TINY_DGCL)
    model = build_model(cfg)
    model.train()
    term = model.terms["dgcl"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seen = []
    for it in range(4):
        with EventStorage(it):  # the step's iteration (the trainer's storage)
            losses = model(fake_batch(seed=it))
        assert set(losses) == {"loss_sem_seg", "loss_pseudo_label", "loss_dgcl"}
        assert all(torch.isfinite(v) for v in losses.values())
        seen.append(losses["loss_dgcl"].item())
        opt.zero_grad()
        if it == 3:
            losses["loss_dgcl"].backward()  # the dgcl loss alone reaches the projection and the student
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.proj.parameters())
            head = model.student.sem_seg_head
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
            assert all(not b.requires_grad and b.grad_fn is None for b in term.bank.buffers())
        else:
            sum(losses.values()).backward()
        opt.step()
        model.after_optimizer_step()
    assert seen[0] == 0.0  # empty bank: no class has MIN_FILL entries
    assert seen[-1] > 0  # banks filled after a few updates
    assert int(term.bank.count.max()) > 0


def test_projected_rows_equal_the_projection_rows_and_their_gradients():
    from semiseg_d2.losses.contrastive import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 5)
    x = torch.randn(30, 6, requires_grad=True)
    index = torch.tensor([[3, 7, 7], [0, 29, 11]])
    full = head(x)
    (full[index] * torch.arange(6.0).view(2, 3, 1)).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    x.grad = None
    head.zero_grad()
    rows = head.project_rows(x)
    got = rows[index]
    assert torch.allclose(got, full[index], atol=1e-6)
    (got * torch.arange(6.0).view(2, 3, 1)).sum().backward()
    for a, b in zip([x.grad] + [p.grad for p in head.parameters()], want):
        assert torch.allclose(a, b, atol=1e-5)
    assert not rows.detach()[index].requires_grad
    frozen = rows.frozen()
    with torch.no_grad():
        head.net[-1].weight.add_(1.0)  # an optimizer step after the forward pass
    assert torch.allclose(frozen[index], full[index], atol=1e-6)
    assert not torch.allclose(rows.detach()[index], full[index], atol=1e-3)


def test_projected_rows_of_bf16_hidden_read_outside_autocast_equal_the_autocast_rows():
    """Under SOLVER.AMP the projection's hidden rows are bf16, its last layer's weights fp32; the bank update
    reads rows after the step, outside autocast: the values must be those autocast's forward computes."""
    from semiseg_d2.losses.contrastive import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 5)
    x = torch.randn(30, 6)
    index = torch.tensor([3, 7, 29])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = head(x)
        rows = head.project_rows(x)
        inside = rows[index]
    assert rows.hidden.dtype == torch.bfloat16 and rows.weight.dtype == torch.float32
    outside = rows.frozen()[index]  # what DGCLTerm.update reads
    assert outside.dtype == inside.dtype == full.dtype == torch.bfloat16
    assert torch.equal(outside, full[index]) and torch.equal(inside, full[index])


def test_tiny_dgcl_trains_under_bf16_autocast_with_updates_outside_it():
    torch.manual_seed(0)
    model = build_model(semi_cfg(**TINY_DGCL))
    model.train()
    term = model.terms["dgcl"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for it in range(4):
        with EventStorage(it), torch.autocast("cpu", dtype=torch.bfloat16):  # what the trainer does with AMP
            losses = model(fake_batch(seed=it))
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        model.after_optimizer_step()  # outside autocast, as in the trainer
    assert losses["loss_dgcl"].item() > 0  # the banks were filled by the updates
    assert all(b.dtype == torch.float32 for b in term.bank.buffers() if b.is_floating_point())
