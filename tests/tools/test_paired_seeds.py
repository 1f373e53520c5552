"""tools/paired_seeds.py: one method's seeds pooled over several results folders, paired with the baseline's."""
import importlib.util
import json
import os
import statistics

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("paired_seeds", os.path.join(ROOT, "tools", "paired_seeds.py"))
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)

CLASSES = ["road", "car"]
COMMAND = ("python tools/train_net.py --config-file configs/camvid/study_{m}.yaml SEED {s} OUTPUT_DIR out/{m}/seed{s} "
           "SOLVER.MAX_ITER 20 SOLVER.BASE_LR 0.01{extra}")


def _run(root, method, seed, miou, iou, acc, extra="", max_iter=20):
    """A finished study run folder as tools/run_study.py leaves it (only what the report reads)."""
    d = root / method / f"seed{seed}"
    d.mkdir(parents=True)
    semi = method != "supervised_46"
    prefix = "teacher/sem_seg/" if semi else "sem_seg/"
    (d / "study_run.json").write_text(json.dumps({
        "method": method, "seed": seed, "status": "done", "max_iter": max_iter, "burn_in_iters": 0,
        "main_network": "teacher" if semi else "", "networks": ["student", "teacher"] if semi else [""],
        "classes": CLASSES, "train_command": COMMAND.format(m=method, s=seed, extra=extra)}))
    final = {"iteration": max_iter, prefix + "mIoU": miou}
    for c in CLASSES:
        final[prefix + "IoU-" + c] = iou[c]
        final[prefix + "ACC-" + c] = acc[c]
    if semi:  # the student's row, which must not be read as the reported network
        final["student/sem_seg/mIoU"] = miou - 50.0
    rows = [{"iteration": max_iter // 2, prefix + "mIoU": 1.0}, {"iteration": max_iter - 1, "total_loss": 0.5}, final]
    (d / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


# seed -> (miou, IoU road/car, ACC road/car) of each method
SUP = {0: (40.0, (80.0, 30.0), (99.0, 80.0)), 1: (38.0, (81.0, 33.0), (99.5, 82.0)), 2: (36.5, (79.0, 35.0), (98.0, 81.0))}
MT = {0: (41.0, (82.0, 29.0), (98.5, 85.0)), 1: (37.0, (83.5, 31.0), (99.0, 84.0)), 2: (39.5, (80.0, 36.0), (97.0, 86.0)),
      3: (35.0, (70.0, 20.0), (90.0, 70.0))}


def _write(root_a, root_b):
    """Seeds 0-1 in one folder, 2 (and Mean Teacher's unpaired 3) in another: as the study and its controls."""
    for method, table in (("supervised_46", SUP), ("mean_teacher", MT)):
        for seed, (miou, iou, acc) in table.items():
            _run(root_a if seed < 2 else root_b, method, seed, miou, dict(zip(CLASSES, iou)), dict(zip(CLASSES, acc)))


def test_pooled_seeds_are_paired_per_seed_over_mIoU_and_every_class(tmp_path, capsys):
    a, b = tmp_path / "study", tmp_path / "more"
    _write(a, b)
    out = tmp_path / "paired.json"
    assert ps.main(["--method", "mean_teacher", "--roots", str(a), str(b), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1, 2] and result["unpaired"] == [3]
    diffs = [MT[s][0] - SUP[s][0] for s in (0, 1, 2)]  # +1.0, -1.0, +3.0
    p = result["paired"]
    assert p["values"] == pytest.approx(diffs)
    assert p["mean"] == pytest.approx(statistics.fmean(diffs))
    assert p["sd"] == pytest.approx(statistics.stdev(diffs))
    assert p["se"] == pytest.approx(statistics.stdev(diffs) / 3 ** 0.5)
    assert p["positive"] == 2
    assert result["method"]["mean"] == pytest.approx(statistics.fmean(MT[s][0] for s in (0, 1, 2)))
    car_iou = [MT[s][1][1] - SUP[s][1][1] for s in (0, 1, 2)]  # -1, -2, +1
    road_acc = [MT[s][2][0] - SUP[s][2][0] for s in (0, 1, 2)]  # -0.5, -0.5, -1
    assert result["classes"]["car"]["iou"]["paired"]["values"] == pytest.approx(car_iou)
    assert result["classes"]["car"]["iou"]["paired"]["positive"] == 1
    assert result["classes"]["road"]["acc"]["paired"]["values"] == pytest.approx(road_acc)
    assert result["classes"]["road"]["acc"]["paired"]["positive"] == 0
    text = capsys.readouterr().out
    assert "unpaired, left out: 3" in text
    assert f"{statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}" in text
    assert f"| car | {statistics.fmean(SUP[s][1][1] for s in (0, 1, 2)):.2f} |" in text


def test_a_run_trained_otherwise_is_not_pooled(tmp_path):
    a, b = tmp_path / "study", tmp_path / "more"
    _write(a, b)
    _run(b, "mean_teacher", 7, 40.0, {"road": 1.0, "car": 1.0}, {"road": 1.0, "car": 1.0},
         extra=" SEMI.EMA.MOMENTUM 0.99")
    with pytest.raises(SystemExit, match=r"mean_teacher/seed7 was not trained as .*differs in SEMI\.EMA\.MOMENTUM"):
        ps.main(["--method", "mean_teacher", "--roots", str(a), str(b)])


def test_a_seed_in_two_folders_counts_once_only_if_identical(tmp_path):
    a, b = tmp_path / "study", tmp_path / "more"
    _write(a, b)
    miou, iou, acc = SUP[0]
    _run(b, "supervised_46", 0, miou, dict(zip(CLASSES, iou)), dict(zip(CLASSES, acc)))
    result = ps.compare(ps.collect([str(a), str(b)], "mean_teacher"), ps.collect([str(a), str(b)], "supervised_46"))
    assert result["seeds"] == [0, 1, 2]
    (b / "supervised_46" / "seed0").rename(b / "supervised_46" / "old")
    _run(b, "supervised_46", 0, miou + 1.0, dict(zip(CLASSES, iou)), dict(zip(CLASSES, acc)))
    with pytest.raises(ValueError, match="supervised_46/seed0 is in .* with different results"):
        ps.collect([str(a), str(b)], "supervised_46")


def test_an_unfinished_run_or_a_missing_accuracy_is_named(tmp_path):
    a, b = tmp_path / "study", tmp_path / "more"
    _write(a, b)
    (b / "mean_teacher" / "seed3" / "study_run.json").unlink()
    with pytest.raises(SystemExit, match=r"more/mean_teacher/seed3: unfinished: no study_run.json"):
        ps.main(["--method", "mean_teacher", "--roots", str(a), str(b)])
    c = tmp_path / "other"
    _run(c, "supervised_46", 5, 30.0, {"road": 1.0, "car": 1.0}, {"road": 1.0, "car": 1.0})
    metrics = c / "supervised_46" / "seed5" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"sem_seg/ACC-car"', '"sem_seg/ACC-bus"'))
    with pytest.raises(ValueError, match=r"seed5/metrics.json: final evaluation has no sem_seg/ACC-car"):
        ps.collect([str(c)], "supervised_46")
    with pytest.raises(SystemExit, match="results folder .*nowhere does not exist"):
        ps.main(["--method", "mean_teacher", "--roots", str(a), str(tmp_path / "nowhere")])
