"""tools/benchmark_interleaved.py: config specs with their own overrides, and the paired ratio it reports."""
import importlib.util
import os
from types import SimpleNamespace

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("benchmark_interleaved",
                                               os.path.join(REPO, "tools", "benchmark_interleaved.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_config_spec_carries_its_own_overrides():
    assert tool.split_spec("configs/dgcl_city.yaml") == ("configs/dgcl_city.yaml", [])
    got = tool.split_spec('configs/dgcl_city.yaml::SEMI.LOSSES=["supervised","pseudo_label"]::INPUT.CROP.SIZE=(9,9)')
    assert got == ("configs/dgcl_city.yaml", ["SEMI.LOSSES", '["supervised","pseudo_label"]', "INPUT.CROP.SIZE", "(9,9)"])
    with pytest.raises(tool.B.BenchmarkError, match="not KEY=VALUE"):
        tool.split_spec("a.yaml::SEMI.LOSSES")


class _Prof:
    def __init__(self, steps):
        self.steps = steps

    def summary(self, skip=0):
        s = self.steps[skip:]
        return {"step_times": s, "median_s": sorted(s)[len(s) // 2], "breakdown": {"backward": {"median_ms": 1.0}}}


def test_ratio_is_the_median_of_same_round_ratios():
    # the machine gets 10x slower from the middle of round 2 on: the separate medians say 15 / 1, the same-round
    # ratios say 1.5 (warm-up round first, not counted)
    ref = SimpleNamespace(name="mt", prof=_Prof([9.0, 1.0, 1.0, 10.0]))
    other = SimpleNamespace(name="dgcl", prof=_Prof([9.0, 1.5, 15.0, 15.0]))
    text = tool.report([ref, other], warmup=1, n_components=1)
    assert "mt: 1.000 s/iter, x1.00" in text and "dgcl: 15.000 s/iter, x1.50" in text


def test_each_config_is_timed_by_its_own_profiler(tmp_path):
    """Interleaved steps of a supervised and a Mean-Teacher config: each run's profiler holds its own step's scopes
    only (the teacher and the EMA in the second), every measured round once."""
    from tests.make_numerics_reference import method_cfg

    files = []
    for method in ("supervised", "mean_teacher"):
        path = tmp_path / f"{method}.yaml"
        path.write_text(method_cfg(method).dump())
        files.append(str(path))
    args = tool.parse_args(["--config-files", *files, "--synthetic", "--device", "cpu", "--iters", "2",
                            "--warmup", "1"])
    runs = [tool.build(args, f, tool.B.resolve_device("cpu")) for f in files]
    tool.run(runs, args.warmup + args.iters)
    supervised, mean_teacher = (set(r.prof.components()) for r in runs)
    assert {"data", "forward", "forward/student", "forward/loss:supervised", "backward", "optimizer"} <= supervised
    assert not {c for c in supervised if "teacher" in c or c == "ema"}
    assert {"forward/teacher", "forward/loss:pseudo_label", "ema"} <= mean_teacher
    assert all(len(r.prof.iterations) == 3 for r in runs)
    text = tool.report(runs, args.warmup, n_components=3)
    assert text.count("s/iter") == 2 and "x1.00 of the first" in text
