"""Dataset registrations on synthetic trees laid out like the originals, bad inputs, and the real bundled CamVid."""
import importlib.util
import os
import unittest

import numpy as np

import semiseg_d2  # noqa: F401  registers the builtin datasets
from detectron2.data import DatasetCatalog, MetadataCatalog
from semiseg_d2.data.datasets import BUILTIN_DATASETS
from semiseg_d2.data.datasets.register_camvid import register_all_camvid
from semiseg_d2.data.datasets.register_cityscapes import register_all_cityscapes
from semiseg_d2.data.datasets.register_gta5 import register_all_gta5
from semiseg_d2.data.datasets.register_voc import register_all_voc
from semiseg_d2.data.label_io import load_sem_seg
from semiseg_d2.data.splits.splits import SHIPPED_SPLITS_DIR, entry_id, read_list

from tests import synthetic_trees as st

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TestVOC(st.TreeCase):
    def test_voc_tree(self):
        tree = st.make_voc_tree(self.root)
        names = self.register(register_all_voc, self.root, splits_dir=tree["splits_dir"], prefix="t_")
        self.assertEqual(
            set(names),
            {"t_voc_2012_seg_train", "t_voc_2012_seg_val", "t_voc_2012_seg_train_aug",
             "t_voc_2012_seg_train_aug_2_labeled", "t_voc_2012_seg_train_aug_2_unlabeled"},
        )
        train = DatasetCatalog.get("t_voc_2012_seg_train")
        self.assertEqual([r["image_id"] for r in train], tree["train"])
        self.assertTrue(all("/SegmentationClass/" in r["sem_seg_file_name"] for r in train))
        val = DatasetCatalog.get("t_voc_2012_seg_val")
        self.assertEqual([r["file_name"] for r in val], [os.path.join(tree["voc_root"], "JPEGImages", "2007_000033.jpg")])
        # train_aug: no train_aug.txt -> union of the split lists; labels from SegmentationClassAug
        aug = DatasetCatalog.get("t_voc_2012_seg_train_aug")
        self.assertEqual(sorted(r["image_id"] for r in aug), sorted(tree["aug"]))
        self.assertTrue(all("/SegmentationClassAug/" in r["sem_seg_file_name"] for r in aug))
        lab = DatasetCatalog.get("t_voc_2012_seg_train_aug_2_labeled")
        unl = DatasetCatalog.get("t_voc_2012_seg_train_aug_2_unlabeled")
        self.assertEqual([r["image_id"] for r in lab], ["2007_000032", "2008_000002"])
        self.assertEqual(len(unl), 3)
        self.assertTrue(all("sem_seg_file_name" not in r for r in unl))
        meta = MetadataCatalog.get("t_voc_2012_seg_train_aug")
        self.assertEqual(len(meta.stuff_classes), 21)
        self.assertEqual(len(meta.stuff_colors), 21)
        self.assertEqual(meta.stuff_colors[15], [192, 128, 128])  # person in the VOC palette
        self.assertEqual((meta.ignore_label, meta.evaluator_type), (255, "sem_seg"))
        self.assertEqual(meta.dataset_root, tree["voc_root"])
        # palette label read as indices; aug label is the aug file's content
        np.testing.assert_array_equal(load_sem_seg(train[0]["sem_seg_file_name"], "t_voc_2012_seg_train"),
                                      tree["labels"]["2007_000032"]["fine"])
        np.testing.assert_array_equal(load_sem_seg(lab[1]["sem_seg_file_name"], "t_voc_2012_seg_train_aug"),
                                      tree["labels"]["2008_000002"]["aug"])

    def test_builtin_names_do_not_clash_with_detectron2(self):
        for name in ("voc_2012_seg_train", "voc_2012_seg_val", "voc_2012_seg_train_aug", "voc_2012_seg_train_aug_1464_labeled",
                     "voc_2012_seg_train_aug_5291_unlabeled", "cityscapes_fine_train", "cityscapes_fine_val",
                     "cityscapes_fine_train_186_labeled", "gta5_train", "camvid_train", "camvid_val", "camvid_test",
                     "camvid_train_46_labeled", "camvid_mini_train_5_unlabeled"):
            self.assertIn(name, BUILTIN_DATASETS)
            self.assertEqual(MetadataCatalog.get(name).evaluator_type, "sem_seg")
        self.assertEqual(MetadataCatalog.get("cityscapes_fine_sem_seg_train").evaluator_type, "cityscapes_sem_seg")


class TestCityscapes(st.TreeCase):
    def test_label_ids_mapped_then_converted(self):
        tree = st.make_cityscapes_tree(self.root, train_ids=False)
        names = self.register(register_all_cityscapes, self.root, splits_dir=tree["splits_dir"], prefix="a_")
        self.assertEqual(set(names), {"a_cityscapes_fine_train", "a_cityscapes_fine_val",
                                      "a_cityscapes_fine_train_1_labeled", "a_cityscapes_fine_train_1_unlabeled"})
        train = DatasetCatalog.get("a_cityscapes_fine_train")
        self.assertEqual([r["image_id"] for r in train], tree["frames"]["train"])
        self.assertTrue(train[0]["sem_seg_file_name"].endswith("aachen_000000_000019_gtFine_labelIds.png"))
        meta = MetadataCatalog.get("a_cityscapes_fine_train")
        self.assertEqual(len(meta.stuff_classes), 19)
        self.assertIsNotNone(meta.label_id_map)
        np.testing.assert_array_equal(load_sem_seg(train[0]["sem_seg_file_name"], meta), st.stripes(st.CITY_TRAIN_IDS))
        self.assertEqual(len(DatasetCatalog.get("a_cityscapes_fine_val")), 1)
        lab = DatasetCatalog.get("a_cityscapes_fine_train_1_labeled")
        self.assertEqual([r["image_id"] for r in lab], ["bremen_000000_000019"])
        self.assertEqual(len(DatasetCatalog.get("a_cityscapes_fine_train_1_unlabeled")), 2)

        # the converter writes labelTrainIds equal to the on-the-fly mapping; a fresh registration uses them
        counts = _load_tool("prepare_cityscapes").convert_cityscapes(tree["city_root"])
        self.assertEqual(counts, {"written": 4, "kept": 0})
        self.assertEqual(_load_tool("prepare_cityscapes").convert_cityscapes(tree["city_root"]), {"written": 0, "kept": 4})
        self.register(register_all_cityscapes, self.root, splits_dir=tree["splits_dir"], prefix="b_")
        self.assertIsNone(MetadataCatalog.get("b_cityscapes_fine_train").label_id_map)
        rec = DatasetCatalog.get("b_cityscapes_fine_train")[0]
        self.assertTrue(rec["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png"))
        np.testing.assert_array_equal(load_sem_seg(rec["sem_seg_file_name"], "b_cityscapes_fine_train"),
                                      st.stripes(st.CITY_TRAIN_IDS))


class TestGTA5(st.TreeCase):
    def test_gta5_tree(self):
        tree = st.make_gta5_tree(self.root)
        self.register(register_all_gta5, self.root, prefix="t_")
        recs = DatasetCatalog.get("t_gta5_train")
        self.assertEqual([r["image_id"] for r in recs], tree["ids"])
        meta = MetadataCatalog.get("t_gta5_train")
        self.assertEqual(meta.stuff_classes, MetadataCatalog.get("cityscapes_fine_train").stuff_classes)
        self.assertEqual(meta.stuff_colors, MetadataCatalog.get("cityscapes_fine_train").stuff_colors)
        np.testing.assert_array_equal(load_sem_seg(recs[0]["sem_seg_file_name"], meta), st.stripes(tree["train_ids"]))


class TestCamVid(st.TreeCase):
    def test_camvid_tree(self):
        tree = st.make_camvid_tree(self.root, with_test=True)
        splits = os.path.join(self.root, "splits")
        st.write_list(os.path.join(splits, "camvid", "1", "labeled.txt"), ["0001TP_006720"])
        st.write_list(os.path.join(splits, "camvid", "1", "unlabeled.txt"), ["0001TP_006690", "Seq05VD_f00000"])
        names = self.register(register_all_camvid, self.root, splits_dir=splits, prefix="t_")
        self.assertIn("t_camvid_train_1_labeled", names)
        for split, frames in tree["frames"].items():
            recs = DatasetCatalog.get(f"t_camvid_{split}")
            self.assertEqual([r["image_id"] for r in recs], frames)
        rec = DatasetCatalog.get("t_camvid_train_1_labeled")[0]
        self.assertEqual(rec["file_name"], os.path.join(tree["camvid_root"], "train", "0001TP_006720.png"))
        np.testing.assert_array_equal(load_sem_seg(rec["sem_seg_file_name"], "t_camvid_train"), st.stripes([0, 3, 10, 255]))
        meta = MetadataCatalog.get("t_camvid_train")
        self.assertEqual(meta.stuff_classes[0], "sky")
        self.assertEqual(len(meta.stuff_classes), 11)


class TestBadInputs(st.TreeCase):
    def test_missing_root_names_path_and_env(self):
        missing = os.path.join(self.root, "nowhere")
        self.register(register_all_camvid, missing, prefix="m_")
        self.register(register_all_cityscapes, missing, prefix="m_")
        self.register(register_all_voc, missing, prefix="m_")
        self.register(register_all_gta5, missing, prefix="m_")
        for name, path in (("m_camvid_train", "camvid"), ("m_cityscapes_fine_val", "cityscapes"),
                           ("m_voc_2012_seg_val", os.path.join("VOCdevkit", "VOC2012")), ("m_gta5_train", "gta5")):
            with self.assertRaises(FileNotFoundError) as ctx:
                DatasetCatalog.get(name)
            msg = str(ctx.exception)
            self.assertIn(os.path.join(missing, path), msg)
            self.assertIn("DETECTRON2_DATASETS", msg)

    def test_split_entry_without_image(self):
        tree = st.make_voc_tree(self.root)
        list_path = os.path.join(tree["splits_dir"], "2", "labeled.txt")
        st.write_list(list_path, ["2007_000032", "2099_123456"])
        self.register(register_all_voc, self.root, splits_dir=tree["splits_dir"], prefix="e_")
        with self.assertRaises(FileNotFoundError) as ctx:
            DatasetCatalog.get("e_voc_2012_seg_train_aug_2_labeled")
        self.assertIn("2099_123456", str(ctx.exception))
        self.assertIn(list_path, str(ctx.exception))

    def test_bad_label_value_names_value_and_file(self):
        tree = st.make_camvid_tree(self.root)
        bad = os.path.join(tree["camvid_root"], "trainannot", "0001TP_006690.png")
        st.write_label(bad, st.stripes([0, 3, 12, 200]))
        self.register(register_all_camvid, self.root, prefix="b_")
        with self.assertRaises(ValueError) as ctx:
            load_sem_seg(bad, "b_camvid_train")
        msg = str(ctx.exception)
        self.assertIn(bad, msg)
        self.assertIn("12", msg)
        self.assertIn("200", msg)
        with self.assertRaises(FileNotFoundError) as ctx:
            load_sem_seg(os.path.join(self.root, "nope.png"), "b_camvid_train")
        self.assertIn("nope.png", str(ctx.exception))


class TestBundledCamVid(unittest.TestCase):
    def test_real_frames_and_shipped_splits(self):
        train = DatasetCatalog.get("camvid_mini_train")
        val = DatasetCatalog.get("camvid_mini_val")
        self.assertEqual((len(train), len(val)), (41, 12))
        seen = set()
        for rec in train[:6] + val[:2]:
            label = load_sem_seg(rec["sem_seg_file_name"], rec["dataset_name"])
            self.assertEqual(label.shape, (360, 480))
            values = set(np.unique(label).tolist())
            self.assertTrue(values <= set(range(11)) | {255}, values)
            seen |= values
        self.assertIn(255, seen)  # void 11 is mapped to ignore
        self.assertGreaterEqual(len(seen), 8)
        lab = DatasetCatalog.get("camvid_mini_train_5_labeled")
        unl = DatasetCatalog.get("camvid_mini_train_5_unlabeled")
        self.assertEqual((len(lab), len(unl)), (5, 36))
        ids = {r["image_id"] for r in lab} | {r["image_id"] for r in unl}
        self.assertEqual(ids, {r["image_id"] for r in train})
        # the full CamVid 1/8 split is shipped as ids: 46 + 321 = 367, disjoint
        full_lab = read_list(os.path.join(SHIPPED_SPLITS_DIR, "camvid", "46", "labeled.txt"))
        full_unl = read_list(os.path.join(SHIPPED_SPLITS_DIR, "camvid", "46", "unlabeled.txt"))
        self.assertEqual((len(full_lab), len(full_unl)), (46, 321))
        self.assertFalse(set(full_lab) & set(full_unl))
        self.assertTrue({r["image_id"] for r in train} <= set(full_lab) | set(full_unl))

    def test_shipped_pascal_and_cityscapes_lists(self):
        pascal = os.path.join(SHIPPED_SPLITS_DIR, "pascal")
        union = {entry_id(e) for p in ("labeled", "unlabeled") for e in read_list(os.path.join(pascal, "5291", f"{p}.txt"))}
        self.assertEqual(len(union), 10582)  # what voc_2012_seg_train_aug is derived from without train_aug.txt
        self.assertEqual(len(read_list(os.path.join(pascal, "val.txt"))), 1449)
        self.assertEqual(len(read_list(os.path.join(pascal, "1464", "labeled.txt"))), 1464)
        city = os.path.join(SHIPPED_SPLITS_DIR, "cityscapes", "186")
        self.assertEqual(len(read_list(os.path.join(city, "labeled.txt"))) + len(read_list(os.path.join(city, "unlabeled.txt"))), 2975)


class TestDatasetConfigs(unittest.TestCase):
    def test_dataset_configs_use_declared_keys_and_registered_sets(self):
        from semiseg_d2.config import get_semiseg_cfg

        files = [os.path.join(REPO, "configs", d, f) for d in ("camvid", "cityscapes", "voc", "gta5_city")
                 for f in sorted(os.listdir(os.path.join(REPO, "configs", d))) if f.endswith(".yaml")]
        self.assertGreaterEqual(len(files), 8)
        # a study protocol (configs/<set>/protocol_*.yaml) is not a config of its own: tools/run_study.py passes its
        # keys as overrides on top of every study_*.yaml of its folder and reads its STUDY settings itself
        _load_tool("run_study")  # puts tools/ (the study package) on sys.path
        from study.configs import protocol_overrides, protocol_settings

        checked = []
        for path in files:
            if os.path.basename(path).startswith("protocol_"):
                self.assertGreater(protocol_settings(path)["SCHEDULE_SCALE"], 0, path)
                folder = os.path.dirname(path)
                studies = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                           if f.startswith("study_") and f.endswith(".yaml")]
                self.assertTrue(studies, path)
                merges = [(study, protocol_overrides(path)) for study in studies]
            else:
                merges = [(path, [])]
            for config, overrides in merges:
                cfg = get_semiseg_cfg()
                cfg.merge_from_file(config)  # raises on any undeclared key
                cfg.merge_from_list(overrides)  # so do the protocol's keys
                checked.append(path)
                for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
                    self.assertIn(name, DatasetCatalog.list(), config)
                    self.assertEqual(len(MetadataCatalog.get(name).stuff_classes),
                                     cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, config)
        self.assertIn(os.path.join(REPO, "configs", "camvid", "protocol_cpu.yaml"), checked)


class TestPrepareCamVid(st.TreeCase):
    def test_copy_is_idempotent_and_registrable(self):
        tree = st.make_camvid_tree(os.path.join(self.root, "src"), with_test=True)
        dst = os.path.join(self.root, "d2", "camvid")
        tool = _load_tool("prepare_camvid")
        self.assertEqual(tool.prepare_camvid(tree["camvid_root"], dst), {"train": 3, "val": 1, "test": 2})
        self.assertEqual(tool.prepare_camvid(tree["camvid_root"], dst), {"train": 3, "val": 1, "test": 2})
        self.register(register_all_camvid, os.path.join(self.root, "d2"), prefix="p_")
        self.assertEqual(len(DatasetCatalog.get("p_camvid_test")), 2)
        os.remove(os.path.join(tree["camvid_root"], "valannot", "0016E5_07959.png"))
        os.remove(os.path.join(dst, "valannot", "0016E5_07959.png"))
        with self.assertRaisesRegex(FileNotFoundError, "without a label"):
            tool.prepare_camvid(tree["camvid_root"], dst)


if __name__ == "__main__":
    unittest.main()
