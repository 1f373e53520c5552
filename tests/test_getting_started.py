"""docs/getting_started.md: the "add a new loss term" example works as shown, the page shows the example files
unchanged, and every file its commands name exists."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tests.tiny import fake_batch, semi_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "getting_started.md")
EXAMPLES = os.path.join(ROOT, "docs", "examples")

if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
import consistency_term  # noqa: E402  (registers "prob_consistency" once, under this module name)


def _doc():
    with open(DOC) as f:
        return f.read()


def test_doc_shows_the_example_files_verbatim():
    doc = _doc()
    blocks = re.findall(r"<!-- BEGIN (\S+) -->\n```\w*\n(.*?)```\n<!-- END \1 -->", doc, flags=re.S)
    assert {path for path, _ in blocks} == {"docs/examples/consistency_term.py", "docs/examples/prob_consistency_camvid.yaml",
                                            "docs/examples/train_net_my_dataset.py"}
    for path, body in blocks:
        with open(os.path.join(ROOT, path)) as f:
            assert body == f.read(), f"the block of {path} in docs/getting_started.md differs from the file"


def test_files_and_links_named_by_the_doc_exist():
    doc = _doc()
    paths = set(re.findall(r"(?<![\w/.])((?:tools|configs|docs/examples)/[\w./-]+\.(?:py|yaml|sh))", doc))
    paths |= set(re.findall(r"(?<![\w/.])(semiseg_d2/[\w./-]+\.py)", doc))
    assert {"tools/train_net.py", "tools/export_model.py", "tools/demo.py", "tools/prepare_cityscapes.py",
            "tools/prepare_gta5.py", "tools/prepare_camvid.py", "tools/make_splits.py",
            "docs/examples/train_net_with_term.py"} <= paths
    missing = sorted(p for p in paths if not os.path.isfile(os.path.join(ROOT, p)))
    assert not missing, missing
    links = re.findall(r"\]\(([^)#:]+)\)", doc)
    assert links
    missing = sorted(link for link in links if not os.path.exists(os.path.join(ROOT, "docs", link)))
    assert not missing, missing


def _model(**overrides):
    cfg = semi_cfg()
    consistency_term.add_prob_consistency_config(cfg)
    cfg.SEMI.LOSSES = ["supervised", "pseudo_label", "prob_consistency"]
    cfg.SEMI.BURN_IN_ITERS = 2
    for k, v in overrides.items():
        cfg.SEMI.PROB_CONSISTENCY[k] = v
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_prob_consistency_term_matches_an_independent_computation(kind):
    model = _model(WEIGHT=0.5, TYPE=kind)
    with EventStorage(3):  # past burn-in
        losses = model(fake_batch())
    assert set(losses) == {"loss_sem_seg", "loss_pseudo_label", "loss_prob_consistency"}
    loss = losses["loss_prob_consistency"]
    assert torch.isfinite(loss) and loss > 0

    step = model._last_step
    t = step.teacher_strong
    logits = F.interpolate(step.student_strong["logits"].detach(), size=t["probs"].shape[-2:], mode="bilinear",
                           align_corners=False)
    # pixels as rows [N, C], only the valid ones (padding of fake_batch's views is not)
    s_rows = logits.permute(0, 2, 3, 1)[t["valid"]]
    t_rows = t["probs"].permute(0, 2, 3, 1)[t["valid"]]
    assert 0 < s_rows.shape[0] < logits.numel() // logits.shape[1]
    if kind == "mse":
        expected = ((s_rows.softmax(1) - t_rows) ** 2).sum(1).mean()
    else:
        expected = F.kl_div(s_rows.log_softmax(1), t_rows, reduction="batchmean")
    torch.testing.assert_close(loss.detach(), 0.5 * expected, rtol=1e-5, atol=1e-7)

    params = [p for p in model.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_prob_consistency_term_is_off_during_burn_in_and_refuses_unknown_types():
    model = _model()
    with EventStorage(1):
        assert "loss_prob_consistency" not in model(fake_batch())
    with pytest.raises(ValueError, match="SEMI.PROB_CONSISTENCY.TYPE: unknown 'l2'"):
        _model(TYPE="l2")


def test_train_net_with_term_trains_the_example_config(tmp_path):
    """The documented command (shortened): the launcher, the example YAML, the term's loss in metrics.json."""
    cmd = [
        sys.executable, os.path.join(EXAMPLES, "train_net_with_term.py"),
        "--config-file", os.path.join(EXAMPLES, "prob_consistency_camvid.yaml"),
        "SOLVER.MAX_ITER", "3", "SEMI.BURN_IN_ITERS", "1", "SOLVER.WARMUP_ITERS", "0",
        "INPUT.CROP.SIZE", "(64, 96)", "INPUT.SCALE_RANGE", "[0.2, 0.3]",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.IMS_PER_BATCH_UNLABELED", "2", "DATALOADER.NUM_WORKERS", "0",
        "SEMI.PSEUDO_LABEL.THRESHOLD", "0.0", "OUTPUT_DIR", str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    values = [r["loss_prob_consistency"] for r in rows if "loss_prob_consistency" in r]
    assert values and all(0 < v < float("inf") for v in values), rows
    assert (tmp_path / "model_final.pth").exists()


def test_python_registered_dataset_example_registers_through_the_command_line(tmp_path, monkeypatch):
    """docs/examples/train_net_my_dataset.py: cli(register=...) registers the Python datasets from the merged config,
    before anything reads them, and a folder without images is named."""
    import shutil

    from detectron2.data import DatasetCatalog, MetadataCatalog

    import train_net_my_dataset as example
    from semiseg_d2.data.datasets import unregister
    from semiseg_d2.engine.cli import setup
    from detectron2.engine import default_argument_parser
    from tests.tiny import BUNDLED_CAMVID

    for split, stems in (("train", ["0001TP_006690", "0001TP_006960"]), ("val", [])):
        os.makedirs(tmp_path / split / "images")
        os.makedirs(tmp_path / split / "masks")
        for stem in stems:
            shutil.copy(os.path.join(BUNDLED_CAMVID, "train", stem + ".jpg"), tmp_path / split / "images" / f"{stem}.jpg")
            shutil.copy(os.path.join(BUNDLED_CAMVID, "trainannot", stem + ".png"), tmp_path / split / "masks" / f"{stem}.png")
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    config = tmp_path / "my.yaml"
    config.write_text('_BASE_: "%s"\nDATASETS:\n  TRAIN: ("my_train",)\n  TEST: ("my_val",)\n' % os.path.join(
        ROOT, "configs", "camvid", "demo_semi_cpu.yaml"))
    args = default_argument_parser().parse_args(["--config-file", str(config), "OUTPUT_DIR", str(tmp_path / "out")])
    try:
        cfg = setup(args, register=(example.register_my_datasets,))
        assert list(cfg.DATASETS.TRAIN) == ["my_train"]
        records = DatasetCatalog.get("my_train")
        assert [r["image_id"] for r in records] == ["0001TP_006690", "0001TP_006960"]
        assert all(os.path.isfile(r["sem_seg_file_name"]) for r in records)
        assert MetadataCatalog.get("my_train").stuff_classes == example.CLASSES
        with pytest.raises(FileNotFoundError, match=r"my_val: no images in .*val.*MY_DATA="):
            DatasetCatalog.get("my_val")
    finally:
        unregister(["my_train", "my_val"])
