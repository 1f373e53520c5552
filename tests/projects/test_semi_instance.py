"""projects/SemiInstance: semi-supervised Mask R-CNN on the engine, on a synthetic COCO-format shapes dataset.

Data (validation errors, unlabeled annotations dropped, geometry of the views), pseudo-instance filtering, the
semi-supervised step, training + EMA + exact resume through the engine, COCOEvaluator (bbox + segm), COCO splits.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = os.path.join(ROOT, "projects", "SemiInstance")
sys.path.insert(0, PROJECT)

from semi_instance import SemiInstanceTrainer, get_semi_instance_cfg, register_coco_semi  # noqa: E402
from semi_instance.data import TwoViewDatasetMapper, build_semi_instance_train_loader, validate_coco_json  # noqa: E402
from semi_instance.semi_rcnn import RCNNPass, pseudo_instances_from_predictions  # noqa: E402
from semi_instance.synthetic import CATEGORIES, write_synthetic_coco  # noqa: E402
from semiseg_d2.data.splits.coco_splits import coco_labeled_positions, coco_semi_split  # noqa: E402
from semiseg_d2.engine.hooks import EMAHook  # noqa: E402
from semiseg_d2.losses.registry import build_loss_terms  # noqa: E402
from semiseg_d2.modeling.heads.spec import HeadSpec  # noqa: E402
from tests.tiny import apply_overrides  # noqa: E402

LOSSES_ALL = ["rcnn_supervised", "rcnn_pseudo_label", "roi_memory_contrast"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Synthetic train (12 images, polygons; 4 labeled) and val (4 images, RLE) sets, registered."""
    d = str(tmp_path_factory.mktemp("shapes"))
    train_json, train_root = write_synthetic_coco(d, "train", 12, seed=0)
    val_json, val_root = write_synthetic_coco(d, "val", 4, seed=1, mask_format="rle", first_image_id=900)
    with open(train_json) as f:
        ids = [im["id"] for im in json.load(f)["images"]]
    ids_file = os.path.join(d, "labeled.txt")
    with open(ids_file, "w") as f:
        f.write("# labeled ids\n" + "".join(f"{i}\n" for i in ids[:4]))
    names = register_coco_semi("t_shapes_train", train_json, train_root, ids_file)
    names += register_coco_semi("t_shapes_val", val_json, val_root)
    yield {"dir": d, "train_json": train_json, "labeled_ids": ids[:4], "all_ids": ids}
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def tiny_cfg(out_dir, **overrides):
    cfg = get_semi_instance_cfg()
    cfg.merge_from_file(os.path.join(PROJECT, "configs", "tiny_cpu.yaml"))
    cfg.DATASETS.TRAIN_LABELED = ("t_shapes_train_labeled",)
    cfg.DATASETS.TRAIN_UNLABELED = ("t_shapes_train_unlabeled",)
    cfg.DATASETS.TEST = ("t_shapes_val",)
    cfg.SOLVER.MAX_ITER = 4
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SEMI.BURN_IN_ITERS = 1
    cfg.SEMI_INSTANCE.PSEUDO_SCORE_THRESHOLD = 0.0  # the untrained teacher is unconfident: keep its detections
    cfg.SEMI.MEMORY_CONTRAST.CONFIDENCE_THRESHOLD = 0.0
    cfg.SEMI.LOSSES = list(LOSSES_ALL)
    cfg.SEED = 5
    cfg.OUTPUT_DIR = str(out_dir)
    return apply_overrides(cfg, overrides)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


# ---------------------------------------------------------------------------------------------- data
def test_registration_labeled_and_unlabeled_halves(shapes):
    lab = DatasetCatalog.get("t_shapes_train_labeled")
    unl = DatasetCatalog.get("t_shapes_train_unlabeled")
    assert sorted(r["image_id"] for r in lab) == sorted(shapes["labeled_ids"])
    assert sorted(r["image_id"] for r in lab + unl) == sorted(shapes["all_ids"])
    assert all(r["annotations"] for r in lab)
    # The unlabeled images do have annotations in the json: they are used without them, not rejected.
    with open(shapes["train_json"]) as f:
        annotated = {a["image_id"] for a in json.load(f)["annotations"]}
    assert {r["image_id"] for r in unl} <= annotated
    assert all("annotations" not in r for r in unl)
    meta = MetadataCatalog.get("t_shapes_train_unlabeled")
    assert meta.thing_classes == [c[0] for c in CATEGORIES]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 7: 2}  # non-contiguous ids mapped in id order
    assert {a["category_id"] for r in lab for a in r["annotations"]} <= {0, 1, 2}


def test_missing_image_or_category_id_is_an_error_naming_id_and_file(shapes, tmp_path):
    with open(shapes["train_json"]) as f:
        data = json.load(f)
    bad = json.loads(json.dumps(data))
    bad["annotations"][3]["image_id"] = 4242
    path = _write_json(tmp_path / "bad_image.json", bad)
    with pytest.raises(ValueError) as e:
        register_coco_semi("t_bad_image", path, os.path.dirname(path))
    assert "4242" in str(e.value) and "bad_image.json" in str(e.value) and "image id" in str(e.value)
    assert "t_bad_image" not in DatasetCatalog

    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["category_id"] = 99
    path = _write_json(tmp_path / "bad_category.json", bad)
    with pytest.raises(ValueError) as e:
        validate_coco_json(path)
    assert "99" in str(e.value) and "bad_category.json" in str(e.value) and "category id" in str(e.value)

    ids = tmp_path / "ids.txt"
    ids.write_text(f"{shapes['all_ids'][0]}\n777777\n")
    with pytest.raises(ValueError) as e:
        register_coco_semi("t_bad_ids", shapes["train_json"], os.path.dirname(shapes["train_json"]), str(ids))
    assert "777777" in str(e.value) and "ids.txt" in str(e.value)


def test_label_space_mismatch_is_refused(shapes, tmp_path):
    with open(shapes["train_json"]) as f:
        data = json.load(f)
    data["categories"][0]["name"] = "purple_box"
    path = _write_json(tmp_path / "renamed.json", data)
    register_coco_semi("t_renamed", path, os.path.join(shapes["dir"], "train"))
    try:
        cfg = tiny_cfg(tmp_path, **{"DATASETS.TRAIN_UNLABELED": ("t_renamed",)})
        with pytest.raises(ValueError, match="thing_classes"):
            build_semi_instance_train_loader(cfg)
    finally:
        DatasetCatalog.remove("t_renamed")
        MetadataCatalog.remove("t_renamed")


def test_horizontal_flip_moves_boxes_and_masks_with_the_image(shapes):
    record = DatasetCatalog.get("t_shapes_train_labeled")[0]
    plain = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True,
                          instance_mask_format="bitmask")(record)
    flipped = DatasetMapper(is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB",
                            use_instance_mask=True, instance_mask_format="bitmask")(record)
    img0, img1 = plain["image"], flipped["image"]
    W = img0.shape[2]
    assert torch.equal(img1, img0.flip(2))
    i0, i1 = plain["instances"], flipped["instances"]
    assert len(i1) == len(record["annotations"]) > 0
    for k in range(len(i1)):
        m0, m1 = i0.gt_masks.tensor[k], i1.gt_masks.tensor[k]
        assert torch.equal(m1, m0.flip(1))
        x0, y0, x1, y1 = i0.gt_boxes.tensor[k].tolist()
        assert i1.gt_boxes.tensor[k].tolist() == pytest.approx([W - x1, y0, W - x0, y1], abs=1e-4)
        # the mask covers the object's colour in the flipped image, and its extent matches the box
        colour = torch.tensor(CATEGORIES[int(i1.gt_classes[k])][2], dtype=torch.uint8)
        assert (img1[:, m1].T == colour).all(1).float().mean() > 0.97
        ys, xs = torch.nonzero(m1, as_tuple=True)
        bx0, by0, bx1, by1 = i1.gt_boxes.tensor[k].tolist()
        assert abs(xs.min().item() - bx0) <= 1.5 and abs(xs.max().item() + 1 - bx1) <= 1.5
        assert abs(ys.min().item() - by0) <= 1.5 and abs(ys.max().item() + 1 - by1) <= 1.5


def test_unlabeled_views_share_geometry_and_drop_annotations(shapes, tmp_path):
    cfg = tiny_cfg(tmp_path, **{"INPUT.STRONG.COLOR_JITTER_PROB": 0.0, "INPUT.STRONG.GRAYSCALE_PROB": 0.0,
                                "INPUT.STRONG.BLUR_PROB": 0.0, "SEMI_INSTANCE.STRONG_ERASING": []})
    mapper = TwoViewDatasetMapper(cfg)
    mapper.weak_mapper.augmentations = T.AugmentationList([T.RandomFlip(prob=1.0)])
    record = DatasetCatalog.get("t_shapes_train")[0]  # an annotated record: annotations must not be read
    out = mapper(record)
    assert "instances" not in out and "annotations" not in out
    original = DatasetMapper(is_train=False, augmentations=[], image_format=cfg.INPUT.FORMAT)(record)["image"]
    assert torch.equal(out["image"], original.flip(2))
    assert torch.equal(out["image_strong"], out["image"])  # photometric ops off: the very same pixels
    cfg = tiny_cfg(tmp_path)
    strong_mapper = TwoViewDatasetMapper(cfg)
    torch.manual_seed(0)
    outs = [strong_mapper(record) for _ in range(4)]
    assert all(o["image_strong"].shape == o["image"].shape for o in outs)
    assert any(not torch.equal(o["image_strong"], o["image"]) for o in outs)


def test_paired_loader_yields_labeled_instances_and_unlabeled_two_views(shapes, tmp_path):
    loader = build_semi_instance_train_loader(tiny_cfg(tmp_path))
    labeled, unlabeled = next(iter(loader))
    assert len(labeled) == 2 and len(unlabeled) == 2
    assert all(len(x["instances"]) > 0 and x["instances"].has("gt_masks") for x in labeled)
    assert all("instances" not in x and x["image_strong"].shape == x["image"].shape for x in unlabeled)
    assert {x["image_id"] for x in labeled} <= set(shapes["labeled_ids"])
    assert not {x["image_id"] for x in unlabeled} & set(shapes["labeled_ids"])


# ---------------------------------------------------------------------------------------------- pseudo-labels
def _predictions(scores, classes, h=64, w=80):
    n = len(scores)
    p = Instances((h, w))
    boxes = torch.tensor([[4.0 + 10 * i, 6.0, 20.0 + 10 * i, 30.0] for i in range(n)])
    p.pred_boxes = Boxes(boxes)
    p.scores = torch.tensor(scores)
    p.pred_classes = torch.tensor(classes)
    m = torch.zeros(n, 1, 14, 14)
    m[:, :, 2:12, 2:12] = 0.9  # a probable blob inside each box
    p.pred_masks = m
    return p


def test_pseudo_instances_keep_scores_at_or_above_threshold():
    pred = _predictions([0.95, 0.69, 0.7, 0.3, 0.71], [0, 1, 2, 1, 2])
    out = pseudo_instances_from_predictions(pred, 0.7)
    assert out.scores.tolist() == pytest.approx([0.95, 0.7, 0.71])
    assert out.gt_classes.tolist() == [0, 2, 2]
    assert torch.equal(out.gt_boxes.tensor, pred.pred_boxes.tensor[[0, 2, 4]])
    masks = out.gt_masks.tensor
    assert masks.shape == (3, 64, 80) and masks.dtype == torch.bool
    for k, box in enumerate(out.gt_boxes.tensor.tolist()):
        ys, xs = torch.nonzero(masks[k], as_tuple=True)
        assert len(ys) > 0
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
    assert len(pseudo_instances_from_predictions(pred, 0.96)) == 0
    assert pseudo_instances_from_predictions(pred, 0.96).gt_masks.tensor.shape == (0, 64, 80)


def test_semi_step_trains_the_student_on_the_filtered_teacher_outputs(shapes, tmp_path):
    cfg = tiny_cfg(tmp_path, **{"SEMI_INSTANCE.PSEUDO_SCORE_THRESHOLD": 0.7, "SEMI.LOSSES": LOSSES_ALL[:2]})
    model = SemiInstanceTrainer.build_model(cfg)
    model.train()
    labeled, unlabeled = next(iter(build_semi_instance_train_loader(cfg)))
    h, w = unlabeled[0]["image"].shape[1:]
    controlled = [_predictions([0.9, 0.5], [2, 0], h, w), _predictions([0.2], [1], h, w)]

    def teacher_pass(inputs, detect=True):
        assert all(torch.equal(i["image"], u["image"]) for i, u in zip(inputs, unlabeled))  # weak views
        return RCNNPass(None, {}, controlled)

    model._teacher_pass = teacher_pass
    student_inputs = []
    real_train_pass = model._train_pass

    def train_pass(net, inputs, targets):
        student_inputs.append([x["image"] for x in inputs])
        return real_train_pass(net, inputs, targets)

    model._train_pass = train_pass
    with EventStorage(cfg.SEMI.BURN_IN_ITERS):
        step = model.compute_step(labeled, unlabeled)
        losses = model.run_terms(step)
    assert [len(p) for p in step.pseudo_instances] == [1, 0]
    assert len(student_inputs) == 2  # labeled pass, then the strong views (never the weak ones)
    assert all(torch.equal(a, x["image"]) for a, x in zip(student_inputs[0], labeled))
    assert all(torch.equal(a, u["image_strong"]) for a, u in zip(student_inputs[1], unlabeled))
    assert step.pseudo_instances[0].gt_classes.tolist() == [2]
    # the student's strong pass was matched against exactly those pseudo-instances
    fg = [p.gt_classes[p.gt_classes < 3].unique().tolist() for p in step.student_strong.proposals]
    assert fg == [[2], []]
    assert {"loss_cls_unsup", "loss_rpn_cls_unsup", "loss_mask_unsup"} <= set(losses)
    assert not {"loss_box_reg_unsup", "loss_rpn_loc_unsup"} & set(losses)  # box regression off by default
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(step.metrics["pseudo/instances_per_image"]) == 0.5


SPEC = HeadSpec("TestHead", num_classes=3, feature_dim=8)


def test_instance_terms_and_segmentation_terms_do_not_mix(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"SEMI.LOSSES": ["rcnn_supervised", "pseudo_label"]})
    with pytest.raises(ValueError) as e:
        build_loss_terms(cfg, SPEC, task="instance")
    assert "'pseudo_label'" in str(e.value) and "sem_seg" in str(e.value) and "rcnn_pseudo_label" in str(e.value)
    cfg.SEMI.LOSSES = ["supervised", "rcnn_pseudo_label"]
    with pytest.raises(ValueError, match="'rcnn_pseudo_label' is a 'instance' term"):
        build_loss_terms(cfg, SPEC)


# ---------------------------------------------------------------------------------------------- engine
def _train(cfg, resume=False):
    trainer = SemiInstanceTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    history = []

    class Record(HookBase):
        def after_step(self):
            history.append({k: v[0] for k, v in self.trainer.storage.latest().items()})

    trainer.register_hooks([Record()])
    trainer.train()
    return trainer, history


def _state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_train_ema_checkpoint_resume_and_coco_evaluation(shapes, tmp_path):
    cfg = tiny_cfg(tmp_path / "a")
    trainer, history = _train(cfg)
    assert len(history) == 4
    assert "loss_cls_unsup" not in history[0]  # burn-in: supervised only
    for it in (1, 2, 3):
        for key in ("loss_cls", "loss_mask", "loss_cls_unsup", "loss_rpn_cls_unsup", "loss_mask_unsup",
                    "loss_roi_contrast_labeled", "loss_roi_contrast_unlabeled"):
            assert np.isfinite(history[it][key]), (it, key)
    assert "unsup/roi_head/num_fg_samples" in history[3]  # the strong pass's head metrics are kept apart
    model = trainer.model
    bank = model.terms["roi_memory_contrast"].bank
    assert int(bank.counts.sum()) > 0
    assert any(not torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.student.parameters()))

    # EMA through the engine's hook: teacher <- m * teacher + (1 - m) * student
    hook = next(h for h in trainer._hooks if isinstance(h, EMAHook))
    t0 = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01)
    s = [p.clone() for p in model.student.parameters()]
    trainer.iter = 10
    with EventStorage(10) as trainer.storage:
        hook.after_step()
    m = hook.momentum_at(10)
    assert m == pytest.approx(cfg.SEMI.EMA.MOMENTUM)
    for t_new, a, b in zip(model.teacher.parameters(), t0, s):
        torch.testing.assert_close(t_new, m * a + (1 - m) * b)

    # Exact resume from the iteration-1 checkpoint (end of burn-in) through SemiSegCheckpointer + set_start
    final = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    resumed_dir = tmp_path / "b"
    os.makedirs(resumed_dir)
    shutil.copy(os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth"), resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000001.pth")
    cfg_b = tiny_cfg(resumed_dir)
    trainer_b, history_b = _train(cfg_b, resume=True)
    assert len(history_b) == 2 and trainer_b.start_iter == 2
    assert history_b[-1]["loss_cls_unsup"] == pytest.approx(history[-1]["loss_cls_unsup"], rel=1e-5)
    state_b = trainer_b.model.state_dict()
    for prefix in ("student.", "teacher.", "terms.roi_memory_contrast.bank."):
        keys = [k for k in final if k.startswith(prefix)]
        assert keys
        for k in keys:
            torch.testing.assert_close(state_b[k], final[k], msg=k)

    # COCOEvaluator (bbox + segm) on the synthetic val set, for student and teacher
    results = SemiInstanceTrainer.test(cfg_b, trainer_b.model)
    assert set(results) == {"student", "teacher"}
    for name, network in results.items():
        assert set(network) == {"bbox", "segm"}
        for task in network.values():
            if name == "student":
                assert 0.0 <= task["AP"] <= 100.0 and np.isfinite(task["AP50"])
            else:
                # After 6 iterations the teacher (BN statistics now averaged with its weights, SEMI.EMA.AVERAGE_BUFFERS)
                # may detect nothing on a task: COCOEvaluator then reports NaN, detectron2's convention.
                assert all(np.isnan(v) or 0.0 <= v <= 100.0 for k, v in task.items() if not k.startswith("AP-"))


def test_coco_evaluator_scores_ground_truth_as_perfect(shapes, tmp_path):
    """The evaluator wiring (category ids 1/3/7 <-> contiguous classes, RLE masks, pycocotools COCOeval)."""
    cfg = tiny_cfg(tmp_path)
    evaluator = SemiInstanceTrainer.build_evaluator(cfg, "t_shapes_val", str(tmp_path))
    evaluator.reset()
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True,
                           instance_mask_format="bitmask")
    for record in DatasetCatalog.get("t_shapes_val"):
        gt = mapper(record)["instances"]
        pred = Instances(gt.image_size)
        pred.pred_boxes = gt.gt_boxes
        pred.pred_classes = gt.gt_classes
        pred.scores = torch.ones(len(gt))
        pred.pred_masks = gt.gt_masks.tensor
        evaluator.process([{"image_id": record["image_id"], "file_name": record["file_name"]}], [{"instances": pred}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------- splits
def test_coco_splits_follow_the_fold_seed_convention(tmp_path):
    ids = [1000 + 7 * i for i in range(500)]
    lab, unl = coco_semi_split(ids, 10, fold=1)
    np.random.seed(1)
    expected = sorted(set(np.random.choice(range(500), size=50).tolist()))  # the reference's draw
    assert lab == [ids[k] for k in expected]
    assert sorted(lab + unl) == ids and not set(lab) & set(unl)
    assert 40 <= len(lab) <= 50  # drawn with replacement, as the reference
    assert coco_semi_split(ids, 10, fold=1) == (lab, unl)
    assert coco_semi_split(ids, 10, fold=2)[0] != lab
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    coco_labeled_positions(500, 1, 3)
    assert np.array_equal(np.random.get_state()[1], before)  # the global numpy RNG is left alone
    with pytest.raises(ValueError):
        coco_semi_split(ids, 0.1, fold=1)  # 0.1% of 500 images is less than one image


def test_make_splits_coco_mode_writes_plain_id_lists(shapes, tmp_path):
    from tests.data.test_datasets import _load_tool

    tool = _load_tool("make_splits")
    out = tmp_path / "splits"
    assert tool.main(["coco", "--json", shapes["train_json"], "--percent", "25", "50", "--folds", "1", "2",
                      "--out", str(out)]) == 0
    for pct in ("25", "50"):
        for fold in (1, 2):
            d = out / f"{pct}pct" / f"fold{fold}"
            lab = [int(x) for x in (d / "labeled.txt").read_text().split()]
            unl = [int(x) for x in (d / "unlabeled.txt").read_text().split()]
            assert (lab, unl) == coco_semi_split(shapes["all_ids"], float(pct), fold)
    ids_file = out / "25pct" / "fold1" / "labeled.txt"
    names = register_coco_semi("t_split", shapes["train_json"], os.path.join(shapes["dir"], "train"), str(ids_file))
    try:
        assert sorted(r["image_id"] for r in DatasetCatalog.get("t_split_labeled")) == sorted(
            int(x) for x in ids_file.read_text().split())
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_train_net_without_coco_names_detectron2_datasets_and_the_layout(tmp_path, monkeypatch):
    sys.path.insert(0, PROJECT)
    import train_net  # projects/SemiInstance/train_net.py

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    config = os.path.join(PROJECT, "configs", "coco_10pct_R50_FPN.yaml")
    with pytest.raises(FileNotFoundError) as e:
        train_net.cli(["--config-file", config, "OUTPUT_DIR", str(tmp_path / "out")])
    msg = str(e.value)
    assert "coco_2017_train_10pct_fold1_labeled" in msg
    assert os.path.join(str(tmp_path), "coco", "annotations", "instances_train2017.json") in msg
    assert f"DETECTRON2_DATASETS={tmp_path}" in msg
    for part in ("coco/train2017/", "coco/semi_splits/{P}pct/fold{F}/labeled.txt", "tools/make_splits.py coco",
                 "coco/annotations/instances_val2017.json"):
        assert part in msg
    assert not (tmp_path / "out" / "model_final.pth").exists()
