"""Bad data during a run (issue 19), on small real CamVid frames laid out as folders: every unreadable image or
mask is named with its file and dataset (labeled, unlabeled and test sets; in the main process and in loader
workers), the unlabeled skip policy (deterministic replacement, logged once, counted, limited), and
tools/register_folder.py --check --decode."""
import importlib.util
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import semiseg_d2  # noqa: F401  registers the builtin datasets
from semiseg_d2.data.build import build_sem_seg_test_loader, build_semi_train_loader
from semiseg_d2.data.datasets import register_folder_dataset, unregister
from semiseg_d2.data.datasets.register_camvid import CAMVID_CLASSES
from semiseg_d2.data.io import UnreadableFileError, read_image

from tests.data.test_folder_dataset import _copy_frames
from tests.tiny import semi_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_DAMAGE = ("truncated", "empty", "text")
MASK_DAMAGE = ("mode", "size")


def damage_image(path: str, how: str) -> None:
    """The ways real collections are damaged: a cut-off download, a zero-byte file, a text file named .jpg."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        if how == "truncated":
            f.write(data[: len(data) // 2])  # the header survives: only a full decode notices
        elif how == "text":
            f.write(b"<html>404 Not Found</html>\n")
        else:
            assert how == "empty"


def damage_mask(path: str, how: str) -> None:
    with Image.open(path) as m:
        mask = np.asarray(m).copy()
    if how == "mode":  # an RGB rendering of the mask instead of class indices
        Image.fromarray(np.stack([mask] * 3, axis=-1)).save(path)
    else:
        Image.fromarray(mask[:-8]).save(path)  # 8 rows short of its image


@pytest.fixture
def folders(tmp_path):
    """Three tiny folder datasets of real frames: labeled (2 + masks), unlabeled (6), test (2 + masks)."""
    root = tmp_path / "data"
    sets = {
        "bd_lab": _copy_frames([0, 10], str(root / "images"), str(root / "masks")),
        "bd_unl": _copy_frames([1, 5, 11, 21, 31, 35], str(root / "unlabeled")),
        "bd_val": _copy_frames([40, 25], str(root / "val"), str(root / "val_masks")),
    }
    yield root, sets
    unregister(list(sets))


def _register(root, check_masks=True):
    register_folder_dataset("bd_lab", str(root / "images"), str(root / "masks"), classes=CAMVID_CLASSES,
                            check_masks=check_masks)
    register_folder_dataset("bd_unl", str(root / "unlabeled"), classes=CAMVID_CLASSES)
    register_folder_dataset("bd_val", str(root / "val"), str(root / "val_masks"), classes=CAMVID_CLASSES,
                            check_masks=check_masks)


def _cfg(workers, **extra):
    return semi_cfg(**{"DATASETS.TRAIN_LABELED": ("bd_lab",), "DATASETS.TRAIN_UNLABELED": ("bd_unl",),
                       "DATALOADER.NUM_WORKERS": workers, "INPUT.SCALE_RANGE": [0.8, 1.0], "SEED": 5, **extra})


def _first_batches(cfg, n=1, start=0):
    loader = build_semi_train_loader(cfg)
    loader.set_start(start)
    it = iter(loader)
    return loader, [next(it) for _ in range(n)]


def _run_until_error(which, workers, cfg_extra=None):
    """Build and iterate what reads ``which`` ("labeled" / "unlabeled": the train loader, "test": the test
    loader) and return the error it raises."""
    with pytest.raises(ValueError) as e:
        if which == "test":
            for _ in build_sem_seg_test_loader(_cfg(workers), "bd_val"):
                pass
        else:
            _first_batches(_cfg(workers, **(cfg_extra or {})), n=3)  # 3 batches: every image of each set
    return e


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("which,dataset,folder", [("labeled", "bd_lab", "images"), ("unlabeled", "bd_unl", "unlabeled"),
                                                  ("test", "bd_val", "val")])
@pytest.mark.parametrize("how", IMAGE_DAMAGE)
def test_unreadable_image_names_file_and_dataset(folders, how, which, dataset, folder, workers):
    root, sets = folders
    bad = str(root / folder / (sets[dataset][0] + ".jpg"))
    damage_image(bad, how)
    _register(root)
    e = _run_until_error(which, workers)
    # at start-up (labeled: the header check of CHECK_MASKS) or in the mapper, in this process or a worker
    assert f"unreadable image '{bad}' of dataset '{dataset}'" in str(e.value)
    reason = {"truncated": "truncated", "empty": "empty file (0 bytes)", "text": "cannot identify image file"}[how]
    assert reason in str(e.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_labeled_image_fails_in_the_mapper_with_its_type(folders, workers):
    """A truncated JPEG passes the start-up header check; the mapper's error keeps its type across workers."""
    root, sets = folders
    bad = str(root / "images" / (sets["bd_lab"][1] + ".jpg"))
    damage_image(bad, "truncated")
    _register(root)
    with pytest.raises(UnreadableFileError, match=f"unreadable image '{bad}' of dataset 'bd_lab': image file is trunc"):
        _first_batches(_cfg(workers))


@pytest.mark.parametrize("how", MASK_DAMAGE)
@pytest.mark.parametrize("dataset,folder", [("bd_lab", "masks"), ("bd_val", "val_masks")])
def test_bad_mask_stops_start_up_naming_file_and_dataset(folders, how, dataset, folder):
    root, sets = folders
    bad = str(root / folder / (sets[dataset][0] + ".png"))
    damage_mask(bad, how)
    _register(root)
    e = _run_until_error("test" if dataset == "bd_val" else "labeled", 0)
    msg = str(e.value)
    assert f"folder dataset '{dataset}'" in msg and bad in msg
    assert ("mode RGB" if how == "mode" else "differ in size") in msg


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", MASK_DAMAGE)
def test_bad_mask_met_in_training_names_file_and_dataset(folders, how, workers):
    """CHECK_MASKS off: the labeled mapper meets the mask and names it, the dataset and (size) the image."""
    root, sets = folders
    bad = str(root / "masks" / (sets["bd_lab"][0] + ".png"))
    damage_mask(bad, how)
    _register(root, check_masks=False)
    msg = str(_run_until_error("labeled", workers).value)
    if how == "mode":
        assert f"label file {bad} of dataset 'bd_lab': expected a single-channel PNG (mode L/P), got mode RGB" in msg
    else:
        image = str(root / "images" / (sets["bd_lab"][0] + ".jpg"))
        assert f"label {bad} is 96x64 (WxH) but image {image} is 96x72 (dataset 'bd_lab')" in msg


def test_reader_matches_detectron2_on_good_files_and_names_missing_ones(folders):
    root, sets = folders
    from detectron2.data.detection_utils import read_image as d2_read_image

    path = str(root / "unlabeled" / (sets["bd_unl"][0] + ".jpg"))
    np.testing.assert_array_equal(read_image(path, "bd_unl"), d2_read_image(path, format="RGB"))
    np.testing.assert_array_equal(read_image(path, format="BGR"), d2_read_image(path, format="BGR"))
    with pytest.raises(UnreadableFileError, match="unreadable image '/nowhere/a.jpg' of dataset 'x': .*No such file"):
        read_image("/nowhere/a.jpg", "x")


# ---------------------------------------------------------------------------------------------- skip policy
def _unlabeled_names(batches):
    return [d["file_name"] for _, unl in batches for d in unl]


def test_skip_replaces_deterministically_logs_once_and_resumes_exactly(folders, caplog):
    root, sets = folders
    bad = str(root / "unlabeled" / (sets["bd_unl"][2] + ".jpg"))
    damage_image(bad, "text")
    _register(root)
    skip = {"DATALOADER.UNREADABLE_UNLABELED": "skip", "DATALOADER.MAX_UNREADABLE": 0.2}  # 1 of 6 allowed
    with caplog.at_level(logging.WARNING, logger="semiseg_d2.data.stream"):
        loader, full = _first_batches(_cfg(0, **skip), n=9)  # 18 unlabeled samples = 3 epochs of 6
    names = _unlabeled_names(full)
    assert bad not in names and len(names) == 18
    assert list(loader.unreadable) == [bad] and "cannot identify image file" in loader.unreadable[bad]
    warnings = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(warnings) == 1, warnings  # met once per epoch, logged once
    # every other file still comes once per epoch; the bad one's slot holds a replacement from the same set
    epoch0 = names[:6]
    assert set(epoch0) <= {str(root / "unlabeled" / (s + ".jpg")) for s in sets["bd_unl"]}
    assert len(set(epoch0)) == 5  # the 5 good files; the replacement repeats one of them

    # resumed at batch 4 with 2 workers: the same samples, pixel for pixel, and the same replacements
    _, resumed = _first_batches(_cfg(2, **skip), n=5, start=4)
    for (la, ua), (lb, ub) in zip(full[4:], resumed):
        for x, y in zip(la + ua, lb + ub):
            assert x["file_name"] == y["file_name"]
            assert torch.equal(x["image"], y["image"])
            if "image_strong" in x:
                assert torch.equal(x["image_strong"], y["image_strong"])

    # the same stream with the bad file repaired differs only at the bad file's positions
    _copy_frames([11], str(root / "unlabeled"))
    _, repaired = _first_batches(_cfg(0, **skip), n=9)
    fixed = _unlabeled_names(repaired)
    assert [i for i, (a, b) in enumerate(zip(names, fixed)) if a != b] == [i for i, n in enumerate(fixed) if n == bad]


def test_skip_stops_past_max_unreadable_naming_every_bad_file(folders):
    root, sets = folders
    bad = [str(root / "unlabeled" / (sets["bd_unl"][i] + ".jpg")) for i in (0, 4)]
    damage_image(bad[0], "empty")
    damage_image(bad[1], "truncated")
    _register(root)
    with pytest.raises(UnreadableFileError) as e:
        _first_batches(_cfg(0, **{"DATALOADER.UNREADABLE_UNLABELED": "skip", "DATALOADER.MAX_UNREADABLE": 0.2}), n=3)
    msg = str(e.value)
    assert "2 unreadable unlabeled file(s), more than the 1 that DATALOADER.MAX_UNREADABLE allows" in msg
    assert all(f"unreadable image '{b}' of dataset 'bd_unl'" in msg for b in bad)


def test_labeled_images_are_never_skipped(folders):
    root, sets = folders
    bad = str(root / "images" / (sets["bd_lab"][0] + ".jpg"))
    damage_image(bad, "truncated")
    _register(root)
    with pytest.raises(UnreadableFileError, match=f"unreadable image '{bad}' of dataset 'bd_lab'"):
        _first_batches(_cfg(0, **{"DATALOADER.UNREADABLE_UNLABELED": "skip", "DATALOADER.MAX_UNREADABLE": 1.0}))


def test_unknown_policy_is_refused(folders):
    _register(folders[0])
    with pytest.raises(ValueError, match="DATALOADER.UNREADABLE_UNLABELED = 'ignore': unknown value; allowed: one of "
                                         "'error', 'skip'"):
        build_semi_train_loader(_cfg(0, **{"DATALOADER.UNREADABLE_UNLABELED": "ignore"}))


# ---------------------------------------------------------------------------------------------- the tool
def _tool():
    spec = importlib.util.spec_from_file_location("tool_register_folder", os.path.join(ROOT, "tools", "register_folder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_register_folder_check_decode_lists_every_unreadable_file(tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "camvid_folders"
    assert tool.main(["--layout-camvid", str(out)]) == 0
    names = ["bdt", "bdt_unlabeled", "bdt_val"]
    args = ["--name", "bdt", "--image-dir", str(out / "images"), "--mask-dir", str(out / "masks"), "--unlabeled-dir",
            str(out / "unlabeled"), "--val-image-dir", str(out / "val_images"), "--val-mask-dir", str(out / "val_masks"),
            "--classes", *CAMVID_CLASSES, "--check"]
    try:
        assert tool.main(args + ["--decode", "--jobs", "2"]) == 0
        assert "decoded all 70 image and mask file(s) of bdt, bdt_unlabeled, bdt_val: every one is readable" in \
            capsys.readouterr().out
        unl = sorted(os.listdir(out / "unlabeled"))
        damage_image(str(out / "unlabeled" / unl[3]), "truncated")
        damage_image(str(out / "unlabeled" / unl[7]), "empty")
        val_mask = sorted(os.listdir(out / "val_masks"))[0]
        damage_image(str(out / "val_masks" / val_mask), "text")

        unregister(names)
        assert tool.main(args) == 1  # --check alone: the bad val mask (read for the histogram), not the truncated JPEG
        err = capsys.readouterr().err
        assert str(out / "val_masks" / val_mask) in err and unl[3] not in err
        unregister(names)
        assert tool.main(args + ["--decode", "--jobs", "2"]) == 1
        captured = capsys.readouterr()
        assert "3 of 70 file(s) cannot be used:" in captured.out
        assert f"unreadable image '{out / 'unlabeled' / unl[3]}' of dataset 'bdt_unlabeled': image file is truncated" \
            in captured.out
        assert f"unreadable image '{out / 'unlabeled' / unl[7]}' of dataset 'bdt_unlabeled': empty file (0 bytes)" \
            in captured.out
        assert f"unreadable label '{out / 'val_masks' / val_mask}' of dataset 'bdt_val'" in captured.out
        assert "decode" in captured.err and "70/70" in captured.err  # the progress bar
    finally:
        unregister(names)


# ---------------------------------------------------------------------------------------------- crash and resume
def _train(cfg, resume=False):
    """An in-process SemiSegTrainer run (the model initialised from the SEED as tools/train_net.py does)."""
    from detectron2.utils.env import seed_all_rng

    from semiseg_d2.engine.trainer import SemiSegTrainer

    seed_all_rng(cfg.SEED)
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


def _run_cfg(out_dir, workers=0, **extra):
    return _cfg(workers, **{"SOLVER.MAX_ITER": 6, "SOLVER.CHECKPOINT_PERIOD": 2, "TEST.EVAL_PERIOD": 0,
                            "DATASETS.TEST": (), "OUTPUT_DIR": str(out_dir), **extra})


def _assert_same_weights(a_dir, b_dir):
    a, b = (torch.load(os.path.join(d, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
            for d in (a_dir, b_dir))
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_on_a_bad_file_after_a_checkpoint_resumes_exactly(folders, tmp_path):
    """A corrupt unlabeled file first met at iteration 2 (after the checkpoint of iteration 1) stops the run (the
    error raised in a loader worker) naming it; the checkpoint is intact, and once the file is repaired --resume
    ends with exactly the weights of an uninterrupted run."""
    root, sets = folders
    _register(root)
    ref_cfg = _run_cfg(tmp_path / "ref")
    stream = build_semi_train_loader(ref_cfg).streams[-1]
    met = [[stream.record(stream.position(b, j))["file_name"] for j in range(stream.batch_size)] for b in range(3)]
    bad = met[2][0]
    assert bad not in met[0] + met[1]  # first met at iteration 2
    _train(ref_cfg).train()

    good = open(bad, "rb").read()
    damage_image(bad, "truncated")
    run_dir = tmp_path / "run"
    crashed = _train(_run_cfg(run_dir, workers=2))
    with pytest.raises(UnreadableFileError, match=f"unreadable image '{bad}' of dataset 'bd_unl': image file is trunc"):
        crashed.train()
    assert crashed.iter == 2
    assert (run_dir / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (run_dir / "model_final.pth").exists()

    with open(bad, "wb") as f:
        f.write(good)
    resumed = _train(_run_cfg(run_dir), resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    _assert_same_weights(tmp_path / "ref", run_dir)


def test_skipped_files_are_counted_checkpointed_and_resume_stays_exact(folders, tmp_path):
    root, sets = folders
    bad = str(root / "unlabeled" / (sets["bd_unl"][3] + ".jpg"))
    damage_image(bad, "text")
    _register(root)
    skip = {"DATALOADER.UNREADABLE_UNLABELED": "skip", "DATALOADER.MAX_UNREADABLE": 0.2}
    full = _train(_run_cfg(tmp_path / "full", **skip))
    full.train()
    counts = [v for v, _ in full.storage.history("data/unreadable").values()]
    assert len(counts) == 6 and counts[-1] == 1 and set(counts) <= {0, 1}
    ckpt = torch.load(tmp_path / "full" / "model_0000003.pth", map_location="cpu", weights_only=True)
    assert list(ckpt["trainer"]["_trainer"]["unreadable"]) == [bad]

    # "interrupted" after the checkpoint of iteration 3: resume from it in a fresh output folder
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_0000003.pth").write_bytes((tmp_path / "full" / "model_0000003.pth").read_bytes())
    (run_dir / "last_checkpoint").write_text("model_0000003.pth")
    resumed = _train(_run_cfg(run_dir, workers=2, **skip), resume=True)
    assert resumed.start_iter == 4 and list(resumed.data_loader.unreadable) == [bad]
    resumed.train()
    _assert_same_weights(tmp_path / "full", run_dir)


@pytest.mark.parametrize("how", MASK_DAMAGE)
def test_bad_test_mask_met_in_evaluation_names_file_and_dataset(folders, how):
    """CHECK_MASKS off: the evaluator meets the test set's bad mask and names it and the dataset."""
    from semiseg_d2.evaluation import build_sem_seg_evaluator

    root, sets = folders
    bad = str(root / "val_masks" / (sets["bd_val"][0] + ".png"))
    image = str(root / "val" / (sets["bd_val"][0] + ".jpg"))
    damage_mask(bad, how)
    _register(root, check_masks=False)
    evaluator = build_sem_seg_evaluator(_cfg(0), "bd_val", distributed=False)
    evaluator.reset()
    with pytest.raises(ValueError) as e:
        evaluator.process([{"file_name": image}], [{"sem_seg": torch.zeros(11, 72, 96)}])  # the image's 96x72 size
    if how == "mode":
        assert f"label file {bad} of dataset 'bd_val': expected a single-channel PNG (mode L/P), got mode RGB" in str(e.value)
    else:
        assert f"label {bad} is 96x64 (WxH) but image {image} is 96x72 (dataset 'bd_val')" in str(e.value)
