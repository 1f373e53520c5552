"""Split lists: seeded partitions (reproducible, disjoint, complete), format round trips, the make_splits tool,
and that the shipped CamVid lists are what make_splits produces."""
import os
import unittest

import semiseg_d2  # noqa: F401
from detectron2.data import DatasetCatalog
from semiseg_d2.data.datasets.register_camvid import register_all_camvid
from semiseg_d2.data.datasets.register_voc import register_all_voc
from semiseg_d2.data.splits.splits import (
    SHIPPED_SPLITS_DIR,
    convert_list,
    entry_id,
    format_record,
    make_partition,
    parse_entry,
    partition_dataset,
    read_list,
)

from tests import synthetic_trees as st
from tests.data.test_datasets import _load_tool

SHARED_CAMVID = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..", "shared", "datasets", "camvid")


class TestPartition(unittest.TestCase):
    def test_seeded_disjoint_complete(self):
        ids = [f"img_{i:04d}" for i in range(367)]
        lab, unl = make_partition(ids, labeled=46, seed=0)
        self.assertEqual((len(lab), len(unl)), (46, 321))
        self.assertFalse(set(lab) & set(unl))
        self.assertEqual(set(lab) | set(unl), set(ids))
        self.assertEqual(make_partition(list(reversed(ids)), labeled=46, seed=0), (lab, unl))  # order-independent
        self.assertNotEqual(make_partition(ids, labeled=46, seed=1)[0], lab)
        self.assertEqual(len(make_partition(ids, ratio=1 / 8, seed=0)[0]), 46)
        with self.assertRaises(ValueError):
            make_partition(ids, labeled=0)
        with self.assertRaises(ValueError):
            make_partition(ids + ids[:1], labeled=3)

    def test_shipped_camvid_lists_are_reproducible(self):
        lab, unl = make_partition([r["image_id"] for r in DatasetCatalog.get("camvid_mini_train")], labeled=5, seed=0)
        d = os.path.join(SHIPPED_SPLITS_DIR, "camvid_mini", "5")
        self.assertEqual((read_list(os.path.join(d, "labeled.txt")), read_list(os.path.join(d, "unlabeled.txt"))), (lab, unl))
        if not os.path.isdir(os.path.join(SHARED_CAMVID, "train")):
            self.skipTest("../shared/datasets/camvid not present")
        ids = [os.path.splitext(f)[0] for f in os.listdir(os.path.join(SHARED_CAMVID, "train"))]
        lab, unl = make_partition(ids, labeled=46, seed=0)
        d = os.path.join(SHIPPED_SPLITS_DIR, "camvid", "46")
        self.assertEqual((read_list(os.path.join(d, "labeled.txt")), read_list(os.path.join(d, "unlabeled.txt"))), (lab, unl))


class TestFormats(st.TreeCase):
    def test_entry_parsing(self):
        self.assertEqual(entry_id("2007_000033"), "2007_000033")
        self.assertEqual(entry_id("JPEGImages/2007_000033.jpg SegmentationClass/2007_000033.png"), "2007_000033")
        self.assertEqual(entry_id("/JPEGImages/2007_000033.jpg\t/SegmentationClassAug/2007_000033.png"), "2007_000033")
        self.assertEqual(entry_id("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"), "aachen_000000_000019")
        self.assertEqual(parse_entry("a.jpg\tb.png"), ("a.jpg", "b.png"))
        with self.assertRaises(ValueError):
            parse_entry("a b c")

    def test_round_trips_through_a_registered_dataset(self):
        tree = st.make_voc_tree(self.root)
        self.names += register_all_voc(self.root, splits_dir=tree["splits_dir"], prefix="f_")
        name = "f_voc_2012_seg_train_aug"
        src = os.path.join(tree["splits_dir"], "2", "labeled.txt")
        out = {fmt: os.path.join(self.root, f"{fmt}.txt") for fmt in ("id", "path", "unimatch", "cps")}
        convert_list(src, out["unimatch"], "unimatch", dataset_name=name)
        self.assertEqual(read_list(out["unimatch"])[0], "JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png")
        convert_list(out["unimatch"], out["cps"], "cps")  # pair -> pair needs no dataset
        self.assertEqual(read_list(out["cps"])[1], "JPEGImages/2008_000002.jpg\tSegmentationClassAug/2008_000002.png")
        convert_list(out["cps"], out["path"], "path")
        self.assertEqual(read_list(out["path"]), ["JPEGImages/2007_000032.jpg", "JPEGImages/2008_000002.jpg"])
        convert_list(out["path"], out["id"], "id")
        self.assertEqual(read_list(out["id"]), read_list(src))
        back = os.path.join(self.root, "back.txt")
        convert_list(out["cps"], back, "unimatch")
        self.assertEqual(read_list(back), read_list(out["unimatch"]))
        with self.assertRaisesRegex(ValueError, "--dataset"):
            convert_list(src, back, "unimatch")  # ids alone do not say where the labels are
        rec = DatasetCatalog.get(name)[0]
        self.assertEqual(entry_id(format_record(rec, "cps", tree["voc_root"])), rec["image_id"])

    def test_make_splits_tool_partitions_a_dataset(self):
        st.make_camvid_tree(self.root)
        self.names += register_all_camvid(self.root, prefix="s_")
        out = os.path.join(self.root, "out")
        tool = _load_tool("make_splits")
        self.assertEqual(tool.main(["partition", "--dataset", "s_camvid_train", "--labeled", "1", "--seed", "0", "--out", out]), 0)
        lab, unl = read_list(os.path.join(out, "labeled.txt")), read_list(os.path.join(out, "unlabeled.txt"))
        self.assertEqual((lab, unl), partition_dataset("s_camvid_train", os.path.join(self.root, "again"), labeled=1, seed=0))
        self.assertEqual(sorted(lab + unl), ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"])
        tool.main(["partition", "--dataset", "s_camvid_train", "--ratio", "0.5", "--format", "unimatch", "--out", out])
        first = read_list(os.path.join(out, "labeled.txt"))[0]
        self.assertRegex(first, r"^train/\S+\.png trainannot/\S+\.png$")


class TestClassPixelStats(unittest.TestCase):
    """make_splits.py stats: each class's share of a dataset's labeled pixels and the images that hold it."""

    def test_shares_and_images_are_counted_from_the_label_files(self):
        import json
        import tempfile

        import numpy as np
        from PIL import Image

        records = DatasetCatalog.get("camvid_mini_train_5_labeled")
        labels = [np.array(Image.open(r["sem_seg_file_name"])) for r in records]  # CamVid: train ids, 11 = void
        counts = np.stack([np.bincount(a.ravel(), minlength=12)[:11] for a in labels])
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "stats.json")
            self.assertEqual(_load_tool("make_splits").main(
                ["stats", "--dataset", "camvid_mini_train_5_labeled", "camvid_mini_val", "--min-share", "0.02",
                 "--json", out]), 0)
            with open(out) as f:
                got = json.load(f)
        first = got[0]
        self.assertEqual((first["dataset"], first["images"]), ("camvid_mini_train_5_labeled", len(records)))
        self.assertEqual(first["labeled_pixels"], int(counts.sum()))  # void pixels left out
        self.assertLess(first["labeled_pixels"], sum(a.size for a in labels))
        classes = list(first["classes"])
        self.assertEqual(classes[7], "fence")
        for i, c in enumerate(classes):
            self.assertAlmostEqual(first["classes"][c]["share"], counts[:, i].sum() / counts.sum(), places=12)
            held = sum(int(counts[k, i] >= 0.02 * labels[k].size) for k in range(len(labels)))
            self.assertEqual(first["classes"][c]["images"], held, c)
        self.assertAlmostEqual(sum(v["share"] for v in first["classes"].values()), 1.0, places=9)
        self.assertEqual(got[1]["dataset"], "camvid_mini_val")

    def test_a_dataset_without_labels_is_named(self):
        from semiseg_d2.data.splits.splits import class_pixel_stats

        with self.assertRaisesRegex(ValueError, "camvid_mini_train_5_unlabeled' has 36 image.*without sem_seg_file_name"):
            class_pixel_stats("camvid_mini_train_5_unlabeled")
        with self.assertRaisesRegex(KeyError, "'no_such_set' is not registered"):
            class_pixel_stats("no_such_set")


if __name__ == "__main__":
    unittest.main()
