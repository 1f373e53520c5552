"""tools/eval_checkpoints.py: every checkpoint of a tiny semi-supervised CamVid run from some step on, evaluated as
--eval-only does, each file mapped to the number of steps it holds; the teacher - student summary."""
import importlib.util
import json
import math
import os

import pytest
import torch

from semiseg_d2.engine.trainer import SemiSegTrainer
from tests.engine.test_train_e2e import camvid_semi_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tool():
    spec = importlib.util.spec_from_file_location("eval_checkpoints", os.path.join(ROOT, "tools", "eval_checkpoints.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_files_map_to_the_steps_they_hold(tmp_path):
    tool = _load_tool()
    for name in ["model_0000009.pth", "model_0001149.pth", "model_0001189.pth", "model_final.pth",
                 "last_checkpoint", "model_001149.pth", "metrics.json"]:
        (tmp_path / name).write_bytes(b"")
    got = tool.list_checkpoints(str(tmp_path), max_iter=1200, from_iter=1150)
    assert got == [(1150, str(tmp_path / "model_0001149.pth")), (1190, str(tmp_path / "model_0001189.pth")),
                   (1200, str(tmp_path / "model_final.pth"))]
    assert [it for it, _ in tool.list_checkpoints(str(tmp_path), max_iter=1200)] == [10, 1150, 1190, 1200]
    assert [it for it, _ in tool.list_checkpoints(str(tmp_path), 1200, from_iter=10, to_iter=1190)] == [10, 1150, 1190]
    # --every: multiples of N only, and the final file whatever its step count
    assert [it for it, _ in tool.list_checkpoints(str(tmp_path), 1200, every=50)] == [1150, 1200]
    assert [it for it, _ in tool.list_checkpoints(str(tmp_path), 1205, every=10)] == [10, 1150, 1190, 1205]


def test_gap_summary():
    s = _load_tool().gap_summary([0.5, -0.25, 0.0, 1.0])
    assert s["mean"] == pytest.approx(0.3125)
    assert s["sd"] == pytest.approx(math.sqrt(((0.1875**2) + (0.5625**2) + (0.3125**2) + (0.6875**2)) / 3))
    assert (s["at_least_zero"], s["n"]) == (3, 4)


def _independent_eval(cfg, path):
    model = SemiSegTrainer.build_model(cfg)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"], strict=True)
    model.eval()
    return {n: r["sem_seg"]["mIoU"] for n, r in SemiSegTrainer.test(cfg, model).items()}


def test_every_checkpoint_from_an_iteration_is_evaluated_like_eval_only(tmp_path):
    cfg = camvid_semi_cfg(tmp_path, 6, **{"SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.BASE_LR": 0.05})
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    (tmp_path / "config.yaml").write_text(cfg.dump())
    in_memory = {n: r["sem_seg"]["mIoU"] for n, r in SemiSegTrainer.test(cfg, trainer.model).items()}
    before = sorted(os.listdir(tmp_path))

    out = tmp_path / "evals.json"
    assert _load_tool().main([str(tmp_path), "--from-iter", "3", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["checkpoints"]
    assert [(r["iteration"], r["file"]) for r in rows] == [(4, "model_0000003.pth"), (6, "model_final.pth")]
    assert rows[-1]["mIoU"] == pytest.approx(in_memory)  # the final file is the trained model
    for r in rows:
        assert set(r["mIoU"]) == {"student", "teacher"}
        assert r["mIoU"] == pytest.approx(_independent_eval(cfg, str(tmp_path / r["file"])))
        assert len(r["IoU"]["teacher"]) == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    gaps = [r["mIoU"]["teacher"] - r["mIoU"]["student"] for r in rows]
    assert record["teacher_minus_student"]["values"] == pytest.approx(gaps)
    assert record["teacher_minus_student"]["n"] == 2
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["evals.json"])  # nothing of the run rewritten


def test_any_registered_dataset_with_ground_truth_can_be_evaluated(tmp_path, capsys):
    """--dataset need not be one of the run's DATASETS.TEST (the labeled training frames: is a fall on val
    overfitting?); the figures are those of an --eval-only on that dataset."""
    cfg = camvid_semi_cfg(tmp_path, 4, **{"SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.BASE_LR": 0.05})
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    (tmp_path / "config.yaml").write_text(cfg.dump())
    tool = _load_tool()
    out = tmp_path / "train.json"
    train_set = cfg.DATASETS.TRAIN_LABELED[0]
    assert tool.main([str(tmp_path), "--every", "4", "--dataset", train_set, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["dataset"] == train_set and record["every"] == 4
    assert [r["file"] for r in record["checkpoints"]] == ["model_final.pth"]  # step 2 is not a multiple of 4
    on_train = cfg.clone()
    on_train.DATASETS.TEST = (train_set,)
    expected = _independent_eval(on_train, str(tmp_path / "model_final.pth"))
    assert record["checkpoints"][0]["mIoU"] == pytest.approx(expected)
    assert record["checkpoints"][0]["mIoU"] != pytest.approx(_independent_eval(cfg, str(tmp_path / "model_final.pth")))

    assert tool.main([str(tmp_path), "--dataset", "camvid_no_such_split"]) == 2
    assert "--dataset: dataset 'camvid_no_such_split' is not registered" in capsys.readouterr().err
    assert tool.main([str(tmp_path), "--dataset", cfg.DATASETS.TRAIN_UNLABELED[0]]) == 2
    assert f"dataset '{cfg.DATASETS.TRAIN_UNLABELED[0]}' has" in (err := capsys.readouterr().err)
    assert "without semantic ground truth" in err
    assert tool.main([str(tmp_path), "--every", "0"]) == 2
    assert "--every must be >= 1" in capsys.readouterr().err


def test_a_folder_without_config_or_checkpoints_is_named(tmp_path, capsys):
    tool = _load_tool()
    assert tool.main([str(tmp_path)]) == 2
    assert str(tmp_path / "config.yaml") in capsys.readouterr().err
    cfg = camvid_semi_cfg(tmp_path, 6)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    assert tool.main([str(tmp_path), "--from-iter", "100"]) == 2
    assert ">= 100 steps" in capsys.readouterr().err
