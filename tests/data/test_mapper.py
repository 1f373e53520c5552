"""Mappers (crop/pad/ignore, weak-strong alignment), mixing masks, and the train/test loaders."""
import itertools
import os
import random
import tempfile
import unittest

import numpy as np
import torch
from PIL import Image

import semiseg_d2  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog
from semiseg_d2.data.build import (
    build_sem_seg_test_loader,
    build_sem_seg_train_loader,
    build_semi_train_loader,
    split_batch,
)
from semiseg_d2.data.datasets import unregister
from semiseg_d2.data.datasets.common import register_sem_seg
from semiseg_d2.data.datasets.register_camvid import register_all_camvid
from semiseg_d2.data.mapper import SemSegDatasetMapper, UnlabeledDatasetMapper
from semiseg_d2.data.transforms import StrongPhotometricAug
from semiseg_d2.layers.perturbation import classmix_masks, cutmix_masks, mix, shifted_partner_index

from tests import synthetic_trees as st
from tests.tiny import tiny_cfg


def _seed(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _block_image(h=12, w=16):
    """Four flat colour blocks in an asymmetric layout: any flip/shift changes which colour is where."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :] = (200, 30, 40)
    img[: h // 3, : w // 4] = (20, 180, 60)
    img[h // 2 :, w // 2 :] = (40, 60, 220)
    img[h // 3 : h // 2, 1:3] = (250, 250, 10)
    return img


class _CamVidTree(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tree = st.make_camvid_tree(self._tmp.name)
        self.names = register_all_camvid(self._tmp.name, prefix="mt_")
        self.record = DatasetCatalog.get("mt_camvid_train")[0]

    def tearDown(self):
        unregister(self.names)
        self._tmp.cleanup()


class TestLabeledMapper(_CamVidTree):
    def test_pad_with_ignore_and_mapping(self):
        cfg = tiny_cfg(crop=(20, 24))
        cfg.INPUT.SCALE_RANGE = [1.0, 1.0]
        cfg.INPUT.RANDOM_FLIP = "none"
        out = SemSegDatasetMapper(cfg, True)(self.record)
        self.assertEqual(out["image"].shape, (3, 20, 24))
        self.assertEqual(out["image"].dtype, torch.uint8)
        self.assertEqual(out["sem_seg"].shape, (20, 24))
        self.assertEqual(out["sem_seg"].dtype, torch.long)
        self.assertEqual((out["height"], out["width"]), (st.H, st.W))
        label = out["sem_seg"].numpy()
        np.testing.assert_array_equal(label[: st.H, : st.W], st.stripes([0, 3, 10, 255]))  # void 11 -> 255
        self.assertTrue((label[st.H :] == 255).all() and (label[:, st.W :] == 255).all())
        self.assertTrue((out["image"][:, st.H :] == 0).all() and (out["image"][:, :, st.W :] == 0).all())
        original = np.asarray(Image.open(self.record["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(out["image"][:, : st.H, : st.W].permute(1, 2, 0).numpy(), original)

    def test_scaled_crop_keeps_label_values_and_is_seeded(self):
        cfg = tiny_cfg(crop=(16, 16))
        cfg.INPUT.SCALE_RANGE = [1.5, 2.5]
        mapper = SemSegDatasetMapper(cfg, True)
        _seed(3)
        a = [mapper(self.record) for _ in range(4)]
        _seed(3)
        b = [mapper(self.record) for _ in range(4)]
        for x, y in zip(a, b):
            self.assertTrue(torch.equal(x["image"], y["image"]) and torch.equal(x["sem_seg"], y["sem_seg"]))
            self.assertEqual(tuple(x["sem_seg"].shape), (16, 16))
            self.assertTrue(set(x["sem_seg"].unique().tolist()) <= {0, 3, 10, 255})  # nearest: no new values
        self.assertFalse(all(torch.equal(a[0]["sem_seg"], x["sem_seg"]) for x in a[1:]))

    def test_test_mapper_original_size(self):
        out = SemSegDatasetMapper(tiny_cfg(), False)(self.record)
        expected = {"image", "file_name", "height", "width"} | ({"dataset_name"} & set(self.record))
        self.assertEqual(set(out), expected)
        self.assertEqual(tuple(out["image"].shape), (3, st.H, st.W))


class TestUnlabeledMapper(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self._tmp.name, "u.png")
        Image.fromarray(_block_image()).save(self.path)
        self.record = {"file_name": self.path, "image_id": "u"}

    def tearDown(self):
        self._tmp.cleanup()

    def _cfg(self, p_jitter, p_gray, p_blur, crop=(16, 20)):
        cfg = tiny_cfg(crop=crop)
        cfg.INPUT.SCALE_RANGE = [0.8, 1.6]
        cfg.INPUT.STRONG.COLOR_JITTER_PROB = p_jitter
        cfg.INPUT.STRONG.GRAYSCALE_PROB = p_gray
        cfg.INPUT.STRONG.BLUR_PROB = p_blur
        return cfg

    def test_no_strong_aug_gives_identical_views(self):
        mapper = UnlabeledDatasetMapper(self._cfg(0.0, 0.0, 0.0))
        _seed(0)
        for _ in range(6):
            out = mapper(self.record)
            self.assertEqual(set(out), {"image", "image_strong", "valid", "file_name", "height", "width"})
            self.assertTrue(torch.equal(out["image"], out["image_strong"]))
            self.assertEqual(out["valid"].dtype, torch.bool)

    def test_strong_view_has_weak_geometry(self):
        # Colour jitter and grayscale act per pixel with image-global parameters, so pixels that share a colour
        # in the weak view share one in the strong view. A strong view with any other flip/crop/scale would send
        # one weak colour to several strong colours (the blocks are asymmetric).
        mapper = UnlabeledDatasetMapper(self._cfg(1.0, 0.5, 0.0))
        _seed(1)
        changed = 0
        for _ in range(8):
            out = mapper(self.record)
            weak = out["image"].permute(1, 2, 0).reshape(-1, 3)[out["valid"].reshape(-1)]
            strong = out["image_strong"].permute(1, 2, 0).reshape(-1, 3)[out["valid"].reshape(-1)]
            pairs = {}
            for w_px, s_px in zip(map(tuple, weak.tolist()), map(tuple, strong.tolist())):
                pairs.setdefault(w_px, set()).add(s_px)
            self.assertTrue(all(len(v) == 1 for v in pairs.values()), pairs)
            changed += int(not torch.equal(out["image"], out["image_strong"]))
        self.assertGreater(changed, 4)
        # sanity of the check itself: a flipped strong view breaks it
        flipped = out["image_strong"].flip(-1).permute(1, 2, 0).reshape(-1, 3).tolist()
        weak_all = out["image"].permute(1, 2, 0).reshape(-1, 3).tolist()
        pairs = {}
        for w_px, s_px in zip(map(tuple, weak_all), map(tuple, flipped)):
            pairs.setdefault(w_px, set()).add(s_px)
        self.assertTrue(any(len(v) > 1 for v in pairs.values()))

    def test_blurred_strong_view_keeps_marker_position(self):
        # Blur is symmetric: the centre of mass of the bright marker (luminance-invariant under grayscale) stays.
        img = np.zeros((24, 32, 3), np.uint8)
        img[5:9, 20:26] = 255
        Image.fromarray(img).save(self.path)
        cfg = self._cfg(0.0, 1.0, 1.0, crop=(24, 32))
        cfg.INPUT.SCALE_RANGE = [1.0, 1.0]
        _seed(2)
        for _ in range(4):
            out = UnlabeledDatasetMapper(cfg)(self.record)
            w = out["image"].float().mean(0)
            s = out["image_strong"].float().mean(0)
            ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
            cw = ((w * ys).sum() / w.sum(), (w * xs).sum() / w.sum())
            cs = ((s * ys).sum() / s.sum(), (s * xs).sum() / s.sum())
            self.assertLess(abs(cw[0] - cs[0]) + abs(cw[1] - cs[1]), 0.5)

    def test_padding_is_invalid(self):
        cfg = self._cfg(0.0, 0.0, 0.0, crop=(20, 24))
        cfg.INPUT.SCALE_RANGE = [1.0, 1.0]
        cfg.INPUT.RANDOM_FLIP = "none"
        out = UnlabeledDatasetMapper(cfg)(self.record)
        valid = out["valid"]
        self.assertTrue(valid[:12, :16].all())
        self.assertFalse(valid[12:].any() or valid[:, 16:].any())
        self.assertTrue((out["image"][:, ~valid] == 0).all())

    def test_strong_aug_changes_colours(self):
        aug = StrongPhotometricAug(1.0, (0.5, 0.5, 0.5, 0.25), 0.0, 0.0)
        x = torch.from_numpy(_block_image()).permute(2, 0, 1).contiguous()
        g = torch.Generator().manual_seed(0)
        y = aug(x, generator=g)
        self.assertEqual((y.dtype, y.shape), (torch.uint8, x.shape))
        self.assertFalse(torch.equal(x, y))


class TestMixMasks(unittest.TestCase):
    def test_cutmix_boxes(self):
        g = torch.Generator().manual_seed(0)
        m = cutmix_masks(64, 40, 50, prob=1.0, area_range=(0.02, 0.4), ratio_range=(0.3, 1 / 0.3), generator=g)
        self.assertEqual((m.shape, m.dtype), ((64, 40, 50), torch.bool))
        for b in range(64):
            ys, xs = torch.nonzero(m[b], as_tuple=True)
            self.assertGreater(ys.numel(), 0)
            box = m[b, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            self.assertTrue(box.all())  # one filled rectangle
            self.assertLessEqual(ys.numel(), 0.4 * 40 * 50 + 1)
        self.assertFalse(cutmix_masks(8, 10, 10, prob=0.0, generator=g).any())
        some = cutmix_masks(200, 10, 10, prob=0.5, generator=g).flatten(1).any(1).float().mean()
        self.assertTrue(0.35 < some < 0.65)

    def _check_mixed_pair(self, mask, partner, labels, images):
        mixed_img = mix(images, mask, partner)
        mixed_lab = mix(labels, mask, partner)
        # every pixel of the mixed image still encodes the mixed label: image and label moved together
        self.assertTrue(torch.equal(mixed_img[:, 0].long(), mixed_lab))
        self.assertTrue(torch.equal(mixed_img[:, 1].long(), (mixed_lab * 3) % 256))
        expect = torch.where(mask, labels[partner], labels)
        self.assertTrue(torch.equal(mixed_lab, expect))

    def _batch(self, b=4, h=12, w=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randint(0, 6, (b, 3, 4), generator=g)
        labels = coarse.repeat_interleave(h // 3, 1).repeat_interleave(w // 4, 2)
        labels[:, 0, 0] = 255
        images = torch.stack([labels, (labels * 3) % 256, torch.zeros_like(labels)], 1).to(torch.uint8)
        return labels, images

    def test_cutmix_moves_image_and_label_together(self):
        labels, images = self._batch()
        partner = shifted_partner_index(4)
        mask = cutmix_masks(4, 12, 16, prob=1.0, generator=torch.Generator().manual_seed(1))
        self._check_mixed_pair(mask, partner, labels, images)

    def test_classmix_pastes_half_of_the_partner_classes(self):
        labels, images = self._batch(seed=2)
        partner = torch.tensor([2, 0, 3, 1])
        mask = classmix_masks(labels, prob=1.0, ignore_value=255, partner_index=partner,
                              generator=torch.Generator().manual_seed(0))
        for b in range(4):
            src = labels[partner[b]]
            present = [c for c in src.unique().tolist() if c != 255]
            pasted = [c for c in present if mask[b][src == c].all()]
            for c in present:  # whole classes only
                self.assertTrue(mask[b][src == c].all() or not mask[b][src == c].any())
            self.assertEqual(len(pasted), (len(present) + 1) // 2)
            self.assertFalse(mask[b][src == 255].any())
        self._check_mixed_pair(mask, partner, labels, images)
        self.assertFalse(classmix_masks(labels, prob=0.0).any())

    def test_mix_broadcasts_channels(self):
        x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)
        mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
        out = mix(x, mask, torch.tensor([1, 0]))
        self.assertEqual(out[0, :, 0, 0].tolist(), x[1, :, 0, 0].tolist())
        self.assertEqual(out[1, :, 1, 1].tolist(), x[0, :, 1, 1].tolist())
        self.assertEqual(out[0, :, 1, 1].tolist(), x[0, :, 1, 1].tolist())


class TestLoaders(unittest.TestCase):
    def _cfg(self):
        cfg = tiny_cfg(crop=(32, 32))
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 3
        cfg.DATASETS.TRAIN_LABELED = ("camvid_mini_train_5_labeled",)
        cfg.DATASETS.TRAIN_UNLABELED = ("camvid_mini_train_5_unlabeled",)
        return cfg

    def test_semi_loader_batches_and_repeats(self):
        cfg = self._cfg()
        seen = []
        for labeled, unlabeled in itertools.islice(iter(build_semi_train_loader(cfg)), 6):
            self.assertEqual((len(labeled), len(unlabeled)), (2, 3))
            self.assertTrue(all(tuple(d["sem_seg"].shape) == (32, 32) for d in labeled))
            self.assertTrue(all("sem_seg" not in d and tuple(d["image_strong"].shape) == (3, 32, 32) for d in unlabeled))
            seen += [d["file_name"] for d in labeled]
        labeled_files = {r["file_name"] for r in DatasetCatalog.get("camvid_mini_train_5_labeled")}
        self.assertEqual(set(seen), labeled_files)  # 12 draws from 5 images: every one, with repeats

    def test_labeled_sources_with_ratios(self):
        self.assertEqual(split_batch(4, [1, 1]), [2, 2])
        self.assertEqual(split_batch(5, [3, 1]), [4, 1])
        self.assertEqual(sum(split_batch(7, [0.2, 0.3, 0.5])), 7)
        cfg = self._cfg()
        cfg.SOLVER.IMS_PER_BATCH = 4
        cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 1
        cfg.DATASETS.TRAIN_LABELED = ("camvid_mini_train_5_labeled", "camvid_mini_val")
        cfg.DATASETS.TRAIN_LABELED_RATIOS = [3, 1]
        val_files = {r["file_name"] for r in DatasetCatalog.get("camvid_mini_val")}
        for labeled, _ in itertools.islice(iter(build_semi_train_loader(cfg)), 2):
            self.assertEqual([d["file_name"] in val_files for d in labeled], [False, False, False, True])

    def test_semi_loader_errors(self):
        cfg = self._cfg()
        cfg.DATASETS.TRAIN_UNLABELED = ()
        with self.assertRaisesRegex(ValueError, "DATASETS.TRAIN_UNLABELED"):
            build_semi_train_loader(cfg)
        cfg = self._cfg()
        cfg.DATASETS.TRAIN_UNLABELED = ("cityscapes_fine_train_186_unlabeled",)
        with self.assertRaisesRegex(ValueError, "stuff_classes"):
            build_semi_train_loader(cfg)
        cfg = self._cfg()
        cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 0
        with self.assertRaisesRegex(ValueError, "IMS_PER_BATCH_UNLABELED"):
            build_semi_train_loader(cfg)
        meta = {k: v for k, v in MetadataCatalog.get("camvid_mini_train").as_dict().items() if k != "name"}
        register_sem_seg("empty_unlabeled_test", lambda: [], **meta)
        try:
            cfg = self._cfg()
            cfg.DATASETS.TRAIN_UNLABELED = ("empty_unlabeled_test",)
            with self.assertRaisesRegex(ValueError, "empty_unlabeled_test"):
                build_semi_train_loader(cfg)
        finally:
            unregister(["empty_unlabeled_test"])

    def test_supervised_and_test_loaders(self):
        cfg = self._cfg()
        cfg.DATASETS.TRAIN = ("camvid_mini_train_5_labeled",)
        batch = next(iter(build_sem_seg_train_loader(cfg)))
        self.assertEqual(len(batch), 2)
        test = list(build_sem_seg_test_loader(cfg, "camvid_mini_val"))
        self.assertEqual(len(test), 12)
        self.assertTrue(all(len(b) == 1 and tuple(b[0]["image"].shape) == (3, 360, 480) for b in test[:2]))


if __name__ == "__main__":
    unittest.main()
