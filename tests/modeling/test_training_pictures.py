"""SEMI.VIS_PERIOD: TensorBoard pictures of the semi-supervised step, put into the event storage by
SemiSegmentor.forward (``visualize_training``, as detectron2's GeneralizedRCNN) and written by TensorboardXWriter."""
import glob
import io
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from semiseg_d2.engine.trainer import SemiSegTrainer
from semiseg_d2.layers.label_ops import entropy_keep_mask
from semiseg_d2.utils.visualizer import CAPTION_HEIGHT, PANEL_GAP, colorize, semi_step_pictures
from tests.tiny import apply_overrides, fake_batch, semi_cfg, tiny_cfg

CROP = (64, 96)


def camvid_cfg(out_dir, **extra):
    cfg = tiny_cfg(crop=CROP)
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.DATASETS.TRAIN_LABELED = ("camvid_mini_train_5_labeled",)
    cfg.DATASETS.TRAIN_UNLABELED = ("camvid_mini_train_5_unlabeled",)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.SCALE_RANGE = [0.2, 0.3]
    cfg.SOLVER.MAX_ITER = 5
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.SEMI.BURN_IN_ITERS = 2
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 5
    cfg.OUTPUT_DIR = str(out_dir)
    return apply_overrides(cfg, extra)


class RecordingStorage(EventStorage):
    """An EventStorage that also keeps every ``put_image`` call: ``images`` = [(iteration, tag, uint8 [3,H,W])]."""

    def __init__(self, start_iter=0):
        super().__init__(start_iter)
        self.images = []

    def put_image(self, img_name, img_tensor):
        self.images.append((self.iter, img_name, img_tensor))
        super().put_image(img_name, img_tensor)


def _train(out_dir, **extra):
    trainer = SemiSegTrainer(camvid_cfg(out_dir, **extra))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _images(out_dir):
    files = glob.glob(str(out_dir / "events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = event_accumulator.EventAccumulator(files[0], size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def _panel(picture, row, col, h, w):
    y, x = CAPTION_HEIGHT + row * (h + PANEL_GAP), col * (w + PANEL_GAP)
    return picture[y:y + h, x:x + w]


def test_pictures_are_written_at_the_vis_period(tmp_path):
    _train(tmp_path, **{"SEMI.VIS_PERIOD": 2})
    images = _images(tmp_path)
    steps = {tag: [e.step for e in events] for tag, events in images.items()}
    # Put by forward on the iterations a picture is due (0, 2, 4: the event step is the storage's iteration at
    # put_image); burn-in (iterations 0, 1) has only the labeled picture.
    assert steps == {"semi/labeled": [0, 2, 4], "semi/pseudo_label": [2, 4], "semi/strong": [2, 4]}

    h, w = CROP
    colors = {tuple(c) for c in MetadataCatalog.get("camvid_mini_train").stuff_colors} | {(0, 0, 0)}
    for tag, events in images.items():
        for e in events:
            pic = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
            # 2 images per part, 3 panels each, a caption strip on top.
            assert pic.shape == (CAPTION_HEIGHT + 2 * h + PANEL_GAP, 3 * w + 2 * PANEL_GAP, 3), tag
            label_col = 1  # ground truth / teacher pseudo-label / student prediction: palette colours only
            for r in range(2):
                used = {tuple(p) for p in _panel(pic, r, label_col, h, w).reshape(-1, 3)}
                assert used <= colors, (tag, used - colors)
            if tag == "semi/pseudo_label":  # THRESHOLD 0 keeps every valid pixel: all white but padding
                kept = _panel(pic, 0, 2, h, w)
                assert set(np.unique(kept)) <= {0, 255} and (kept == 255).mean() > 0.5


def test_vis_period_zero_writes_no_picture(tmp_path):
    _train(tmp_path, **{"SEMI.VIS_PERIOD": 0, "SOLVER.MAX_ITER": 3})
    assert _images(tmp_path) == {}


def test_forward_puts_pictures_of_its_step():
    """Controlled step: batch-wide entropy filter (its mask depends on all images, not only those shown),
    every strong view mixed. The pictures forward puts must show exactly the inputs, the term's mask, the mixed
    views and targets, and the student's predictions."""
    cfg = semi_cfg(**{"SEMI.PSEUDO_LABEL.FILTER": "entropy", "SEMI.PSEUDO_LABEL.DROP_PERCENT": 50.0,
                      "SEMI.MIX.PROB": 1.0, "SEMI.VIS_PERIOD": 2,
                      "DATASETS.TRAIN_LABELED": ("camvid_mini_train_5_labeled",)})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    labeled, unlabeled = fake_batch(bl=2, bu=3)

    torch.manual_seed(1)
    with RecordingStorage(start_iter=1) as storage:  # 1 % 2: no picture due
        model((labeled, unlabeled))
    assert storage.images == []
    model.vis_period = 0  # the same step (iteration 0: the storage is the model's clock) without pictures
    torch.manual_seed(1)
    with RecordingStorage(start_iter=0):
        reference = model((labeled, unlabeled))
    model.vis_period = 2
    torch.manual_seed(1)
    with RecordingStorage(start_iter=0) as storage:
        losses = model((labeled, unlabeled))
    for k in reference:  # taking pictures does not change training
        assert torch.equal(losses[k], reference[k]), k
    step = model._last_step
    assert [(it, tag) for it, tag, _ in storage.images] == [(0, "semi/labeled"), (0, "semi/pseudo_label"),
                                                            (0, "semi/strong")]
    h, w = 48, 64
    pics = {}
    for _, tag, chw in storage.images:
        assert chw.dtype == np.uint8 and chw.shape[0] == 3, tag
        pics[tag] = chw.transpose(1, 2, 0)
        # 2 images per part (two rows), 3 panels each, a caption strip on top.
        assert pics[tag].shape == (CAPTION_HEIGHT + 2 * h + PANEL_GAP, 3 * w + 2 * PANEL_GAP, 3), tag

    # Independent computation of the term's kept mask from the unmixed teacher maps.
    mask, partner = step.mix_mask, step.mix_partner
    assert mask.any() and (~mask).any()

    def mixed(x):  # x [Bu, ...H, W]: pixels under the mask from the partner
        m = mask.view(mask.shape[0], *([1] * (x.dim() - 3)), *mask.shape[1:])
        return torch.where(m, x[partner], x)

    tw = step.teacher_weak
    keep = entropy_keep_mask(mixed(tw["entropy"]), mixed(tw["valid"]), 50.0)
    assert keep[:2].any() and (~keep[:2] & mixed(tw["valid"])[:2]).any()

    meta = MetadataCatalog.get("camvid_mini_train_5_labeled")

    def predicted(logits, r):  # the student's argmax at crop size, as the losses see it
        up = F.interpolate(logits[r:r + 1].detach().float(), size=(h, w), mode="bilinear", align_corners=False)
        return colorize(up.argmax(1)[0].numpy(), meta)

    weak = torch.stack([u["image"] for u in unlabeled])
    strong = torch.stack([u["image_strong"] for u in unlabeled])
    pl = mixed(tw["pseudo_label"])
    for r in range(2):
        kept_panel = _panel(pics["semi/pseudo_label"], r, 2, h, w)
        expected = np.where(keep[r].numpy()[..., None], 255, 0).repeat(3, 2)
        np.testing.assert_array_equal(kept_panel, expected)
        # Views are de-normalised back to the exact RGB input, mixed like the strong view.
        np.testing.assert_array_equal(_panel(pics["semi/pseudo_label"], r, 0, h, w),
                                      mixed(weak)[r].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(_panel(pics["semi/strong"], r, 0, h, w),
                                      mixed(strong)[r].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(_panel(pics["semi/pseudo_label"], r, 1, h, w), colorize(pl[r].numpy(), meta))
        np.testing.assert_array_equal(_panel(pics["semi/strong"], r, 2, h, w),
                                      np.where(mask[r].numpy()[..., None], 255, 0).repeat(3, 2))
        np.testing.assert_array_equal(_panel(pics["semi/labeled"], r, 0, h, w), labeled[r]["image"].permute(1, 2, 0).numpy())
        np.testing.assert_array_equal(_panel(pics["semi/labeled"], r, 1, h, w),
                                      colorize(labeled[r]["sem_seg"].numpy(), meta))
        np.testing.assert_array_equal(_panel(pics["semi/labeled"], r, 2, h, w),
                                      predicted(step.student_labeled["logits"], r))
        np.testing.assert_array_equal(_panel(pics["semi/strong"], r, 1, h, w),
                                      predicted(step.student_strong["logits"], r))


def test_large_crops_are_shrunk_keeping_mask_values():
    meta = MetadataCatalog.get("camvid_mini_train")
    g = torch.Generator().manual_seed(0)
    h, w = 700, 1000
    labels = torch.randint(0, 11, (1, h, w), generator=g)
    record = {"iteration": 0, "labeled": {"image": torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g),
                                          "ground_truth": labels, "student": labels}}
    pics = semi_step_pictures(record, meta, max_size=320)
    assert set(pics) == {"semi/labeled"}
    stride = 4  # ceil(1000 / 320)
    sh, sw = -(-h // stride), -(-w // stride)
    assert pics["semi/labeled"].shape == (CAPTION_HEIGHT + sh, 3 * sw + 2 * PANEL_GAP, 3)
    np.testing.assert_array_equal(_panel(pics["semi/labeled"], 0, 1, sh, sw),
                                  colorize(labels[0, ::stride, ::stride].numpy(), meta))


def test_vis_period_refuses_metadata_without_colours():
    cfg = semi_cfg(**{"SEMI.VIS_PERIOD": 10, "DATASETS.TRAIN_LABELED": ("__vis_test_no_colours",)})
    model = build_model(cfg)  # inference needs no colours: the check is made when a picture is drawn
    model.train()
    with EventStorage(0), pytest.raises(ValueError, match=r"SEMI.VIS_PERIOD=10 .*stuff_colors.*'__vis_test_no_colours'"):
        model(fake_batch())
    cfg = semi_cfg(**{"SEMI.VIS_PERIOD": -1, "DATASETS.TRAIN_LABELED": ("camvid_mini_train_5_labeled",)})
    with pytest.raises(ValueError, match="SEMI.VIS_PERIOD"):
        build_model(cfg)


def test_semi_rcnn_refuses_vis_period():
    """SemiRCNN puts no pictures: SEMI.VIS_PERIOD is an error there, not silently ignored."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "projects", "SemiInstance"))
    from semi_instance import get_semi_instance_cfg
    from semi_instance.semi_rcnn import SemiRCNN

    cfg = get_semi_instance_cfg()
    cfg.SEMI.VIS_PERIOD = 5
    with pytest.raises(ValueError, match="SEMI.VIS_PERIOD: SemiRCNN"):
        SemiRCNN.from_config(cfg)
