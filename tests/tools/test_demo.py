"""tools/demo.py and engine/predictor.py: a tiny SemiSegmentor checkpoint whose student and teacher differ, run on
bundled CamVid frames (480x360 and a 77x53 copy), a folder with bad files, a 5-frame OpenCV video; errors for
missing weights and configs without semiseg_d2's keys."""
import importlib.util
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from semiseg_d2.data.datasets import unregister
from semiseg_d2.engine.checkpoint import SemiSegCheckpointer, atomic_torch_save
from semiseg_d2.engine.predictor import SemiSegPredictor, network_state_dict
from tests.tiny import BUNDLED_CAMVID, semi_cfg

_spec = importlib.util.spec_from_file_location(
    "demo", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "demo.py")
)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

FRAME = os.path.join(BUNDLED_CAMVID, "val", "0016E5_07959.jpg")  # 480x360


def _cfg():
    cfg = semi_cfg()
    cfg.DATASETS.TEST = ("camvid_mini_val",)
    cfg.INPUT.MIN_SIZE_TEST = 64  # DefaultPredictor resizes to this short side; outputs come back at full size
    cfg.INPUT.MAX_SIZE_TEST = 128
    return cfg


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """(config.yaml, trainer checkpoint with different student/teacher, exported teacher checkpoint, state dict)."""
    root = tmp_path_factory.mktemp("demo_run")
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.teacher.parameters():  # teacher != student, as after EMA training
            p.add_(torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 0.1))
    cfg.OUTPUT_DIR = str(root)
    SemiSegCheckpointer(model, save_dir=str(root), cfg=cfg).save("model_final")
    config = root / "config.yaml"
    config.write_text(cfg.dump())
    state = model.state_dict()
    exported = root / "teacher.pth"
    atomic_torch_save({"model": network_state_dict(state, "teacher")[0]}, str(exported))
    return str(config), str(root / "model_final.pth"), str(exported), state


def _args(config, weights, inputs, out, *extra, opts=()):
    return demo.parse_args(
        ["--config-file", config, "--input", *inputs, "--output", str(out), *extra,
         "--opts", "MODEL.WEIGHTS", weights, *opts]
    )


def _predictor(config, weights, network=None, **overrides):
    cfg = demo.setup_cfg(_args(config, weights, [FRAME], "unused", opts=[x for kv in overrides.items() for x in kv]))
    return SemiSegPredictor(cfg, network=network)


def _small_copy(tmp_path, name="small.png", size=(77, 53)):
    path = tmp_path / name
    Image.open(FRAME).convert("RGB").resize(size, Image.BILINEAR).save(path)
    return str(path)


def test_images_of_any_size_give_outputs_of_that_size_and_the_predicted_labels(run_files, tmp_path):
    config, weights, _, _ = run_files
    small = _small_copy(tmp_path)
    out = tmp_path / "out"
    summary = demo.run(_args(config, weights, [FRAME, small], out, "--confidence", "--entropy"))
    assert summary.skipped == [] and summary.network == "teacher" and len(summary.outputs) == 8
    predictor = _predictor(config, weights)
    for path, (w, h) in ((FRAME, (480, 360)), (small, (77, 53))):
        stem = out / os.path.splitext(os.path.basename(path))[0]
        for kind in ("overlay", "label", "confidence", "entropy"):
            assert Image.open(f"{stem}_{kind}.png").size == (w, h), kind
        label = Image.open(f"{stem}_label.png")
        assert label.mode == "L"
        probs = predictor(cv2.imread(path))["sem_seg"]
        assert probs.shape == (11, h, w)
        assert np.array_equal(np.asarray(label), probs.argmax(0).numpy())  # class ids 0..10, never 255
        conf = np.asarray(Image.open(f"{stem}_confidence.png"))
        assert np.array_equal(conf, demo.heat_map(probs.max(0).values.numpy()))
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(0) / np.log(11)
        assert np.abs(demo.heat_map(ent.numpy()).astype(int) - np.asarray(Image.open(f"{stem}_entropy.png"))).max() <= 1
    assert len(np.unique(np.asarray(Image.open(out / "0016E5_07959_label.png")))) > 1  # not a degenerate model


def test_overlay_uses_the_dataset_colours_and_draws_a_legend(run_files, tmp_path):
    config, weights, _, _ = run_files
    plain = demo.run(_args(config, weights, [FRAME], tmp_path / "a", "--alpha", "1", "--no-legend"))
    legend = demo.run(_args(config, weights, [FRAME], tmp_path / "b", "--alpha", "1"))
    assert plain.skipped == legend.skipped == []
    label = np.asarray(Image.open(tmp_path / "a" / "0016E5_07959_label.png"))
    a = np.asarray(Image.open(tmp_path / "a" / "0016E5_07959_overlay.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "0016E5_07959_overlay.png"))
    colours = np.asarray(demo.MetadataCatalog.get("camvid_mini_val").stuff_colors, dtype=np.uint8)
    # Opaque masks: apart from region borders and class names, each pixel has its class's CamVid colour.
    assert (a == colours[label]).all(-1).mean() > 0.8
    # The legend sits in the top-right corner; the rest of the picture is the same.
    assert (a[:60, -100:] != b[:60, -100:]).any()
    assert np.array_equal(a[200:, :300], b[200:, :300])


def test_folder_with_bad_files_processes_the_good_ones_and_reports_the_rest(run_files, tmp_path, caplog, capsys):
    config, weights, _, _ = run_files
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(FRAME, folder / "a.jpg")
    _small_copy(folder, "b.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes((folder / "b.png").read_bytes()[:120])  # truncated PNG
    (folder / "sub").mkdir()  # not descended into
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="semiseg_d2.demo"):
        rc = demo.main(["--config-file", config, "--input", str(folder), "--output", str(out),
                        "--opts", "MODEL.WEIGHTS", weights])
    assert rc == 1
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "notes.txt" in warned and "broken.png" in warned and "a.jpg" not in warned
    printed = capsys.readouterr().out
    assert "processed 2 input(s)" in printed and "skipped 2" in printed
    assert sorted(os.listdir(out)) == ["a_label.png", "a_overlay.png", "b_label.png", "b_overlay.png"]


def test_video_is_processed_frame_by_frame(run_files, tmp_path):
    config, weights, _, _ = run_files
    w, h, fps = 96, 70, 7.0
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    frame = cv2.resize(cv2.imread(FRAME), (w * 3, h * 3))
    for i in range(5):
        writer.write(np.ascontiguousarray(frame[i * 10 : i * 10 + h, i * 20 : i * 20 + w]))
    writer.release()
    summary = demo.run(_args(config, weights, [video], tmp_path / "out"))
    assert summary.processed == [os.path.normpath(video)]
    assert summary.outputs == [str(tmp_path / "out" / "clip_overlay.mp4")]
    capture = cv2.VideoCapture(summary.outputs[0])
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(fps)
    frames = []
    while True:
        ok, f = capture.read()
        if not ok:
            break
        frames.append(f)
    capture.release()
    assert len(frames) == 5 and all(f.shape == (h, w, 3) for f in frames)


def test_missing_weights_are_named_before_any_model_is_built(run_files, tmp_path, monkeypatch):
    config, _, _, _ = run_files
    monkeypatch.setattr(demo, "SemiSegPredictor", lambda *a, **k: pytest.fail("built a model"))
    missing = str(tmp_path / "nowhere" / "model_final.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/model_final.pth"):
        demo.run(_args(config, missing, [FRAME], tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no_such_frame.jpg"):
        demo.run(_args(config, missing, [str(tmp_path / "no_such_frame.jpg")], tmp_path / "out"))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        demo.run(_args(config, "", [FRAME], tmp_path / "out"))


def test_teacher_and_student_load_their_own_weights(run_files, tmp_path):
    config, weights, exported, state = run_files
    teacher = _predictor(config, weights, "teacher")
    student = _predictor(config, weights, "student")
    default = _predictor(config, weights)  # SEMI.WEIGHTS_FOR_EXPORT: teacher
    other_default = _predictor(config, weights, None, **{"SEMI.WEIGHTS_FOR_EXPORT": "student"})
    assert (teacher.network, student.network, default.network, other_default.network) == (
        "teacher", "student", "teacher", "student")
    for predictor, prefix in ((teacher, "teacher."), (student, "student."), (default, "teacher.")):
        for k, v in predictor.model.state_dict().items():
            assert torch.equal(v, state[prefix + k]), (prefix, k)
    assert any(not torch.equal(state["teacher." + k], state["student." + k]) for k in teacher.model.state_dict())
    image = cv2.imread(FRAME)
    assert not torch.allclose(teacher(image)["sem_seg"], student(image)["sem_seg"])
    # An exported Segmentor checkpoint, with a SemiSegmentor or a Segmentor config.
    for arch in ("SemiSegmentor", "Segmentor"):
        plain = _predictor(config, exported, None, **{"MODEL.META_ARCHITECTURE": arch})
        assert plain.network == "segmentor"
        assert torch.equal(plain(image)["sem_seg"], teacher(image)["sem_seg"])
    with pytest.raises(ValueError, match="plain Segmentor checkpoint"):
        _predictor(config, exported, "student")
    summary = demo.run(_args(config, weights, [FRAME], tmp_path / "s", "--network", "student"))
    assert summary.network == "student"


def test_configs_without_semiseg_keys_point_at_add_semiseg_config(run_files, tmp_path):
    config, weights, _, _ = run_files
    plain = get_cfg()
    plain.MODEL.DEVICE = "cpu"
    plain.MODEL.WEIGHTS = weights
    with pytest.raises(KeyError, match="add_semiseg_config"):
        SemiSegPredictor(plain)
    plain.MODEL.META_ARCHITECTURE = "Segmentor"  # a user's own DefaultPredictor on a plain detectron2 cfg
    with pytest.raises(KeyError, match="add_semiseg_config"):
        DefaultPredictor(plain)
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE: 'GeneralizedRCNN'"):
        _predictor(config, weights, None, **{"MODEL.META_ARCHITECTURE": "GeneralizedRCNN"})


def test_folder_dataset_gives_the_class_names_and_colours(run_files, tmp_path):
    config, weights, _, _ = run_files
    colours = [[10 * i + 5, 255 - 10 * i, (37 * i) % 256] for i in range(11)]
    folder_cfg = tmp_path / "folder.yaml"
    folder_cfg.write_text(
        f'_BASE_: "{config}"\nDATASETS:\n  TEST: ("demo_test_folder",)\n  FOLDERS:\n    demo_test_folder:\n'
        f"      IMAGE_DIR: {os.path.join(BUNDLED_CAMVID, 'val')}\n"
        f"      CLASSES: [{', '.join(f'c{i}' for i in range(11))}]\n      COLORS: {colours}\n"
    )
    try:
        summary = demo.run(_args(str(folder_cfg), weights, [FRAME], tmp_path / "out", "--alpha", "1", "--no-legend"))
        assert demo.MetadataCatalog.get("demo_test_folder").stuff_classes[3] == "c3"
    finally:
        unregister(["demo_test_folder"])
    assert summary.skipped == []
    label = np.asarray(Image.open(tmp_path / "out" / "0016E5_07959_label.png"))
    overlay = np.asarray(Image.open(tmp_path / "out" / "0016E5_07959_overlay.png"))
    assert (overlay == np.asarray(colours, dtype=np.uint8)[label]).all(-1).mean() > 0.8


def test_inputs_that_would_overwrite_each_other_are_refused(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        shutil.copy(FRAME, tmp_path / d / "f.jpg")
    with pytest.raises(ValueError, match="f.jpg"):
        demo.collect_inputs([str(tmp_path / "x"), str(tmp_path / "y" / "f.jpg")])
    assert demo.collect_inputs([str(tmp_path / "x" / "*.jpg"), str(tmp_path / "x")]) == [str(tmp_path / "x" / "f.jpg")]


def test_export_model_shares_the_network_selection(run_files, tmp_path):
    _, weights, exported, state = run_files
    spec = importlib.util.spec_from_file_location(
        "export_model", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "export_model.py"))
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)

    def exported_state(checkpoint, *network):
        out = str(tmp_path / "out.pth")
        export.main(["--checkpoint", checkpoint, "--output", out, *network])
        return torch.load(out, weights_only=True)

    def equals(got, prefix):
        return got["model"].keys() == {k[len(prefix):] for k in state if k.startswith(prefix)} and all(
            torch.equal(v, state[prefix + k]) for k, v in got["model"].items())

    assert equals(exported_state(weights), "teacher.") and exported_state(weights)["network"] == "teacher"
    assert equals(exported_state(weights, "--network", "student"), "student.")
    # Without --network: SEMI.WEIGHTS_FOR_EXPORT of the config the checkpoint was written with.
    ckpt = torch.load(weights, weights_only=False)
    assert "WEIGHTS_FOR_EXPORT: teacher" in ckpt["cfg"]
    ckpt["cfg"] = ckpt["cfg"].replace("WEIGHTS_FOR_EXPORT: teacher", "WEIGHTS_FOR_EXPORT: student")
    torch.save(ckpt, tmp_path / "student_default.pth")
    assert equals(exported_state(str(tmp_path / "student_default.pth")), "student.")
    assert exported_state(exported)["network"] == "segmentor"  # a Segmentor checkpoint is copied as it is
    with pytest.raises(ValueError, match="plain Segmentor checkpoint"):
        exported_state(exported, "--network", "teacher")


def test_evaluation_resizes_like_the_predictor_and_scores_the_same_predictions(run_files):
    """The trainer's evaluation (test loader + SemSegEvaluator) and SemiSegPredictor, same config (MIN_SIZE_TEST
    64 / MAX_SIZE_TEST 128): the loader feeds the model the predictor's resized frame and the scores are those
    of the predictor's predictions (upsampled back to the 480x360 labels)."""
    from detectron2.data import DatasetCatalog

    from semiseg_d2.data.build import build_sem_seg_test_loader
    from semiseg_d2.engine.trainer import SemiSegTrainer
    from semiseg_d2.evaluation import build_sem_seg_evaluator

    config, weights, _, _ = run_files
    cfg = demo.setup_cfg(_args(config, weights, [FRAME], "unused"))
    cfg.defrost()
    cfg.TEST.EVAL_STUDENT, cfg.TEST.EVAL_TEACHER = False, True
    first = next(iter(build_sem_seg_test_loader(cfg, "camvid_mini_val")))[0]
    assert tuple(first["image"].shape) == (3, 64, 85) and (first["height"], first["width"]) == (360, 480)
    model = build_model(cfg)
    SemiSegCheckpointer(model).load(weights)
    evaluated = SemiSegTrainer.test(cfg, model)["teacher"]["sem_seg"]

    predictor = _predictor(config, weights, network="teacher")
    evaluator = build_sem_seg_evaluator(cfg, "camvid_mini_val", distributed=False)
    evaluator.reset()
    records = DatasetCatalog.get("camvid_mini_val")
    for r in records:
        out = predictor(cv2.imread(r["file_name"]))
        assert tuple(out["sem_seg"].shape[-2:]) == (360, 480)
        evaluator.process([{"file_name": r["file_name"]}], [out])
    predicted = evaluator.evaluate()["sem_seg"]
    assert set(predicted) == set(evaluated)
    for key, value in predicted.items():
        assert value == pytest.approx(evaluated[key], nan_ok=True), key
    assert evaluated["mIoU"] > 0


def test_plain_default_predictor_on_a_trainer_checkpoint_runs_the_default_network(run_files):
    """detectron2's own DefaultPredictor builds the SemiSegmentor of the config: it predicts with
    SEMI.WEIGHTS_FOR_EXPORT's network, as tools/demo.py, SemiSegPredictor and export_model.py do."""
    config, weights, _, _ = run_files
    image = cv2.imread(FRAME)
    for network in ("teacher", "student"):
        ours = _predictor(config, weights, network)(image)["sem_seg"]
        cfg = demo.setup_cfg(_args(config, weights, [FRAME], "unused", opts=["SEMI.WEIGHTS_FOR_EXPORT", network]))
        plain = DefaultPredictor(cfg)
        assert plain.model.eval_network == network
        torch.testing.assert_close(plain(image)["sem_seg"], ours)


def test_run_demo_rows_take_the_sequences_in_turn_spread_over_each():
    spec = importlib.util.spec_from_file_location(
        "run_demo", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "run_demo.py"))
    run_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_demo)
    records = [{"file_name": f"/d/{seq}_{i:05d}.png"} for seq, n in (("0001TP", 5), ("0016E5", 9)) for i in range(n)]
    picked = [os.path.basename(r["file_name"]) for r in run_demo.spread_frames(records, 4)]
    assert picked == ["0001TP_00000.png", "0016E5_00000.png", "0001TP_00004.png", "0016E5_00008.png"]
    one = [os.path.basename(r["file_name"]) for r in run_demo.spread_frames(records[5:], 3)]  # one sequence
    assert one == ["0016E5_00000.png", "0016E5_00004.png", "0016E5_00008.png"]
