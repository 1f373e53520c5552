"""tools/benchmark.py on CPU: report schema, honest breakdown (no double counting), data-only mode, OOM report.

Speed is never asserted here (timing figures come from the benchmark itself, docs/benchmarks.md).
"""
import importlib.util
import json
import os

import pytest
import torch

from tests.make_numerics_reference import method_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("benchmark_tool", os.path.join(REPO, "tools", "benchmark.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TRAIN_KEYS = {
    "schema", "config", "overrides", "device", "torch", "cuda", "amp_dtype", "channels_last", "meta_architecture",
    "losses", "crop", "ims_per_batch", "data", "iters", "warmup", "start_iter", "notes", "status", "mode",
    "median_s_per_iter", "p90_s_per_iter", "images_per_iter", "images_per_s", "peak_memory_bytes",
    "peak_memory_kind", "peak_memory_component", "breakdown", "attributed_fraction", "host_data_wait_median_ms",
    "step_times_s", "per_iteration_ms", "banks_filled", "components_attached",
}


def _config(tmp_path, method, **overrides):
    cfg = method_cfg(method)
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    path = tmp_path / f"{method}.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _run(tmp_path, argv, profiler_hook=None):
    out = tmp_path / "report.json"
    code = bench.main(["--json", str(out)] + list(argv), profiler_hook=profiler_hook)
    report = json.loads(out.read_text()) if out.exists() else None
    return code, report


def _check_breakdown(report):
    """The breakdown's arithmetic (no bound on times: how much of a step the scopes cover is asserted by counts in
    test_every_component_is_attributed_by_its_scope_count)."""
    bd = report["breakdown"]
    assert "unattributed" in bd
    attributed = [n for n in bd if n != "unattributed"]
    for row in report["per_iteration_ms"]:
        parts = sum(row[n] for n in attributed)
        assert all(row[n] >= 0 for n in attributed) and row["unattributed"] >= -1e-9 * row["step"]
        assert parts + row["unattributed"] == pytest.approx(row["step"], rel=1e-9)
    mean_step = sum(row["step"] for row in report["per_iteration_ms"]) / len(report["per_iteration_ms"])
    attributed_mean = sum(bd[n]["mean_ms"] for n in attributed)
    assert report["attributed_fraction"] == pytest.approx(attributed_mean / mean_step)
    for b in bd.values():
        assert b["share"] == pytest.approx(b["median_ms"] / (report["median_s_per_iter"] * 1000.0))


@pytest.mark.parametrize("method", ["supervised", "dgcl", "unimatch"])
def test_synthetic_report_schema_and_breakdown(tmp_path, method, capsys):
    code, report = _run(tmp_path, ["--config-file", _config(tmp_path, method), "--synthetic", "--iters", "3",
                                   "--warmup", "1", "--device", "cpu"])
    assert code == bench.EXIT_OK
    progress = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("benchmark: ")]
    steps = [ln.split(" (")[0] for ln in progress if "ETA" in ln]  # one line per step, as it runs
    assert steps == ["benchmark: warm-up 1 of 1"] + [f"benchmark: iteration {k} of 3" for k in (1, 2, 3)]
    assert progress[-1].endswith("ETA 0 s)") and "1 warm-up + 3 measured steps" in " ".join(progress)
    assert TRAIN_KEYS <= set(report), TRAIN_KEYS - set(report)
    assert report["schema"] == bench.SCHEMA and report["status"] == "ok" and report["mode"] == "train"
    assert report["device"]["type"] == "cpu" and "CPU" in report["device"]["name"]
    assert report["torch"] == torch.__version__ and report["amp_dtype"] is None and report["channels_last"] is False
    assert len(report["step_times_s"]) == len(report["per_iteration_ms"]) == 3
    assert report["median_s_per_iter"] > 0 and report["p90_s_per_iter"] >= report["median_s_per_iter"]
    semi = method != "supervised"
    images = 2 + (2 if semi else 0)
    assert report["ims_per_batch"] == {"labeled": 2, "unlabeled": 2 if semi else 0}
    assert report["images_per_s"] == pytest.approx(images / report["median_s_per_iter"])
    assert report["peak_memory_bytes"] > 0 and report["peak_memory_kind"] == "cpu_max_rss"
    names = set(report["breakdown"])
    expected = {"data", "backward", "optimizer", "zero_grad", "metrics", "forward/student", "forward/self"}
    if method == "unimatch":  # the student is its own teacher: no EMA hook; the fp pass and two strong streams
        expected |= {"forward/teacher/student", "forward/student_fp", "forward/loss:supervised", "forward/loss:unimatch"}
        assert "ema" not in names
    elif semi:
        expected |= {"forward/teacher", "forward/loss:supervised", "forward/loss:pseudo_label", "forward/loss:dgcl",
                     "term_updates/update:dgcl", "ema"}
        assert report["banks_filled"] == 1  # the DGCL bank, filled so that its loss runs
    else:
        expected |= {"forward/loss:supervised"}
    assert expected <= names, expected - names
    for b in report["breakdown"].values():
        assert set(b) == {"median_ms", "mean_ms", "share"}
    _check_breakdown(report)


class _FakeClock:
    """A host clock for StepProfiler that moves only by ``advance`` and, with ``tick``, by ``tick`` seconds at
    every read: region times become counts, independent of the machine's load."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_nested_components_are_not_double_counted(tmp_path):
    """60 ms (of a fake clock that moves only then) spent inside the teacher's network pass show up in
    forward/teacher only: not in forward/self, nor anywhere else."""
    clock = _FakeClock()

    def slow_teacher(model, loop, prof):  # test-only: the teacher pass "takes" 60 ms of the fake clock
        prof.clock = clock
        extract = model.teacher.extract

        def extract_taking_60_ms(*args, **kwargs):
            clock.advance(0.060)
            return extract(*args, **kwargs)

        model.teacher.extract = extract_taking_60_ms

    code, report = _run(tmp_path, ["--config-file", _config(tmp_path, "mean_teacher"), "--synthetic",
                                   "--iters", "3", "--warmup", "1", "--device", "cpu"], profiler_hook=slow_teacher)
    assert code == bench.EXIT_OK
    for row in report["per_iteration_ms"]:
        assert row["forward/teacher"] == pytest.approx(60.0) and row["step"] == pytest.approx(60.0)
        assert row["forward/self"] == 0.0  # counted twice, the parent would hold the 60 ms too
        assert all(v == 0.0 for k, v in row.items() if k not in ("forward/teacher", "step")), row
    assert report["breakdown"]["forward/teacher"]["share"] == pytest.approx(1.0)
    assert report["attributed_fraction"] == pytest.approx(1.0)


def _direct_children(path: str, paths):
    return [p for p in paths if p.rsplit("/", 1)[0] == path and "/" in p]


@pytest.mark.parametrize("method", ["supervised", "dgcl", "unimatch"])
def test_every_component_is_attributed_by_its_scope_count(tmp_path, method):
    """With a clock that ticks 1 ms per read, a region's own time is (its openings + its direct children's
    openings) ticks and the unattributed rest is (top-level openings + 1) ticks, exactly, if every scope is
    recorded once, under its parent, and no nested time is counted twice; every expected component is there."""
    seen = {}

    def ticking(model, loop, prof):
        prof.clock = _FakeClock(tick=0.001)
        seen["prof"] = prof

    code, report = _run(tmp_path, ["--config-file", _config(tmp_path, method), "--synthetic", "--iters", "2",
                                   "--warmup", "1", "--device", "cpu"], profiler_hook=ticking)
    assert code == bench.EXIT_OK
    expected = {"data", "forward/student", "zero_grad", "backward", "host_sync", "finite_check", "metrics",
                "optimizer", "hook:LRScheduler", "forward/loss:supervised"}
    if method == "dgcl":
        expected |= {"forward/teacher", "forward/loss:pseudo_label", "forward/loss:dgcl", "term_updates/update:dgcl",
                     "ema"}
    if method == "unimatch":
        expected |= {"forward/teacher/student", "forward/student_fp", "forward/loss:unimatch"}
    iterations = seen["prof"].iterations[1:]
    for it, row in zip(iterations, report["per_iteration_ms"]):
        paths = [path for path, _, _ in it["regions"]]
        for component in expected:
            assert row[component] > 0, component
        for path in set(paths):
            own = paths.count(path) + len(_direct_children(path, paths))
            name = f"{path}/self" if _direct_children(path, paths) else path
            assert row[name] == pytest.approx(own), name
        top = [p for p in paths if "/" not in p]
        assert row["unattributed"] == pytest.approx(len(top) + 1)
        assert row["step"] == pytest.approx(2 * len(paths) + 1)
    assert set(report["components_attached"]) >= {c.removesuffix("/self") for c in expected}
    _check_breakdown(report)


def test_scope_is_a_torch_profiler_range_and_feeds_only_an_active_step_profiler():
    from semiseg_d2.utils.profiling import StepProfiler, scope

    prof = StepProfiler(torch.device("cpu"), clock=_FakeClock(tick=1.0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        with scope("outside"):  # no StepProfiler active: a torch.profiler range only
            pass
        with prof:
            prof.begin_iteration()
            with scope("outer"), scope("inner"):
                pass
            prof.end_iteration()
    names = {e.name for e in trace.events()}
    assert {"outside", "outer", "inner"} <= names
    assert prof.components() == ["outer/inner", "outer"]
    assert prof.per_iteration() == [{"outer/inner": 1.0, "outer/self": 2.0, "__total__": 5.0}]
    with prof, pytest.raises(RuntimeError, match="already active"):
        with StepProfiler(torch.device("cpu")):
            pass


def test_a_failing_scope_names_its_region_and_closes_it():
    from semiseg_d2.utils.profiling import StepProfiler, scope

    prof = StepProfiler(torch.device("cpu"))
    with prof:
        prof.begin_iteration()
        with pytest.raises(torch.OutOfMemoryError):
            with scope("forward"), scope("loss:dgcl"):
                raise torch.OutOfMemoryError("injected")
        assert prof.stack == [] and prof.failed_component() == "forward/loss:dgcl"
        with scope("optimizer"):  # the profiler keeps recording after the failure
            pass
        prof.end_iteration()
    assert [path for path, _, _ in prof.iterations[0]["regions"]] == ["optimizer"]


def test_data_only_mode_on_bundled_camvid(tmp_path):
    code, report = _run(tmp_path, ["--config-file", os.path.join(REPO, "configs", "camvid", "demo_semi_cpu.yaml"),
                                   "--data-only", "--iters", "2", "--warmup", "1", "DATALOADER.NUM_WORKERS", "0",
                                   "INPUT.CROP.SIZE", "(64, 96)"])
    assert code == bench.EXIT_OK
    assert report["mode"] == "data" and report["status"] == "ok"
    assert report["images"] == 2 * (4 + 4)  # 2 measured batches of 4 labeled + 4 unlabeled frames
    assert report["images_including_warmup"] == 3 * (4 + 4)
    assert report["images_per_s"] > 0
    assert report["images_per_s"] == pytest.approx(report["images"] / report["seconds"])


def test_out_of_memory_is_reported_with_component_and_peak(tmp_path, monkeypatch, capsys):
    """An OutOfMemoryError raised (injected by this test) inside the dgcl loss is caught and reported."""
    from semiseg_d2.losses.dgcl import DGCLTerm

    calls = {"n": 0}
    original = DGCLTerm.forward

    def forward_that_runs_out_of_memory(self, step):  # test-only injection
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("injected by test_benchmark: simulated CUDA out of memory")
        return original(self, step)

    monkeypatch.setattr(DGCLTerm, "forward", forward_that_runs_out_of_memory)
    code, report = _run(tmp_path, ["--config-file", _config(tmp_path, "dgcl"), "--synthetic", "--iters", "3",
                                   "--warmup", "0", "--device", "cpu"])
    assert code == bench.EXIT_OOM
    assert report["status"] == "oom"
    oom = report["oom"]
    assert oom["component"] == "forward/loss:dgcl"
    assert oom["iteration"] == report["start_iter"] + 1
    assert oom["peak_memory_bytes_so_far"] > 0 and "injected by test_benchmark" in oom["error"]
    err = capsys.readouterr().err
    assert "OUT OF MEMORY" in err and "forward/loss:dgcl" in err and "peak memory so far" in err


def test_bad_input_is_named(tmp_path, capsys):
    assert bench.main(["--config-file", str(tmp_path / "missing.yaml"), "--synthetic"]) == bench.EXIT_BAD_INPUT
    assert "missing.yaml" in capsys.readouterr().err
    cfg = _config(tmp_path, "supervised")
    assert bench.main(["--config-file", cfg, "--synthetic", "SOLVER.BASE_LR"]) == bench.EXIT_BAD_INPUT
    assert "KEY VALUE" in capsys.readouterr().err
    assert bench.main(["--config-file", cfg, "--synthetic", "--iters", "0"]) == bench.EXIT_BAD_INPUT
    assert "--iters" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--config-file", cfg, "--synthetic", "--device", "cuda"]) == bench.EXIT_BAD_INPUT
        assert "no CUDA GPU" in capsys.readouterr().err


def test_missing_dataset_suggests_synthetic(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    code = bench.main(["--config-file", os.path.join(REPO, "configs", "dgcl_city.yaml"), "--device", "cpu",
                       "--iters", "1", "--warmup", "0"])
    assert code == bench.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cityscapes_fine_train_186_labeled" in err and "--synthetic" in err


def test_no_gpu_falls_back_to_cpu_with_a_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto picks it")
    assert bench.resolve_device("auto").type == "cpu"
    err = capsys.readouterr().err
    assert "CPU fallback" in err and bench.CPU_SMALL_SHAPE in err


OFFICIAL = os.path.join(REPO, "..", "shared", "bench")


@pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, "time_dgcl_official.py")),
                    reason="../shared/bench (official DGCL code) not present")
def test_dgcl_vs_official_mode_reports_both_on_the_same_inputs(tmp_path):
    code, report = _run(tmp_path, ["--config-file", os.path.join(REPO, "configs", "dgcl_city.yaml"),
                                   "--dgcl-official", OFFICIAL, "--scale", "0.05", "--iters", "1", "--warmup", "0",
                                   "--device", "cpu"])
    assert code == bench.EXIT_OK and report["mode"] == "dgcl_vs_official"
    assert report["feature_map"] == [9, 9]
    for side in ("official", "ours"):
        parts = [report[f"{side}_update_ms"], report[f"{side}_loss_fwd_bwd_ms"]]
        assert all(p > 0 for p in parts)
        assert report[f"{side}_total_ms"] == pytest.approx(sum(parts))
    assert report["speedup"] == pytest.approx(report["official_total_ms"] / report["ours_total_ms"])
    assert bench.main(["--config-file", os.path.join(REPO, "configs", "dgcl_city.yaml"),
                       "--dgcl-official", str(tmp_path)]) == bench.EXIT_BAD_INPUT
