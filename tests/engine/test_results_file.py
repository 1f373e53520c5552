"""What a run tells its user: results.json (every evaluated network, per class) after training and after --eval-only,
the network named in every copypaste block, plain-text log.txt, and the option-order message of the command line."""
import json
import logging
import os

import pytest
import torch

from semiseg_d2.engine.checkpoint import atomic_torch_save
from semiseg_d2.engine.cli import main, merge_overrides
from semiseg_d2.engine.predictor import network_state_dict
from semiseg_d2.engine.trainer import RESULTS_FILE, split_per_class
from detectron2.engine import default_argument_parser
from tests.engine.test_train_e2e import _write_cfg, camvid_semi_cfg
from tests.tiny import tiny_cfg

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
                  "bicyclist"]


def _args(*argv):
    return default_argument_parser().parse_args(list(argv))


def _log_text(out_dir):
    for name in ("detectron2", "semiseg_d2", "fvcore"):
        for handler in logging.getLogger(name).handlers:
            handler.flush()
    with open(os.path.join(out_dir, "log.txt")) as f:
        return f.read()


def _read(out_dir):
    with open(os.path.join(out_dir, RESULTS_FILE)) as f:
        return json.load(f)


def test_results_json_and_network_labels_after_training_and_eval_only(tmp_path):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    config = _write_cfg(camvid_semi_cfg(train_dir, 4), tmp_path / "run.yaml")  # 2 burn-in + 2 EMA steps
    trained = main(_args("--config-file", config))

    record = _read(train_dir)
    assert record["default_network"] == "teacher"  # SEMI.WEIGHTS_FOR_EXPORT
    assert record["datasets"] == ["camvid_mini_val"] and record["iteration"] == 4
    assert list(record["networks"]) == ["student", "teacher"]
    for network in ("student", "teacher"):
        sem_seg = record["networks"][network]["camvid_mini_val"]["sem_seg"]
        returned = trained[network]["sem_seg"]
        assert sem_seg["mIoU"] == pytest.approx(returned["mIoU"]) and sem_seg["pACC"] == pytest.approx(returned["pACC"])
        assert list(sem_seg["per_class"]) == CAMVID_CLASSES
        for name in CAMVID_CLASSES:
            per_class = sem_seg["per_class"][name]
            assert set(per_class) == {"IoU", "ACC", "BoundaryIoU", "min(IoU, B-Iou)"}
            iou = returned[f"IoU-{name}"]
            assert per_class["IoU"] == (None if iou != iou else pytest.approx(iou))  # NaN (class absent) -> null
    log = _log_text(train_dir)
    assert "\x1b[" not in log  # plain text, though the config dump is highlighted on a terminal
    for network in ("student", "teacher"):
        assert f"copypaste: Task: sem_seg ({network}, camvid_mini_val)" in log
        assert f"Evaluation results of the {network} on camvid_mini_val in csv format" in log
    assert "effective global batch" in log  # semiseg_d2's own lines reach log.txt
    assert "not built correctly" not in log

    # --eval-only on the final checkpoint: the same numbers, the weights named
    weights = str(train_dir / "model_final.pth")
    evaluated = main(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(eval_dir)))
    again = _read(eval_dir)
    assert again["weights"] == weights and "iteration" not in again
    for network in ("student", "teacher"):
        assert again["networks"][network] == record["networks"][network]
        assert evaluated[network]["sem_seg"]["mIoU"] == pytest.approx(trained[network]["sem_seg"]["mIoU"])
    assert record["networks"]["student"] != record["networks"]["teacher"]  # two networks, two results

    # the exported teacher: refused by the SemiSegmentor config (never a partly random model), evaluated as a Segmentor
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    exported = str(tmp_path / "teacher.pth")
    atomic_torch_save({"model": network_state_dict(ckpt["model"], "teacher")[0]}, exported)
    with pytest.raises(ValueError, match=r"missing keys.*load it with MODEL.META_ARCHITECTURE Segmentor"):
        main(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", exported, "OUTPUT_DIR", str(eval_dir)))
    plain_dir = tmp_path / "plain"
    main(_args("--config-file", config, "--eval-only", "MODEL.WEIGHTS", exported, "OUTPUT_DIR", str(plain_dir),
               "MODEL.META_ARCHITECTURE", "Segmentor"))
    plain = _read(plain_dir)
    assert plain["default_network"] == "segmentor" and list(plain["networks"]) == ["segmentor"]
    assert plain["networks"]["segmentor"] == record["networks"]["teacher"]
    assert "copypaste: Task: sem_seg (segmentor, camvid_mini_val)" in _log_text(plain_dir)


def test_per_class_split_takes_the_longest_class_name():
    metrics = {"mIoU": 50.0, "IoU-car": 1.0, "IoU-police-car": 2.0, "ACC-police-car": float("nan"), "BoundaryIoU-car": 3.0}
    out = split_per_class(metrics, ["car", "police-car"])
    assert out == {"mIoU": 50.0, "per_class": {"car": {"IoU": 1.0, "BoundaryIoU": 3.0},
                                               "police-car": {"IoU": 2.0, "ACC": None}}}


@pytest.mark.parametrize("argv, message", [
    (["SOLVER.MAX_ITER", "2", "--resume"], r"--resume came after the KEY VALUE config overrides.*put options first"),
    (["SOLVER.MAX_ITER", "2", "--eval-only", "--num-gpus", "2"], r"--eval-only --num-gpus came after"),
    (["SOLVER.MAX_ITER", "2", "SEED"], r"overrides have odd length \(3 words: SOLVER.MAX_ITER 2 SEED\).*--resume"),
])
def test_options_after_the_overrides_are_explained(argv, message):
    args = _args("--config-file", "unused.yaml", *argv)
    assert args.resume is False and args.eval_only is False  # argparse left them in the overrides
    with pytest.raises(ValueError, match=message):
        merge_overrides(tiny_cfg(), args.opts)
