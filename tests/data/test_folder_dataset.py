"""Folder datasets ("your own data, no code"): registration from code and from DATASETS.FOLDERS, mask matching,
bad masks named with file and value, tools/register_folder.py, and a short semi-supervised run of
tools/train_net.py on a labeled folder + an unlabeled folder built from real bundled CamVid frames."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import semiseg_d2  # noqa: F401  registers the builtin datasets
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, MetadataCatalog
from semiseg_d2.config import get_semiseg_cfg
from semiseg_d2.data.datasets import register_folder_dataset, register_folder_datasets_from_cfg, unregister
from semiseg_d2.data.datasets.register_camvid import CAMVID_CLASSES, CAMVID_VOID
from semiseg_d2.data.label_io import load_sem_seg

from tests.tiny import BUNDLED_CAMVID, semi_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES = sorted(os.listdir(os.path.join(BUNDLED_CAMVID, "train")))  # 41 real CamVid frames (480x360)
SMALL = (96, 72)  # (w, h): a fifth of the frame keeps the tests fast


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy_frames(stems_idx, image_dir, mask_dir=None, mask_suffix="", image_ext=".jpg"):
    """Bundled frames ``FRAMES[i]`` resized to SMALL; masks as class indices with void -> 255. Returns stems."""
    os.makedirs(image_dir, exist_ok=True)
    stems = []
    for i in stems_idx:
        stem = os.path.splitext(FRAMES[i])[0]
        with Image.open(os.path.join(BUNDLED_CAMVID, "train", FRAMES[i])) as img:
            img.convert("RGB").resize(SMALL, Image.BILINEAR).save(os.path.join(image_dir, stem + image_ext))
        if mask_dir is not None:
            os.makedirs(mask_dir, exist_ok=True)
            with Image.open(os.path.join(BUNDLED_CAMVID, "trainannot", stem + ".png")) as m:
                mask = np.asarray(m.resize(SMALL, Image.NEAREST)).copy()
            mask[mask == CAMVID_VOID] = 255
            Image.fromarray(mask).save(os.path.join(mask_dir, stem + mask_suffix + ".png"))
        stems.append(stem)
    return stems


@pytest.fixture
def names():
    """Dataset names a test registers; removed from the catalogs afterwards."""
    registered = []
    yield registered
    unregister(registered)


def _register(names, name, *args, **kwargs):
    names.append(name)
    return register_folder_dataset(name, *args, **kwargs)


def test_registration_records_and_metadata(tmp_path, names):
    lab = _copy_frames([3, 0, 1], str(tmp_path / "img"), str(tmp_path / "msk"))
    unl = _copy_frames([5, 6], str(tmp_path / "unl"))
    _register(names, "tf_reg_lab", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES)
    _register(names, "tf_reg_unl", str(tmp_path / "unl"), classes=CAMVID_CLASSES)

    recs = DatasetCatalog.get("tf_reg_lab")
    assert [r["image_id"] for r in recs] == sorted(lab)  # sorted by file name, not by copy order
    for r in recs:
        assert r["file_name"] == str(tmp_path / "img" / (r["image_id"] + ".jpg"))
        assert r["sem_seg_file_name"] == str(tmp_path / "msk" / (r["image_id"] + ".png"))
        assert r["dataset_name"] == "tf_reg_lab"
    unl_recs = DatasetCatalog.get("tf_reg_unl")
    assert [r["image_id"] for r in unl_recs] == sorted(unl)
    assert all("sem_seg_file_name" not in r for r in unl_recs)

    meta = MetadataCatalog.get("tf_reg_lab")
    assert meta.stuff_classes == CAMVID_CLASSES
    assert (meta.ignore_label, meta.evaluator_type, meta.label_id_map) == (255, "sem_seg", None)
    colors = meta.stuff_colors
    assert len(colors) == 11 and len({tuple(c) for c in colors}) == 11 and [0, 0, 0] not in colors
    # labels read through label_io with this metadata: class indices and 255 as written
    with Image.open(os.path.join(BUNDLED_CAMVID, "trainannot", lab[1] + ".png")) as m:
        expected = np.asarray(m.resize(SMALL, Image.NEAREST)).copy()
    expected[expected == CAMVID_VOID] = 255
    np.testing.assert_array_equal(load_sem_seg(recs[0]["sem_seg_file_name"], "tf_reg_lab"), expected)


def test_same_spec_again_is_a_no_op_other_spec_or_taken_name_is_an_error(tmp_path, names):
    _copy_frames([0, 1], str(tmp_path / "img"), str(tmp_path / "msk"))
    _register(names, "tf_idem", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES)
    loader = DatasetCatalog["tf_idem"]  # the registered function (DatasetCatalog is a dict of them)
    assert register_folder_dataset("tf_idem", str(tmp_path / "img"), str(tmp_path / "msk"),
                                   classes=CAMVID_CLASSES) == "tf_idem"
    assert DatasetCatalog["tf_idem"] is loader and len(DatasetCatalog.get("tf_idem")) == 2
    with pytest.raises(ValueError, match=r"'tf_idem' is already registered with a different spec.*ignore_label"):
        register_folder_dataset("tf_idem", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES,
                                ignore_label=254)
    with pytest.raises(ValueError, match="'camvid_mini_train' is already registered"):
        register_folder_dataset("camvid_mini_train", str(tmp_path / "img"), classes=CAMVID_CLASSES)


def test_mask_suffix_same_folder_list_and_select(tmp_path, names):
    d = str(tmp_path / "data")
    all_stems = _copy_frames([0, 1, 2, 3], d, d, mask_suffix="_mask", image_ext=".png")
    os.remove(os.path.join(d, all_stems[2] + "_mask.png"))  # frame 2 is not annotated
    with pytest.raises(ValueError, match="MASK_SUFFIX"):
        register_folder_dataset("tf_sel_bad", d, d, classes=CAMVID_CLASSES)  # same folder, no suffix
    _register(names, "tf_sel_with", d, d, classes=CAMVID_CLASSES, mask_suffix="_mask", select="with_mask")
    _register(names, "tf_sel_without", d, d, classes=CAMVID_CLASSES, mask_suffix="_mask", select="without_mask")
    with_mask = DatasetCatalog.get("tf_sel_with")
    assert [r["image_id"] for r in with_mask] == [all_stems[i] for i in (0, 1, 3)]  # "_mask.png" files are no images
    assert [r["sem_seg_file_name"] for r in with_mask] == [os.path.join(d, all_stems[i] + "_mask.png") for i in (0, 1, 3)]
    without = DatasetCatalog.get("tf_sel_without")
    assert [r["image_id"] for r in without] == [all_stems[2]] and "sem_seg_file_name" not in without[0]
    assert MetadataCatalog.get("tf_sel_without").sem_seg_root is None

    lst = tmp_path / "subset.txt"
    lst.write_text(f"# picked by hand\n{all_stems[3]}\nsome/dir/{all_stems[0]}.png\n")  # any split-list format
    _register(names, "tf_sel_list", d, d, classes=CAMVID_CLASSES, mask_suffix="_mask", list_file=str(lst))
    assert [r["image_id"] for r in DatasetCatalog.get("tf_sel_list")] == [all_stems[3], all_stems[0]]  # list order
    lst.write_text(f"{all_stems[0]}\nnot_a_frame\n")
    _register(names, "tf_sel_list2", d, d, classes=CAMVID_CLASSES, mask_suffix="_mask", list_file=str(lst))
    with pytest.raises(FileNotFoundError, match=r"subset.txt have no image.*not_a_frame"):
        DatasetCatalog.get("tf_sel_list2")


def test_bad_mask_value_is_reported_with_file_and_value(tmp_path, names):
    stems = _copy_frames([0, 1, 2], str(tmp_path / "img"), str(tmp_path / "msk"))
    bad = str(tmp_path / "msk" / (stems[1] + ".png"))
    mask = np.asarray(Image.open(bad)).copy()
    mask[10:12, 20:23] = 17  # 11 classes: 17 is neither a class nor the ignore label
    Image.fromarray(mask).save(bad)
    _register(names, "tf_bad", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES)
    with pytest.raises(ValueError) as err:
        DatasetCatalog.get("tf_bad")
    msg = str(err.value)
    assert f"{bad}: value(s) 17 (6 px)" in msg and "IGNORE_LABEL 255" in msg
    assert str(tmp_path / "msk" / (stems[0] + ".png")) not in msg  # good masks are not blamed

    # without the up-front check the first read of that mask (mapper / evaluator path) still fails, naming it
    _register(names, "tf_bad_lazy", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES,
              check_masks=False)
    recs = DatasetCatalog.get("tf_bad_lazy")
    with pytest.raises(ValueError, match=rf"{bad}: value\(s\) 17 "):
        load_sem_seg(recs[1]["sem_seg_file_name"], "tf_bad_lazy")

    tool = _load_tool("register_folder")
    rc = tool.main(["--name", "tf_bad_cli", "--image-dir", str(tmp_path / "img"), "--mask-dir", str(tmp_path / "msk"),
                    "--classes", *CAMVID_CLASSES, "--check"])
    names.append("tf_bad_cli")
    assert rc == 1


def test_mask_of_other_size_is_reported(tmp_path, names):
    stems = _copy_frames([0, 1], str(tmp_path / "img"), str(tmp_path / "msk"))
    path = str(tmp_path / "msk" / (stems[0] + ".png"))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    _register(names, "tf_size", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES)
    with pytest.raises(ValueError, match=rf"{path} is 10x10 but .*{stems[0]}.jpg is 96x72"):
        DatasetCatalog.get("tf_size")


def test_missing_masks_and_empty_folders_are_errors(tmp_path, names):
    stems = _copy_frames([0, 1, 2], str(tmp_path / "img"), str(tmp_path / "msk"))
    os.remove(str(tmp_path / "msk" / (stems[2] + ".png")))
    Image.open(str(tmp_path / "img" / (stems[2] + ".jpg"))).save(str(tmp_path / "msk" / (stems[2] + ".jpg")))
    _register(names, "tf_missing", str(tmp_path / "img"), str(tmp_path / "msk"), classes=CAMVID_CLASSES)
    with pytest.raises(FileNotFoundError) as err:
        DatasetCatalog.get("tf_missing")
    msg = str(err.value)
    assert "1 of 3 image(s) have no mask" in msg and str(tmp_path / "img" / (stems[2] + ".jpg")) in msg
    assert "masks must be '.png'" in msg and "SELECT 'with_mask'" in msg

    os.makedirs(tmp_path / "empty" / "sub")
    _register(names, "tf_empty", str(tmp_path / "empty"), classes=CAMVID_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"no images .* in .*empty \(1 sub-folder"):
        DatasetCatalog.get("tf_empty")
    _register(names, "tf_nofolder", str(tmp_path / "nope"), classes=CAMVID_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nope"):
        DatasetCatalog.get("tf_nofolder")


def test_bad_arguments_name_the_key_and_value(tmp_path):
    d = str(tmp_path)
    with pytest.raises(ValueError, match="IGNORE_LABEL 3 is the index of class 'road'"):
        register_folder_dataset("tf_arg", d, d + "/m", classes=CAMVID_CLASSES, ignore_label=3)
    with pytest.raises(ValueError, match=r"CLASSES has duplicate name\(s\) \['car'\]"):
        register_folder_dataset("tf_arg", d, classes=["car", "road", "car"])
    with pytest.raises(ValueError, match=r"COLORS\[1\] \(class 'b'\)"):
        register_folder_dataset("tf_arg", d, classes=["a", "b"], colors=[[0, 0, 0], [0, 300, 0]])
    with pytest.raises(ValueError, match="SELECT 'with_mask' needs MASK_DIR"):
        register_folder_dataset("tf_arg", d, classes=["a"], select="with_mask")
    assert "tf_arg" not in DatasetCatalog


def _folders_cfg(folders, **datasets):
    cfg = get_semiseg_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 11
    node = CN({"DATASETS": {"FOLDERS": folders, **datasets}})
    cfg.merge_from_other_cfg(node)
    return cfg


def test_config_driven_registration_relative_to_cwd(tmp_path, names, monkeypatch):
    _copy_frames([0, 1], str(tmp_path / "data" / "images"), str(tmp_path / "data" / "masks"))
    _copy_frames([4, 5, 6], str(tmp_path / "data" / "unlabeled"))
    (tmp_path / "cfg.yaml").write_text(
        "DATASETS:\n"
        "  FOLDERS:\n"
        "    tf_cfg_lab: {IMAGE_DIR: data/images, MASK_DIR: data/masks, CLASSES: [" + ", ".join(CAMVID_CLASSES) + "],"
        " IGNORE_LABEL: 255}\n"
        "    tf_cfg_unl: {IMAGE_DIR: data/unlabeled, CLASSES: [" + ", ".join(CAMVID_CLASSES) + "]}\n"
        '  TRAIN_LABELED: ("tf_cfg_lab",)\n'
        '  TRAIN_UNLABELED: ("tf_cfg_unl",)\n'
        "MODEL:\n  SEM_SEG_HEAD:\n    NUM_CLASSES: 11\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = get_semiseg_cfg()
    cfg.merge_from_file("cfg.yaml")
    names.extend(["tf_cfg_lab", "tf_cfg_unl"])
    assert register_folder_datasets_from_cfg(cfg) == ["tf_cfg_lab", "tf_cfg_unl"]
    assert register_folder_datasets_from_cfg(cfg) == ["tf_cfg_lab", "tf_cfg_unl"]  # idempotent
    monkeypatch.chdir(ROOT)  # paths were made absolute at registration
    assert MetadataCatalog.get("tf_cfg_lab").image_root == str(tmp_path / "data" / "images")
    assert len(DatasetCatalog.get("tf_cfg_lab")) == 2 and len(DatasetCatalog.get("tf_cfg_unl")) == 3
    assert all("sem_seg_file_name" not in r for r in DatasetCatalog.get("tf_cfg_unl"))

    other = _folders_cfg({"tf_cfg_lab": {"IMAGE_DIR": str(tmp_path / "data" / "unlabeled"), "CLASSES": CAMVID_CLASSES}})
    with pytest.raises(ValueError, match=r"DATASETS.FOLDERS.tf_cfg_lab: folder dataset 'tf_cfg_lab' is already "
                                         r"registered with a different spec \(image_dir: .*mask_dir"):
        register_folder_datasets_from_cfg(other)


def test_config_keys_are_validated_strictly(tmp_path):
    bad_key = _folders_cfg({"tf_key": {"IMAGE_DIR": str(tmp_path), "MASKDIR": "m", "CLASSES": ["a"]}})
    with pytest.raises(KeyError, match=r"DATASETS.FOLDERS.tf_key: unknown key 'MASKDIR' \(did you mean 'MASK_DIR'\?\)"):
        register_folder_datasets_from_cfg(bad_key)
    no_dir = _folders_cfg({"tf_key": {"MASK_DIR": str(tmp_path), "CLASSES": ["a"]}})
    with pytest.raises(KeyError, match="DATASETS.FOLDERS.tf_key: missing key IMAGE_DIR"):
        register_folder_datasets_from_cfg(no_dir)
    wrong_count = _folders_cfg({"tf_key": {"IMAGE_DIR": str(tmp_path), "CLASSES": ["a", "b"]}},
                               TRAIN_UNLABELED=("tf_key",))
    with pytest.raises(ValueError, match=r"tf_key has 2 CLASSES but MODEL.SEM_SEG_HEAD.NUM_CLASSES is 11 "
                                         r"\(DATASETS.TRAIN_UNLABELED uses 'tf_key'\)"):
        register_folder_datasets_from_cfg(wrong_count)
    assert "tf_key" not in DatasetCatalog


def test_tool_check_histogram_yaml_and_camvid_layout(tmp_path, names, capsys):
    tool = _load_tool("register_folder")
    out = tmp_path / "camvid_folders"
    assert tool.main(["--layout-camvid", str(out)]) == 0
    counts = {d: len(os.listdir(out / d)) for d in tool.CAMVID_LAYOUT}
    assert counts == {"images": 5, "masks": 5, "unlabeled": 36, "val_images": 12, "val_masks": 12}
    assert not set(os.listdir(out / "unlabeled")) & set(os.listdir(out / "images"))
    hist = np.zeros(256, np.int64)
    for f in sorted(os.listdir(out / "masks")):
        m = np.asarray(Image.open(out / "masks" / f))
        raw = np.asarray(Image.open(os.path.join(BUNDLED_CAMVID, "trainannot", f)))
        np.testing.assert_array_equal(m, np.where(raw == CAMVID_VOID, 255, raw))
        hist += np.bincount(m.ravel(), minlength=256)
    capsys.readouterr()

    args = ["--name", "tf_tool", "--image-dir", str(out / "images"), "--mask-dir", str(out / "masks"),
            "--unlabeled-dir", str(out / "unlabeled"), "--classes", *CAMVID_CLASSES]
    names.extend(["tf_tool", "tf_tool_unlabeled"])
    assert tool.main(args + ["--check"]) == 0
    text = capsys.readouterr().out
    assert "tf_tool: 5 labeled image(s)" in text and "tf_tool_unlabeled: 36 unlabeled image(s)" in text
    for i, cname in enumerate(CAMVID_CLASSES):  # per-class pixel counts equal our own count of the masks
        assert f"{i:>4}  {cname:<20} {int(hist[i]):>12}" in text
    assert f" 255  {'(ignore)':<20} {int(hist[255]):>12}" in text

    cfg_path = tmp_path / "cfgs" / "mine.yaml"
    assert tool.main(args + ["--yaml", str(cfg_path), "--base", os.path.join(ROOT, "configs/camvid/demo_semi_cpu.yaml")]) == 0
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(str(cfg_path))
    assert list(cfg.DATASETS.TRAIN_LABELED) == ["tf_tool"] and list(cfg.DATASETS.TRAIN_UNLABELED) == ["tf_tool_unlabeled"]
    assert cfg.MODEL.META_ARCHITECTURE == "SemiSegmentor"  # from the _BASE_
    assert list(cfg.DATASETS.FOLDERS.tf_tool.CLASSES) == CAMVID_CLASSES
    assert register_folder_datasets_from_cfg(cfg) == ["tf_tool", "tf_tool_unlabeled"]  # same spec as the CLI's


def test_train_net_on_labeled_and_unlabeled_folders(tmp_path, names):
    """tools/train_net.py's setup() registers DATASETS.FOLDERS; a SemiSegmentor trains a few iterations on a
    labeled folder (the annotated images of a partly annotated folder), an unlabeled folder and evaluates on
    a val folder."""
    train_net = _load_tool("train_net")
    data = tmp_path / "data"
    lab = _copy_frames([0, 10, 20, 30], str(data / "images"), str(data / "masks"))
    extra = _copy_frames([1, 11, 21], str(data / "images"))  # in the folder, not annotated
    _copy_frames([2, 12, 22, 32], str(data / "unlabeled"))
    val_dir = str(data / "val")
    _copy_frames([40, 25], val_dir, val_dir, mask_suffix="_label")

    cfg = semi_cfg(**{"SOLVER.MAX_ITER": 4, "SEMI.BURN_IN_ITERS": 1, "SEMI.MIX.PROB": 1.0,
                      "SOLVER.CHECKPOINT_PERIOD": 1000, "TEST.EVAL_PERIOD": 0, "SEED": 2})
    classes = list(CAMVID_CLASSES)
    cfg.DATASETS.FOLDERS = CN({
        "tf_e2e_lab": {"IMAGE_DIR": "data/images", "MASK_DIR": "data/masks", "CLASSES": classes, "SELECT": "with_mask"},
        "tf_e2e_rest": {"IMAGE_DIR": "data/images", "MASK_DIR": "data/masks", "CLASSES": classes,
                        "SELECT": "without_mask"},
        "tf_e2e_unl": {"IMAGE_DIR": "data/unlabeled", "CLASSES": classes},
        "tf_e2e_val": {"IMAGE_DIR": "data/val", "MASK_DIR": "data/val", "MASK_SUFFIX": "_label", "CLASSES": classes},
    }, new_allowed=True)
    cfg.DATASETS.TRAIN_LABELED = ("tf_e2e_lab",)
    cfg.DATASETS.TRAIN_UNLABELED = ("tf_e2e_unl", "tf_e2e_rest")
    cfg.DATASETS.TEST = ("tf_e2e_val",)
    cfg.OUTPUT_DIR = "out"
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    names.extend(["tf_e2e_lab", "tf_e2e_rest", "tf_e2e_unl", "tf_e2e_val"])

    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths in the config are relative to the working directory
    try:
        args = train_net.default_argument_parser().parse_args(["--config-file", "cfg.yaml", "DATALOADER.NUM_WORKERS", "0"])
        run_cfg = train_net.setup(args)
        trainer = train_net.build_trainer(run_cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        os.chdir(cwd)

    assert [r["image_id"] for r in DatasetCatalog.get("tf_e2e_lab")] == sorted(lab)
    unlabeled = DatasetCatalog.get("tf_e2e_unl") + DatasetCatalog.get("tf_e2e_rest")
    assert len(unlabeled) == 7 and all("sem_seg_file_name" not in r for r in unlabeled)
    assert sorted(r["image_id"] for r in DatasetCatalog.get("tf_e2e_rest")) == sorted(extra)
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 4 and all(math.isfinite(v) for v, _ in history)
    assert "loss_pseudo_label" in trainer.storage.histories()  # the unlabeled folder fed the semi-supervised term
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    results = trainer._last_eval_results  # the val folder through SemSegEvaluator, student and teacher
    assert set(results) == {"student", "teacher"}
    assert all(0.0 <= results[n]["sem_seg"]["mIoU"] <= 100.0 for n in results), results
    with open(tmp_path / "out" / "metrics.json") as f:
        assert any("total_loss" in json.loads(line) for line in f)


def test_tool_refuses_a_semi_supervised_base_without_unlabeled_images(tmp_path, names, capsys):
    tool = _load_tool("register_folder")
    data = tmp_path / "data"
    _copy_frames([0, 10], str(data / "images"), str(data / "masks"))
    args = ["--name", "tf_nounl", "--image-dir", str(data / "images"), "--mask-dir", str(data / "masks"),
            "--classes", *CAMVID_CLASSES]
    names.append("tf_nounl")
    semi_path, sup_path = tmp_path / "semi.yaml", tmp_path / "sup.yaml"
    capsys.readouterr()
    assert tool.main(args + ["--yaml", str(semi_path), "--base", os.path.join(ROOT, "configs/camvid/demo_semi_cpu.yaml")]) == 1
    err = capsys.readouterr().err
    assert "is semi-supervised (MODEL.META_ARCHITECTURE SemiSegmentor) and needs unlabeled images" in err
    assert "--unlabeled-dir" in err and tool.SUPERVISED_BASE_EXAMPLE in err
    assert not semi_path.exists()
    # the supervised base it names takes the same folders
    assert tool.main(args + ["--yaml", str(sup_path), "--base", os.path.join(ROOT, tool.SUPERVISED_BASE_EXAMPLE)]) == 0
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(str(sup_path))
    assert cfg.MODEL.META_ARCHITECTURE == "Segmentor"
    assert list(cfg.DATASETS.TRAIN) == ["tf_nounl"] and list(cfg.DATASETS.TRAIN_UNLABELED) == []
