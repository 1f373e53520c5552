"""End to end on the bundled CamVid frames: training reduces the loss, exact resume after a kill,
config-mismatch refusal, export -> DefaultPredictor, worker-count-independent data stream."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from detectron2.engine import DefaultPredictor

from semiseg_d2.data.build import build_semi_train_loader
from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainer
from tests.tiny import apply_overrides, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def camvid_semi_cfg(out_dir, max_iter=12, **extra):
    cfg = tiny_cfg(crop=(64, 96))
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.DATASETS.TRAIN_LABELED = ("camvid_mini_train_5_labeled",)
    cfg.DATASETS.TRAIN_UNLABELED = ("camvid_mini_train_5_unlabeled",)
    cfg.DATASETS.TEST = ("camvid_mini_val",)
    cfg.INPUT.SCALE_RANGE = [0.2, 0.3]
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.CHECKPOINT_PERIOD = max_iter // 2
    cfg.SEMI.BURN_IN_ITERS = 2
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.0
    cfg.SEMI.MIX.PROB = 1.0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 3
    cfg.OUTPUT_DIR = str(out_dir)
    return apply_overrides(cfg, extra)


def _write_cfg(cfg, path):
    with open(path, "w") as f:
        f.write(cfg.dump())
    return str(path)


def _train_cmd(cfg_file, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", cfg_file, *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return env


def _final_state(out_dir):
    return torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]


def test_supervised_training_on_camvid_reduces_loss(tmp_path):
    cfg = tiny_cfg(crop=(96, 128))
    cfg.DATASETS.TRAIN = ("camvid_mini_train",)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.SCALE_RANGE = [0.3, 0.4]
    cfg.SOLVER.MAX_ITER = 60
    cfg.SOLVER.BASE_LR = 0.05
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 1
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = SegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert len(losses) >= 2
    # d2 writes the median of the last 20 iterations: first write ~ iterations 0-19, last ~ 40-59.
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("losses", [["supervised", "pseudo_label"], ["supervised", "pseudo_label", "memory_contrast"]])
def test_burn_in_trains_the_student_exactly_as_the_supervised_run(tmp_path, losses):
    """Same SEED, same labeled set: the semi-supervised run's burn-in steps are the supervised run's steps (same
    initial weights, same labeled batches, same dropout masks), so the student leaves burn-in equal to the supervised
    model -- also with a term whose parameters (memory contrast's projection heads and selectors) are initialised
    from the global random stream after the student: building the terms leaves that stream as it found it."""
    semi = camvid_semi_cfg(tmp_path / "semi", max_iter=3, **{
        "SEMI.BURN_IN_ITERS": 3, "DATASETS.TEST": (), "SEMI.LOSSES": losses,
        "SEMI.MEMORY_CONTRAST.START_ITER": 3, "SEMI.MEMORY_CONTRAST.PROJECTION_DIM": 16,
        "MODEL.SEM_SEG_HEAD.DECODER_DROPOUT": 0.5, "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.5})  # training draws randoms
    sup = semi.clone()
    sup.MODEL.META_ARCHITECTURE = "Segmentor"
    sup.DATASETS.TRAIN = semi.DATASETS.TRAIN_LABELED
    sup.OUTPUT_DIR = str(tmp_path / "sup")
    for cfg in (semi, sup):
        torch.manual_seed(cfg.SEED)  # what default_setup does before the trainer builds the model
        trainer = (SemiSegTrainer if cfg is semi else SegTrainer)(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    student = {k[len("student."):]: v for k, v in _final_state(tmp_path / "semi").items() if k.startswith("student.")}
    supervised = _final_state(tmp_path / "sup")
    assert set(student) == set(supervised)
    changed = [k for k in supervised if not torch.equal(student[k], supervised[k])]
    assert changed == []
    first = {k: v for k, v in supervised.items() if k.endswith("weight")}
    torch.manual_seed(sup.SEED)
    from detectron2.modeling import build_model

    initial = build_model(sup).state_dict()
    assert any(not torch.equal(initial[k], first[k]) for k in first)  # training moved the weights


def test_exact_resume_after_kill(tmp_path):
    n = 6
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_cfg = _write_cfg(camvid_semi_cfg(ref_dir, 2 * n), tmp_path / "ref.yaml")
    run_cfg = _write_cfg(camvid_semi_cfg(run_dir, 2 * n, **{"DATALOADER.NUM_WORKERS": 1}), tmp_path / "run.yaml")
    ref = subprocess.run(_train_cmd(ref_cfg), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Interrupted run: killed (SIGKILL) by a hook right after iteration n-1, whose checkpoint is then on disk.
    killer = os.path.join(ROOT, "tests", "train_until_killed.py")
    proc = subprocess.run([sys.executable, killer, "--kill-after", str(n - 1), "--config-file", run_cfg],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = run_dir / f"model_{n - 1:07d}.pth"
    assert (run_dir / "last_checkpoint").read_text().strip() == ckpt.name
    assert ckpt.exists() and not (run_dir / "model_final.pth").exists()

    # Resume with 0 workers (the stream does not depend on the worker count).
    resumed = subprocess.run(
        _train_cmd(run_cfg, "--resume", "DATALOADER.NUM_WORKERS", "0"), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {n}" in resumed.stderr + resumed.stdout

    a, b = _final_state(ref_dir), _final_state(run_dir)
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_resume_with_another_config_lists_the_keys(tmp_path):
    cfg = camvid_semi_cfg(tmp_path, 2)
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    other = camvid_semi_cfg(tmp_path, 2, **{"SOLVER.BASE_LR": 0.5, "SEMI.EMA.MOMENTUM": 0.9})
    with pytest.raises(ValueError) as e:
        SemiSegTrainer(other).resume_or_load(resume=True)
    assert "SOLVER.BASE_LR" in str(e.value) and "SEMI.EMA.MOMENTUM" in str(e.value)
    assert "OUTPUT_DIR" not in str(e.value)


def test_export_teacher_loads_in_default_predictor(tmp_path):
    cfg = camvid_semi_cfg(tmp_path, 4)
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    out = tmp_path / "teacher.pth"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--checkpoint",
         str(tmp_path / "model_final.pth"), "--output", str(out)],
        env=_env(), check=True, capture_output=True,
    )
    plain = tiny_cfg(crop=(64, 96))
    plain.MODEL.WEIGHTS = str(out)
    plain.INPUT.MIN_SIZE_TEST = 0  # no resize: compare with the teacher on the same pixels
    predictor = DefaultPredictor(plain)
    image = torch.randint(0, 255, (40, 56, 3), dtype=torch.uint8).numpy()
    got = predictor(image)["sem_seg"]
    teacher = trainer.model.teacher.eval()
    x = {"image": torch.as_tensor(image[:, :, ::-1].copy()).permute(2, 0, 1), "height": 40, "width": 56}
    with torch.no_grad():
        expected = teacher([x])[0]["sem_seg"]
    assert got.shape == (11, 40, 56)
    assert torch.allclose(got, expected, atol=1e-5)


def test_stream_is_independent_of_workers_and_resumes_at_any_batch(tmp_path):
    def batches(workers, start, count):
        loader = build_semi_train_loader(camvid_semi_cfg(tmp_path, 4, **{"DATALOADER.NUM_WORKERS": workers}))
        loader.set_start(start)
        it = iter(loader)
        return [next(it) for _ in range(count)]

    a = batches(0, 0, 4)
    b = batches(2, 2, 2)
    for (la, ua), (lb, ub) in zip(a[2:], b):
        for x, y in zip(la + ua, lb + ub):
            assert x["file_name"] == y["file_name"]
            assert torch.equal(x["image"], y["image"])
            if "image_strong" in x:
                assert torch.equal(x["image_strong"], y["image_strong"])
    # Consecutive batches differ (the stream moves on).
    assert not torch.equal(a[0][1][0]["image"], a[1][1][0]["image"])


@pytest.mark.parametrize(
    "losses,extra",
    [
        (["supervised", "pseudo_label", "dgcl"], {"SEMI.DGCL.MIN_FILL": 1, "SEMI.DGCL.PROJ_DIM": 16}),
        (["supervised", "pseudo_label", "memory_contrast", "entropy"], {"SEMI.MEMORY_CONTRAST.START_ITER": 0}),
        (["supervised", "pseudo_label", "ddfp"], {"SEMI.DDFP.START_ITER": 0}),
    ],
    ids=["dgcl", "memory_contrast", "ddfp"],
)
def test_each_method_trains_on_camvid_and_logs_its_term(tmp_path, losses, extra):
    cfg = camvid_semi_cfg(tmp_path, 4, **{"SEMI.LOSSES": losses, "SEMI.BURN_IN_ITERS": 1, **extra})
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        logged = [json.loads(line) for line in f]
    keys = set().union(*logged)
    for term in losses[1:]:
        assert any(k.startswith(f"loss_{term}") for k in keys), (term, keys)
    assert all(v == v for rec in logged for k, v in rec.items() if k.startswith("loss_"))  # no NaN
