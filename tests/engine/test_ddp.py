"""Two gloo processes on CPU (detectron2.engine.launch): student and teacher stay identical across ranks."""
import torch
from detectron2.engine import launch

from tests.ddp_worker import train_and_dump
from tests.engine.test_train_e2e import camvid_semi_cfg


def test_two_process_semi_training_keeps_ranks_identical(tmp_path):
    cfg = camvid_semi_cfg(tmp_path / "out", max_iter=4)
    cfg.SEMI.BURN_IN_ITERS = 1
    cfg.SOLVER.IMS_PER_BATCH = 4  # 2 labeled + 2 unlabeled per rank
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 4
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    launch(train_and_dump, 2, dist_url="auto", args=(cfg, str(tmp_path)))
    a = torch.load(tmp_path / "rank0.pth")
    b = torch.load(tmp_path / "rank1.pth")
    checked = 0
    for k in a:
        if not a[k].is_floating_point():
            continue
        if k.startswith("student.") and ("running_" in k or "num_batches" in k):
            continue  # the students' plain BN keeps per-rank statistics (SyncBN on GPUs)
        assert torch.allclose(a[k], b[k], atol=1e-6), k
        checked += 1
    assert checked > 50
    # The ranks saw different images: their students' BN statistics differ, so identical weights come from DDP,
    # and identical teacher statistics (checked above) from the EMA hook's average over ranks.
    stats = [k for k in a if k.startswith("student.") and k.endswith("running_mean")]
    assert any(not torch.allclose(a[k], b[k]) for k in stats)
    teacher_stats = [k for k in a if k.startswith("teacher.") and k.endswith("running_mean")]
    assert len(teacher_stats) == len(stats) > 0


def test_two_process_unimatch_training_keeps_ranks_identical(tmp_path):
    """UniMatch (student as teacher, dual strong streams, fp stream): DDP keeps the students identical; the ranks'
    own data (and plain-BN statistics) differ."""
    cfg = camvid_semi_cfg(
        tmp_path / "out", max_iter=3, **{"SEMI.LOSSES": ["supervised", "unimatch"], "SEMI.TEACHER_MODE": "student",
                                         "TEST.EVAL_TEACHER": False, "SEMI.WEIGHTS_FOR_EXPORT": "student",
                                         "SEMI.UNIMATCH.THRESHOLD": 0.0},
    )  # fmt: skip
    cfg.SEMI.BURN_IN_ITERS = 1
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 4
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    launch(train_and_dump, 2, dist_url="auto", args=(cfg, str(tmp_path)))
    a = torch.load(tmp_path / "rank0.pth")
    b = torch.load(tmp_path / "rank1.pth")
    assert not any(k.startswith("teacher.") for k in a)
    weights = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    assert len(weights) > 50
    for k in weights:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    stats = [k for k in a if k.endswith("running_mean")]
    assert any(not torch.allclose(a[k], b[k]) for k in stats)
