"""tools/run_study.py end to end on the bundled CamVid frames: 2 methods x 2 seeds with a tiny model and a
6-iteration schedule -> the markdown table matches the runs' own metrics.json; --report alone (from the --pack
archive) reproduces it; missing / corrupt runs are named and left out of the means; finished runs are skipped;
the study configs share one protocol."""
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from semiseg_d2.data.datasets.register_camvid import CAMVID_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ["supervised_46", "mean_teacher"]
SEEDS = [0, 1]
MAX_ITER = 6
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.CHANNELS_LAST", "False", "SOLVER.AMP.ENABLED", "False",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "32",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", "[8]",
    "INPUT.CROP.SIZE", "(64, 96)", "INPUT.SCALE_RANGE", "[0.2, 0.3]",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.IMS_PER_BATCH_UNLABELED", "2", "SOLVER.BASE_LR", "0.05",
    "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "0", "SEMI.BURN_IN_ITERS", "2",
    "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "SEMI.PSEUDO_LABEL.THRESHOLD", "0.0",
    "SEMI.DIAGNOSTICS.ENABLED", "True", "SEMI.DIAGNOSTICS.GT_DATASETS", '("camvid_mini_train",)',
]  # fmt: skip


def _load_tool():
    spec = importlib.util.spec_from_file_location("run_study", os.path.join(ROOT, "tools", "run_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rs = _load_tool()  # the entry point; it puts tools/ (the study package) on sys.path
from study.cli import parse_args, parse_only  # noqa: E402
from study.configs import METHODS as STUDY_METHODS  # noqa: E402
from study.configs import (  # noqa: E402
    PROTOCOLS, data_overrides, load_cfg, method_config, protocol_overrides, protocol_settings, run_overrides,
    schedule_overrides)
from study.metrics import collect_runs  # noqa: E402
from study.report import CURVES_PNG, DIAGNOSTICS_PNG, DOC_BEGIN, DOC_END, EXIT_INCOMPLETE  # noqa: E402
from study.report import PREDICTIONS_PNG, read_block  # noqa: E402
from study.registry import RunRecord, max_concurrent, read_records  # noqa: E402
from study.runs import child_env, is_complete, keep_results  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    runs, doc, pack = base / "runs", base / "doc" / "camvid.md", base / "part.tar.gz"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "run_study.py"), "--methods", *METHODS,
           "--seeds", *map(str, SEEDS), "--data", "mini", "--output-root", str(runs), "--doc", str(doc),
           "--pack", str(pack), *TINY]  # fmt: skip
    # a run of another driver on this machine, all through the study (the runs must count it as beside them)
    registry = base / "registry"
    registry.mkdir()
    now = time.time()
    (registry / "1-0.json").write_text(json.dumps({"pid": 1, "output_dir": "elsewhere", "start": now - 10, "end": now + 86400}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RUN_STUDY_REGISTRY=str(registry))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"base": base, "runs": runs, "doc": doc, "pack": pack, "stdout": proc.stdout}


def _final_row(run_dir):
    """The final evaluation row of a run's metrics.json, read here independently of the tool."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["iteration"] == MAX_ITER and any(k.endswith("sem_seg/mIoU") for k in r)][-1]


def _prefix(method):
    return "sem_seg/" if method.startswith("supervised") else "teacher/sem_seg/"


def _table(doc, first_cell):
    """Rows (lists of cells) of the markdown table whose header starts with ``first_cell``."""
    block = read_block(str(doc)).splitlines()
    start = next(i for i, line in enumerate(block) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in block[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[0], rows[2:]


def _row(rows, method):
    return next(r for r in rows if f"`{method}`" in r[0])


def _expected_cell(values):
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f} ± —"


def test_table_is_computed_from_the_runs_metric_files(study):
    header, rows = _table(study["doc"], "method")
    assert len(rows) == len(METHODS)
    for method in METHODS:
        finals = [_final_row(study["runs"] / method / f"seed{s}") for s in SEEDS]
        miou = [f[_prefix(method) + "mIoU"] for f in finals]
        row = dict(zip(header, _row(rows, method)))
        assert row["runs"] == "2 of 2"
        assert row["val mIoU"] == _expected_cell(miou)
        assert row["per seed"] == " / ".join(f"{v:.2f}" for v in miou)
        rss = []
        for s in SEEDS:
            with open(study["runs"] / method / f"seed{s}" / "study_run.json") as f:
                rss.append(json.load(f)["peak_rss_mib"])
        assert all(r > 50 for r in rss)  # a torch process with a model: tens of MiB at least, in MiB not KiB
        assert row["peak mem (GiB)"] == f"{statistics.fmean(r / 1024 for r in rss):.2f} (RSS)"
        if method == "mean_teacher":
            assert row["student mIoU"] == _expected_cell([f["student/sem_seg/mIoU"] for f in finals])
            base = [f["sem_seg/mIoU"] for f in (_final_row(study["runs"] / "supervised_46" / f"seed{s}") for s in SEEDS)]
            assert row["Δ vs supervised-46"] == f"{statistics.fmean(miou) - statistics.fmean(base):+.2f}"
            diffs = [a - b for a, b in zip(miou, base)]
            assert row["paired Δ per seed (mean ± sd)"] == (
                " / ".join(f"{d:+.2f}" for d in diffs) + f" ({statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f})")
        with open(study["runs"] / method / "seed0" / "study_run.json") as f:
            summary = json.load(f)
        assert summary["peak_mem_allocated_mib"] is None and summary["max_iter"] == MAX_ITER
        assert summary["train_command"].startswith(f"python tools/train_net.py --config-file configs/camvid/study_{method}.yaml SEED 0")

    header, rows = _table(study["doc"], "method")  # per-class table: next header starting with "method"
    block = read_block(str(study["doc"])).splitlines()
    cls_header = next(line for line in block if line.startswith("| method | sky |"))
    assert cls_header == "| method | " + " | ".join(CAMVID_CLASSES) + " |"
    start = block.index(cls_header)
    for line in block[start + 2: start + 2 + len(METHODS)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        method = cells[0].strip("`")
        finals = [_final_row(study["runs"] / method / f"seed{s}") for s in SEEDS]
        for c, cell in zip(CAMVID_CLASSES, cells[1:]):
            vals = [f[_prefix(method) + "IoU-" + c] for f in finals if not math.isnan(f[_prefix(method) + "IoU-" + c])]
            assert cell == (f"{statistics.fmean(vals):.2f}" if vals else "—"), (method, c)


def test_figures_and_commands(study):
    doc_dir = study["doc"].parent
    for name in (PREDICTIONS_PNG, CURVES_PNG):
        with open(doc_dir / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        with Image.open(doc_dir / name) as im:
            im.verify()
        assert f"]({name})" in read_block(str(study["doc"]))
    with Image.open(doc_dir / PREDICTIONS_PNG) as im:
        assert im.width > im.height  # 4 columns (image, ground truth, 2 methods) of 4:3 frames, 4 rows
    for method in METHODS:
        for s in SEEDS:
            preds = os.listdir(study["runs"] / method / f"seed{s}" / "predictions")
            assert len(preds) == 4, (method, s, preds)
    block = read_block(str(study["doc"]))
    assert block.count("python tools/train_net.py --config-file configs/camvid/study_") == len(METHODS) * len(SEEDS)


def test_pack_has_metrics_not_checkpoints_and_report_alone_reproduces_the_table(study, tmp_path):
    with tarfile.open(study["pack"]) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked")
    assert not [n for n in names if n.endswith(".pth")]
    assert {f"{m}/seed{s}/metrics.json" for m in METHODS for s in SEEDS} <= set(names)
    doc2 = tmp_path / "doc2" / "camvid.md"
    status = rs.main(["--report", "--runs-root", str(tmp_path / "unpacked"), "--methods", *METHODS,
                      "--seeds", *map(str, SEEDS), "--doc", str(doc2)])  # fmt: skip
    assert status == 0
    tables = [[line for line in read_block(str(d)).splitlines() if line.startswith("|")] for d in (study["doc"], doc2)]
    # results table + per-class table (2 header lines + a row per method each), then the diagnostics tables
    assert tables[0] == tables[1] and len(tables[0]) > 2 + len(METHODS) + 2 + len(METHODS)
    assert os.path.isfile(doc2.parent / PREDICTIONS_PNG) and os.path.isfile(doc2.parent / CURVES_PNG)


def test_missing_and_corrupt_runs_are_named_not_averaged(study, tmp_path):
    root = tmp_path / "runs"
    with tarfile.open(study["pack"]) as tar:
        tar.extractall(root)
    shutil.rmtree(root / "mean_teacher" / "seed1")
    with open(root / "supervised_46" / "seed0" / "metrics.json", "a") as f:
        f.write('{"iteration": 6, "sem_seg/mIoU": 12.5\n')  # a truncated final line
    doc = tmp_path / "camvid.md"
    doc.write_text("# hand-written intro\n\n" + DOC_BEGIN + "\nold\n" + DOC_END + "\n\n## How to run\nkept\n")
    status = rs.main(["--report", "--runs-root", str(root), "--methods", *METHODS, "--seeds", "0", "1", "--doc", str(doc)])
    assert status == EXIT_INCOMPLETE
    text = doc.read_text()
    assert text.startswith("# hand-written intro") and text.rstrip().endswith("## How to run\nkept") and "\nold\n" not in text
    assert "`mean_teacher/seed1`: no run folder" in text
    assert "`supervised_46/seed0`: metrics.json line" in text
    header, rows = _table(doc, "method")
    for method, kept_seed in (("supervised_46", 1), ("mean_teacher", 0)):
        row = dict(zip(header, _row(rows, method)))
        value = _final_row(study["runs"] / method / f"seed{kept_seed}")[_prefix(method) + "mIoU"]
        assert row["runs"] == "1 of 2"
        assert row["val mIoU"] == _expected_cell([value])
    # mean_teacher's seed 0 against supervised_46's seed 1: the unpaired Δ is marked, the paired one is empty
    row = dict(zip(header, _row(rows, "mean_teacher")))
    assert row["Δ vs supervised-46"].endswith(" †") and row["paired Δ per seed (mean ± sd)"] == "—"
    assert "† the row's seeds are not supervised-46's" in text


def test_finished_runs_are_skipped_and_time_budget_stops_new_ones(study, tmp_path, capsys):
    status = rs.main(["--methods", *METHODS, "--seeds", "0", "1", "--data", "mini", "--output-root", str(study["runs"]),
                      "--no-report", *TINY])  # fmt: skip
    assert status == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4
    # A root with supervised_46/seed0 done (wall time known) and seed 1 missing: a 1-second budget starts nothing.
    root = tmp_path / "runs"
    shutil.copytree(study["runs"] / "frames", root / "frames")
    shutil.copytree(study["runs"] / "supervised_46" / "seed0", root / "supervised_46" / "seed0")
    with open(root / "supervised_46" / "seed0" / "study_run.json") as f:
        summary = json.load(f)
    summary["wall_s"] = 60.0
    with open(root / "supervised_46" / "seed0" / "study_run.json", "w") as f:
        json.dump(summary, f)
    status = rs.main(["--methods", "supervised_46", "--seeds", "0", "1", "--data", "mini", "--output-root", str(root),
                      "--time-budget", "1", "--doc", str(tmp_path / "camvid.md"), *TINY])  # fmt: skip
    assert status == EXIT_INCOMPLETE
    assert "supervised_46/seed1: not started" in capsys.readouterr().out
    assert not (root / "supervised_46" / "seed1").exists()
    assert "`supervised_46/seed1`: no run folder" in (tmp_path / "camvid.md").read_text()


def test_parallel_runs_divide_the_cores_and_each_run_records_its_threads(study):
    env, warning = child_env(2, {"PATH": "/bin"}, cpu_count=2)
    assert env["OMP_NUM_THREADS"] == "1" and env["RUN_STUDY_CONCURRENT"] == "2" and env["PATH"] == "/bin"
    assert warning is None
    assert child_env(3, {}, cpu_count=8)[0]["OMP_NUM_THREADS"] == "2"
    assert child_env(4, {}, cpu_count=2)[0]["OMP_NUM_THREADS"] == "1"  # never 0
    assert "OMP_NUM_THREADS" not in child_env(1, {}, cpu_count=2)[0]  # one run: torch's own default
    env, warning = child_env(2, {"OMP_NUM_THREADS": "2"}, cpu_count=2)  # the user's setting is kept, and named
    assert env["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS=2 x --parallel 2 runs = 4 threads on 2 cores" in warning and "OMP_NUM_THREADS=1" in warning
    assert child_env(2, {"OMP_NUM_THREADS": "1"}, cpu_count=2)[1] is None
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a whole number.*'two'"):
        child_env(2, {"OMP_NUM_THREADS": "two"}, cpu_count=2)
    for method in METHODS:  # the fixture's study ran with OMP_NUM_THREADS=1
        with open(study["runs"] / method / "seed0" / "study_run.json") as f:
            assert json.load(f)["torch_threads"] == 1


def test_concurrent_runs_count_every_driver_on_the_machine(study, tmp_path):
    # the fixture's study ran its runs one at a time (--parallel 1) beside another driver's run: each counts 2
    for method in METHODS:
        for seed in SEEDS:
            with open(study["runs"] / method / f"seed{seed}" / "study_run.json") as f:
                summary = json.load(f)
            assert (summary["concurrent_runs"], summary["parallel"]) == (2, 1), (method, seed)
    assert "shared the machine with up to 1 other study run(s)" in read_block(str(study["doc"]))

    # the sweep: the most records overlapping one instant of the window, the run itself at least
    rec = lambda a, b: {"start": a, "end": b}  # noqa: E731
    assert max_concurrent([rec(0, 10)], 0, 10) == 1
    assert max_concurrent([rec(0, 10), rec(2, 4), rec(5, 8)], 0, 10) == 2  # two others, one after the other
    assert max_concurrent([rec(0, 10), rec(2, 6), rec(5, 8)], 0, 10) == 3
    assert max_concurrent([rec(0, 10), rec(10, 12)], 0, 10) == 2  # starts as it ends: they touch
    assert max_concurrent([rec(0, 10), rec(11, 12), rec(-5, -1)], 0, 10) == 1  # outside the window
    assert max_concurrent([], 0, 10) == 1

    # records: a finished run's end; a dead run without end ran until its last heartbeat; a live one runs now
    registry = tmp_path / "reg"
    registry.mkdir()
    now = time.time()
    (registry / "a.json").write_text(json.dumps({"pid": 999999999, "start": now - 100, "end": now - 50}))
    (registry / "b.json").write_text(json.dumps({"pid": 999999999, "start": now - 100, "end": None}))
    os.utime(registry / "b.json", (now - 30, now - 30))
    (registry / "c.json").write_text(json.dumps({"pid": os.getpid(), "start": now - 100, "end": None}))
    (registry / "d.json").write_text(json.dumps({"pid": os.getpid(), "start": now - 5000, "end": None}))
    os.utime(registry / "d.json", (now - 4000, now - 4000))  # live pid, heartbeat long stopped: a reused pid
    (registry / "e.json").write_text("{not json")
    ends = {os.path.basename(r["path"]): r["end"] for r in read_records(str(registry), now)}
    assert ends == {"a.json": now - 50, "b.json": pytest.approx(now - 30), "c.json": now, "d.json": pytest.approx(now - 4000)}

    # two records of this process: both see each other; a third, after both, sees none
    first = RunRecord("out/a", str(tmp_path / "reg2")).__enter__()
    second = RunRecord("out/b", str(tmp_path / "reg2")).__enter__()
    assert first.path != second.path and json.loads(open(second.path).read())["end"] is None
    assert second.close() == 2 and first.close() == 2
    with RunRecord("out/c", str(tmp_path / "reg2")) as third:
        pass
    assert json.loads(open(third.path).read())["end"] is not None
    assert max_concurrent(read_records(str(tmp_path / "reg2")), third.record["start"], third.record["end"]) == 1


def test_schedule_scale_data_and_only_arguments():
    cfg = load_cfg(method_config("dgcl_ddfp"), [])
    pairs = schedule_overrides(cfg, 0.5)
    scaled = dict(zip(pairs[::2], pairs[1::2]))
    assert scaled["SOLVER.MAX_ITER"] == str(cfg.SOLVER.MAX_ITER // 2)
    assert scaled["SEMI.BURN_IN_ITERS"] == str(cfg.SEMI.BURN_IN_ITERS // 2)
    assert scaled["SEMI.DDFP.START_ITER"] == str(cfg.SEMI.DDFP.START_ITER // 2)
    assert scaled["TEST.EVAL_PERIOD"] == str(cfg.TEST.EVAL_PERIOD // 2)
    assert scaled["SOLVER.CHECKPOINT_PERIOD"] == str(cfg.SOLVER.CHECKPOINT_PERIOD // 2)
    assert scaled["SEMI.DDFP.FLOW_START_ITER"] == str(cfg.SEMI.DDFP.FLOW_START_ITER // 2)
    assert not [k for k in scaled if "MEMORY_CONTRAST" in k]  # terms the run does not use keep their keys
    supervised = schedule_overrides(load_cfg(method_config("supervised_46"), []), 2.0)
    assert set(supervised[::2]) == {"SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD",
                                    "TEST.EVAL_PERIOD"}
    assert schedule_overrides(cfg, 1.0) == []
    mini = load_cfg(method_config("mean_teacher"), data_overrides(cfg, "mini"))
    assert mini.DATASETS.TRAIN_LABELED == ("camvid_mini_train_5_labeled",) and mini.DATASETS.TEST == ("camvid_mini_val",)
    assert parse_only(["dgcl/1", "ddfp"], ["dgcl", "ddfp"], [0, 1], None) == {("dgcl", 1), ("ddfp", 0), ("ddfp", 1)}
    with pytest.raises(SystemExit):
        parse_args(["--only", "dgcl/7"])
    with pytest.raises(SystemExit):
        parse_args(["--methods", "dgcll"])


def test_study_configs_share_one_protocol():
    """Same backbone, crop, schedule, batch and evaluation for every method; the composition reuses the
    single-term settings; the crop is the whole (h, w) = (360, 480) CamVid frame."""
    cfgs = {m: load_cfg(method_config(m), []) for m in STUDY_METHODS}
    shared = ["MODEL.RESNETS", "MODEL.SEM_SEG_HEAD", "MODEL.WEIGHTS", "INPUT.CROP.SIZE", "INPUT.SCALE_RANGE",
              "SOLVER.MAX_ITER", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.WARMUP_ITERS", "SOLVER.AMP",
              "DATASETS.TEST", "TEST", "SEED"]  # fmt: skip

    def get(cfg, key):
        for part in key.split("."):
            cfg = cfg[part]
        return cfg

    def comparable(cfg, key):
        value = get(cfg, key)
        if key == "TEST" and cfg.SEMI.TEACHER_MODE == "student":  # UniMatch has no teacher to evaluate
            assert not value.EVAL_TEACHER
            value = value.clone()
            value.EVAL_TEACHER = True
        return value

    for key in shared:
        values = {m: comparable(c, key) for m, c in cfgs.items()}
        assert len({json.dumps(v, sort_keys=True, default=list) for v in values.values()}) == 1, (key, values)
    base = cfgs["supervised_46"]
    assert tuple(base.INPUT.CROP.SIZE) == (360, 480) and base.MODEL.RESNETS.DEPTH == 50 and base.MODEL.WEIGHTS == ""
    assert base.MODEL.DEVICE == "cuda" and base.SOLVER.AMP.ENABLED and base.MODEL.CHANNELS_LAST
    semi = [m for m, c in cfgs.items() if c.MODEL.META_ARCHITECTURE == "SemiSegmentor"]
    assert sorted(semi) == sorted(set(STUDY_METHODS) - {"supervised_46", "supervised_367"})
    for key in ("SEMI.BURN_IN_ITERS", "SEMI.EMA", "SOLVER.IMS_PER_BATCH_UNLABELED", "DATASETS.TRAIN_LABELED",
                "DATASETS.TRAIN_UNLABELED"):  # fmt: skip
        assert len({json.dumps(get(cfgs[m], key), default=list) for m in semi}) == 1, key
    both = cfgs["dgcl_ddfp"]
    assert list(both.SEMI.LOSSES) == ["supervised", "pseudo_label", "dgcl", "ddfp"]
    assert both.SEMI.DGCL == cfgs["dgcl"].SEMI.DGCL and both.SEMI.DDFP == cfgs["ddfp"].SEMI.DDFP
    assert cfgs["supervised_46"].DATASETS.TRAIN == ("camvid_train_46_labeled",)
    assert cfgs["supervised_367"].DATASETS.TRAIN == ("camvid_train",)


def test_a_run_in_several_roots_counts_once_only_if_identical(study, tmp_path):
    for part in ("a", "b"):
        with tarfile.open(study["pack"]) as tar:
            tar.extractall(tmp_path / part)
    runs, problems = collect_runs([str(tmp_path / "a"), str(tmp_path / "b")], METHODS, SEEDS)
    assert not problems and len(runs) == len(METHODS) * len(SEEDS)
    with open(tmp_path / "b" / "mean_teacher" / "seed0" / "metrics.json", "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="mean_teacher/seed0 is complete in several roots"):
        collect_runs([str(tmp_path / "a"), str(tmp_path / "b")], METHODS, SEEDS)


def test_pseudo_label_diagnostics_and_teacher_vs_student_are_reported(study):
    block = read_block(str(study["doc"]))
    with open(study["runs"] / "mean_teacher" / "seed0" / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    diag = [r for r in rows if "pl_diag/kept_fraction" in r]
    assert diag, "SEMI.DIAGNOSTICS logged nothing"
    final = _final_row(study["runs"] / "mean_teacher" / "seed0")
    line = next(x for x in block.splitlines() if x.startswith("- `mean_teacher/seed0`: "))
    assert f"{MAX_ITER}: {final['teacher/sem_seg/mIoU']:.2f} / {final['student/sem_seg/mIoU']:.2f}" in line
    header, table = _table(study["doc"], "run")
    row = dict(zip(header, _row(table, "mean_teacher/seed0")))
    last = lambda k: [r[k] for r in diag if not math.isnan(r[k])][-1]  # noqa: E731
    assert row["kept fraction"] == f"{100 * last('pl_diag/kept_fraction'):.1f}"
    assert row["kept accuracy"] == f"{100 * last('pl_diag/kept_accuracy'):.1f}"
    assert f"]({DIAGNOSTICS_PNG})" in block
    with Image.open(study["doc"].parent / DIAGNOSTICS_PNG) as im:
        im.verify()


def test_cpu_protocol_is_one_file_on_top_of_every_method(tmp_path):
    args = parse_args(["--protocol", "cpu", "--schedule-scale", "0.5"])
    assert (args.output_root, args.results_dir, args.doc, args.seeds) == (
        os.path.join("output", "camvid_cpu"), os.path.join("docs", "results", "camvid_cpu"),
        os.path.join("docs", "results", "camvid_cpu.md"), [0, 1, 2])
    for method in STUDY_METHODS:
        overrides = run_overrides(method, 1, "out", args)
        cfg = load_cfg(method_config(method), overrides)
        assert cfg.MODEL.DEVICE == "cpu" and not cfg.SOLVER.AMP.ENABLED and tuple(cfg.INPUT.CROP.SIZE) == (160, 224)
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (180, 240)
        assert cfg.MODEL.RESNETS.STEM_OUT_CHANNELS == 32 and list(cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS) == [16]
        assert cfg.SOLVER.MAX_ITER == 600  # the scale applies to the protocol's schedule
        assert (cfg.TEST.EVAL_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD) == (150, 150)  # checkpoints with evaluations
        if cfg.MODEL.META_ARCHITECTURE == "SemiSegmentor":
            assert cfg.SEMI.BURN_IN_ITERS == 150
            # the CPU protocol's EMA time constant (~20 iterations: the 0.99 teacher lagged its student)
            assert cfg.SEMI.EMA.MOMENTUM == 0.95
        assert cfg.SEMI.DIAGNOSTICS.ENABLED and cfg.SEMI.DIAGNOSTICS.GT_DATASETS == ("camvid_train",)
    gpu = load_cfg(method_config("dgcl"), run_overrides("dgcl", 1, "out", parse_args([])))
    assert gpu.MODEL.DEVICE == "cuda" and gpu.SOLVER.MAX_ITER == 1000 and gpu.SEMI.EMA.MOMENTUM == 0.99


def test_cpu_protocol_schedule_is_its_base_times_its_study_scale(tmp_path, monkeypatch):
    """protocol_cpu.yaml's STUDY.SCHEDULE_SCALE (2) multiplies the base schedule of the file and every iteration
    count the terms declare; --schedule-scale replaces it (1: the first study's 1200 iterations); STUDY never
    reaches a config; a wrong STUDY key or value names the file."""
    args = parse_args(["--protocol", "cpu"])
    assert args.schedule_scale == 2.0
    for method, extra in (("supervised_46", {}), ("ddfp", {"SEMI.DDFP.START_ITER": 800, "SEMI.DDFP.FLOW_START_ITER": 600}),
                          ("memory_contrast", {"SEMI.MEMORY_CONTRAST.START_ITER": 700,
                                               "SEMI.MEMORY_CONTRAST.BANK_START_ITER": 600})):  # fmt: skip
        overrides = run_overrides(method, 0, "out", args)
        assert "STUDY" not in " ".join(overrides[::2])
        cfg = load_cfg(method_config(method), overrides)
        once = load_cfg(method_config(method), run_overrides(method, 0, "out", parse_args(["--protocol", "cpu",
                                                                                           "--schedule-scale", "1"])))
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.TEST.EVAL_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD) == (
            2400, 100, 600, 600)
        assert (once.SOLVER.MAX_ITER, once.SOLVER.WARMUP_ITERS, once.TEST.EVAL_PERIOD) == (1200, 50, 300)
        if method != "supervised_46":
            assert (cfg.SEMI.BURN_IN_ITERS, once.SEMI.BURN_IN_ITERS) == (600, 300)
        for key, value in extra.items():
            node, base = cfg, once
            for part in key.split("."):
                node, base = node[part], base[part]
            assert (node, base) == (value, value // 2), key
    assert parse_args([]).schedule_scale == 1.0  # the gpu protocol has no file: the study configs as they are
    bad = tmp_path / "protocol.yaml"
    for study, message in (("{SCHEDULE_SCALE: 0}", "STUDY.SCHEDULE_SCALE must be a number > 0, got 0"),
                           ("{SCHEDULE_SCALE: two}", "STUDY.SCHEDULE_SCALE must be a number > 0, got 'two'"),
                           ("{SCALE: 2}", r"unknown STUDY keys \['SCALE'\]")):  # fmt: skip
        bad.write_text(f"STUDY: {study}\nSOLVER:\n  MAX_ITER: 10\n")
        with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: {message}"):
            protocol_settings(str(bad))
    bad.write_text("STUDY: {SCHEDULE_SCALE: 3}\nSOLVER:\n  MAX_ITER: 10\n")
    assert protocol_settings(str(bad))["SCHEDULE_SCALE"] == 3.0 and protocol_overrides(str(bad)) == ["SOLVER.MAX_ITER", "10"]
    monkeypatch.setitem(PROTOCOLS, "cpu", dict(PROTOCOLS["cpu"], file=str(bad)))
    assert parse_args(["--protocol", "cpu"]).schedule_scale == 3.0


def test_finished_runs_are_kept_without_checkpoints(study, tmp_path):
    run = study["runs"] / "mean_teacher" / "seed0"
    assert (run / "model_final.pth").is_file()
    copied = keep_results(str(study["runs"]), str(tmp_path), "mean_teacher", 0)
    kept = tmp_path / "mean_teacher" / "seed0"
    assert not (kept / "model_final.pth").exists()
    assert (kept / "metrics.json").read_bytes() == (run / "metrics.json").read_bytes()
    assert len(os.listdir(kept / "predictions")) == 4 and os.path.isfile(tmp_path / "frames" / "frames.json")
    assert is_complete(str(tmp_path), "mean_teacher", 0) and len(copied) >= 9


def test_the_report_names_the_cpu_kernels_and_warns_when_runs_used_different_ones(study, tmp_path):
    import torch

    here = torch.backends.cpu.get_cpu_capability()  # what detectron2's environment dump prints in log.txt
    assert f"CPU kernels (torch's `CPU capability usage`, each run's log.txt): {here} for every CPU run." in (
        read_block(str(study["doc"])))
    root = tmp_path / "runs"
    with tarfile.open(study["pack"]) as tar:
        tar.extractall(root)
    log = root / "mean_teacher" / "seed1" / "log.txt"
    other = "AVX2" if here != "AVX2" else "AVX512"
    log.write_text(log.read_text().replace(f"CPU capability usage: {here}", f"CPU capability usage: {other}"))
    doc = tmp_path / "camvid.md"
    assert rs.main(["--report", "--runs-root", str(root), "--methods", *METHODS, "--seeds", *map(str, SEEDS),
                    "--doc", str(doc)]) == 0  # fmt: skip
    block = read_block(str(doc))
    assert "**Machines differ**" in block and f"{other} kernels for mean_teacher/seed1." in block
    assert f"{here} kernels for supervised_46/seed0, supervised_46/seed1, mean_teacher/seed0;" in block


def _copy_as_control(root, controls, control, method, overrides, key, shift, seed=1):
    """A control run: the study's run of ``method``/``seed`` copied under ``controls/control``, with ``overrides``
    appended to its recorded overrides and its final ``key`` figure moved by ``shift`` (the control's own result)."""
    run = controls / control / method / f"seed{seed}"
    shutil.copytree(root / method / f"seed{seed}", run)
    summary = json.loads((run / "study_run.json").read_text())
    summary["overrides"] += overrides
    (run / "study_run.json").write_text(json.dumps(summary))
    with open(run / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows[-1 if key in rows[-1] else -2][key] += shift
    (run / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_control_runs_are_tabulated_with_what_they_changed_and_their_paired_differences(study, tmp_path):
    root, controls = tmp_path / "runs", tmp_path / "controls"
    with tarfile.open(study["pack"]) as tar:
        tar.extractall(root)
    _copy_as_control(root, controls, "plw0", "mean_teacher", ["SEMI.PSEUDO_LABEL.WEIGHT", "0.0"],
                     "teacher/sem_seg/mIoU", 1.5)
    (controls / "cut" / "mean_teacher" / "seed0").mkdir(parents=True)  # an unfinished control: named, not tabulated
    doc = tmp_path / "camvid.md"
    assert rs.main(["--report", "--runs-root", str(root), "--methods", *METHODS, "--seeds", *map(str, SEEDS),
                    "--doc", str(doc), "--controls-root", str(controls)]) == 0  # fmt: skip
    header, rows_ = _table(doc, "control")
    assert len(rows_) == 1
    row = dict(zip(header, rows_[0]))
    mt = _final_row(study["runs"] / "mean_teacher" / "seed1")["teacher/sem_seg/mIoU"]
    sup = _final_row(study["runs"] / "supervised_46" / "seed1")["sem_seg/mIoU"]
    assert row["run"] == "`mean_teacher/seed1`" and row["changed overrides"] == "`SEMI.PSEUDO_LABEL.WEIGHT 0.0`"
    assert row["val mIoU"] == f"{mt + 1.5:.2f}"
    assert row["Δ vs the method's reference run"] == "+1.50" and row["compared with"] == "study"
    assert row["Δ vs supervised-46"] == f"{mt + 1.5 - sup:+.2f}"
    assert "- `cut/mean_teacher/seed0`: unfinished: no study_run.json" in doc.read_text()


def test_a_control_with_its_own_supervised_46_is_paired_with_it(study, tmp_path):
    root, controls = tmp_path / "runs", tmp_path / "controls"
    with tarfile.open(study["pack"]) as tar:
        tar.extractall(root)
    longer = ["SOLVER.MAX_ITER", "99"]
    _copy_as_control(root, controls, "long2x", "supervised_46", longer, "sem_seg/mIoU", 0.7)
    _copy_as_control(root, controls, "long2x", "mean_teacher", longer, "teacher/sem_seg/mIoU", 1.5)
    doc = tmp_path / "camvid.md"
    assert rs.main(["--report", "--runs-root", str(root), "--methods", *METHODS, "--seeds", *map(str, SEEDS),
                    "--doc", str(doc), "--controls-root", str(controls)]) == 0  # fmt: skip
    header, rows_ = _table(doc, "control")
    by_run = {r["run"]: r for r in (dict(zip(header, row)) for row in rows_)}
    assert set(by_run) == {"`supervised_46/seed1`", "`mean_teacher/seed1`"}
    mt = _final_row(study["runs"] / "mean_teacher" / "seed1")["teacher/sem_seg/mIoU"]
    sup = _final_row(study["runs"] / "supervised_46" / "seed1")["sem_seg/mIoU"]
    assert by_run["`mean_teacher/seed1`"]["Δ vs supervised-46"] == f"{(mt + 1.5) - (sup + 0.7):+.2f} ‡"
    assert by_run["`supervised_46/seed1`"]["Δ vs supervised-46"] == f"{0.7:+.2f}"  # itself against the study's
    assert "‡ against the same control's supervised-46 run of that seed" in doc.read_text()


def test_a_control_with_a_reference_file_is_compared_with_that_controls_runs(study, tmp_path):
    """A control made on another protocol (the 1x schedule) names its reference control in REFERENCE: its changed
    overrides and both Δ columns are against that control's runs of the same seed, not the study's."""
    root, controls = tmp_path / "runs", tmp_path / "controls"
    with tarfile.open(study["pack"]) as tar:
        tar.extractall(root)
    shorter = ["SOLVER.MAX_ITER", "7"]
    _copy_as_control(root, controls, "short", "supervised_46", shorter, "sem_seg/mIoU", -2.0)
    _copy_as_control(root, controls, "short", "mean_teacher", shorter, "teacher/sem_seg/mIoU", -1.0)
    _copy_as_control(root, controls, "short_plw0", "mean_teacher", shorter + ["SEMI.PSEUDO_LABEL.WEIGHT", "0.0"],
                     "teacher/sem_seg/mIoU", -1.25)
    (controls / "short_plw0" / "REFERENCE").write_text("short\n")
    doc = tmp_path / "camvid.md"
    argv = ["--report", "--runs-root", str(root), "--methods", *METHODS, "--seeds", *map(str, SEEDS), "--doc",
            str(doc), "--controls-root", str(controls)]  # fmt: skip
    assert rs.main(argv) == 0
    header, rows_ = _table(doc, "control")
    rows = {(r["control"], r["run"]): r for r in (dict(zip(header, row)) for row in rows_)}
    mt = _final_row(study["runs"] / "mean_teacher" / "seed1")["teacher/sem_seg/mIoU"]
    sup = _final_row(study["runs"] / "supervised_46" / "seed1")["sem_seg/mIoU"]
    plw0 = rows[("short_plw0", "`mean_teacher/seed1`")]
    assert plw0["compared with"] == "short" and plw0["changed overrides"] == "`SEMI.PSEUDO_LABEL.WEIGHT 0.0`"
    assert plw0["Δ vs the method's reference run"] == f"{(mt - 1.25) - (mt - 1.0):+.2f}"
    assert plw0["Δ vs supervised-46"] == f"{(mt - 1.25) - (sup - 2.0):+.2f}"  # the reference's supervised-46, no ‡
    short = rows[("short", "`mean_teacher/seed1`")]
    assert short["compared with"] == "study" and short["changed overrides"] == "`SOLVER.MAX_ITER 7`"
    assert short["Δ vs supervised-46"] == f"{(mt - 1.0) - (sup - 2.0):+.2f} ‡"
    (controls / "short_plw0" / "REFERENCE").write_text("nowhere\n")
    with pytest.raises(ValueError, match="short_plw0/REFERENCE: names 'nowhere', which is not another control"):
        rs.main(argv)
