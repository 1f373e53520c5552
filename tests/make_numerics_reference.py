"""Numerics guard: fixed-seed CPU training steps of every method, recorded as a JSON fixture.

    .venv/bin/python tests/make_numerics_reference.py            # rewrite tests/data/numerics_reference.json
    # from the code of one commit, whatever the working tree holds:
    git archive <commit> | tar -x -C /tmp/src && cp tests/make_numerics_reference.py /tmp/src/tests/
    .venv/bin/python /tmp/src/tests/make_numerics_reference.py --commit <commit> --output tests/data/numerics_reference.json

Each method runs ``STEPS`` real training steps of the engine (``SemiSegTrainLoop.run_step``: forward, finiteness
check, backward, SGD step, term updates; then the ``EMAHook``) on the tiny model of tests/tiny.py and
``fake_batch`` inputs, in float64 on one CPU thread. float64, not fp32: these steps take discrete decisions
(thresholds, top-k anchors, OHEM) that amplify rounding, and fp32 rounding differs between CPU models (AVX2 vs
AVX-512 kernels, MKL code paths) enough to move step-3 losses by 5 %; in float64 the same steps agree to ~1e-12
across ATEN_CPU_CAPABILITY=default/avx2 and MKL_CBWR=SSE4_2/AVX2, so the fixture does not depend on the machine. Recorded: every loss of every step, and checksums of the
weights, the EMA teacher and the term state (memory banks, flow) after the last step. ``tests/test_numerics.py``
re-runs the same steps and compares with a tolerance of 1e-5, so a speed change that alters the numbers fails.

The fixture was generated from the code as it was before any speed work (its commit is in the JSON). Regenerate
it only for a change that is MEANT to change the numbers, and say so in the commit message.
"""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.tiny import TINY_DGCL, apply_overrides, fake_batch, semi_cfg, tiny_cfg  # noqa: E402

FIXTURE = os.path.join(REPO, "tests", "data", "numerics_reference.json")
STEPS = 3
TOLERANCE = 1e-5  # absolute, scaled by max(1, |reference|)

_COMMON_SEMI = {
    "SEMI.EMA.MOMENTUM": 0.9,  # the teacher moves visibly in 3 steps
    "SEMI.MIX.PROB": 1.0,  # every strong view mixed
    "MODEL.SEM_SEG_HEAD.LOSS_TYPE": "ohem",  # the recipes' OHEM + aux head
    "MODEL.SEM_SEG_HEAD.OHEM_MIN_KEPT": 2000,
    "MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT": 0.4,
    "SOLVER.BASE_LR": 0.01,
}

# method -> (architecture, config overrides); the term sets of the configs in configs/.
METHODS = {
    "supervised": ("Segmentor", {
        "MODEL.SEM_SEG_HEAD.LOSS_TYPE": "ohem",
        "MODEL.SEM_SEG_HEAD.OHEM_MIN_KEPT": 2000,
        "MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT": 0.4,
        "SOLVER.BASE_LR": 0.01,
    }),
    "mean_teacher": ("SemiSegmentor", dict(_COMMON_SEMI, **{
        "SEMI.LOSSES": ["supervised", "pseudo_label"],
    })),
    "memory_contrast": ("SemiSegmentor", dict(_COMMON_SEMI, **{
        "SEMI.LOSSES": ["class_balance", "supervised", "pseudo_label", "entropy", "memory_contrast"],
        "MODEL.SEM_SEG_HEAD.LOSS_TYPE": "cross_entropy",  # class weights and OHEM do not combine (Alonso: CE)
        "SEMI.MIX.TYPE": "classmix",
        "SEMI.EMA.SCHEDULE": "cosine",
        "SEMI.PSEUDO_LABEL.FILTER": "none",
        "SEMI.MEMORY_CONTRAST.START_ITER": 1,  # the bank is empty before the first update
        "SEMI.MEMORY_CONTRAST.CONFIDENCE_THRESHOLD": 0.0,
        "SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE": 3,
        "SEMI.MEMORY_CONTRAST.PROJECTION_DIM": 16,
        "SEMI.MEMORY_CONTRAST.HIDDEN_DIM": 16,
        "SEMI.MEMORY_CONTRAST.SELECTOR_HIDDEN_DIM": 8,
        "SEMI.MEMORY_CONTRAST.BANK_SIZE": 8,
    })),
    # DGCL / DDFP train U2PL's decoder (configs/*/dgcl_base.yaml, ddfp_base.yaml)
    "dgcl": ("SemiSegmentor", dict(_COMMON_SEMI, **TINY_DGCL, **{"MODEL.SEM_SEG_HEAD.NAME": "U2PLDeepLabV3PlusHead"})),
    "ddfp": ("SemiSegmentor", dict(_COMMON_SEMI, **{
        "MODEL.SEM_SEG_HEAD.NAME": "U2PLDeepLabV3PlusHead",
        "SEMI.LOSSES": ["supervised", "pseudo_label", "ddfp"],
        "SEMI.DDFP.THRESHOLD": 0.0,
        "SEMI.DDFP.FLOW_HIDDEN": [32, 32],
        "SEMI.DDFP.FLOW_SAMPLES": 256,
    })),
    "unimatch": ("SemiSegmentor", dict(_COMMON_SEMI, **{
        "SEMI.LOSSES": ["supervised", "unimatch"],
        "SEMI.TEACHER_MODE": "student",  # the official V1 teacher: the student itself
        "TEST.EVAL_TEACHER": False,
        "SEMI.WEIGHTS_FOR_EXPORT": "student",
        "SEMI.SUPERVISED.WEIGHT": 0.5,
        "SEMI.UNIMATCH.THRESHOLD": 0.0,
    })),
}


def method_cfg(method: str):
    arch, overrides = METHODS[method]
    cfg = semi_cfg() if arch == "SemiSegmentor" else tiny_cfg(crop=(48, 64))
    cfg.SOLVER.MAX_ITER = 10
    return apply_overrides(cfg, dict(overrides))


@contextmanager
def _one_thread_float64():
    n, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        torch.set_default_dtype(dtype)


def _checksum(tensors) -> float:
    return float(sum(t.detach().double().abs().sum() for t in tensors if t.is_floating_point()))


def run_method(method: str, steps: int = STEPS) -> dict:
    """Run ``steps`` fixed-seed training steps of ``method``; returns {"losses": [{name: value}], "checks": {...}}."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from semiseg_d2.engine.hooks import build_ema_hook
    from semiseg_d2.engine.optimizer import build_optimizer
    from semiseg_d2.engine.trainer import SemiSegTrainLoop

    cfg = method_cfg(method)
    semi = cfg.MODEL.META_ARCHITECTURE == "SemiSegmentor"
    with _one_thread_float64():
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        optimizer = build_optimizer(cfg, model)
        batches = [fake_batch(seed=10 + i, strong2=getattr(model, "second_strong", False)) for i in range(steps)]
        if not semi:
            batches = [labeled for labeled, _ in batches]
        loop = SemiSegTrainLoop(model, batches, optimizer, amp_dtype=None, check_finite=True)
        if semi:  # the trainer's EMA hook (with SEMI.TEACHER_MODE "student" it averages only what the terms list)
            loop.register_hooks([build_ema_hook(cfg)])
        captured = []

        def capture(module, args, out):
            # a loss computed in fp32 (``.float()`` instead of utils.dtype.upcast) would bring CPU-dependent
            # rounding back into the guard
            low = {k: v.dtype for k, v in out.items() if v.dtype != torch.float64}
            assert not low, f"{method}: losses not computed in float64: {low}"
            captured.append({k: float(v.detach()) for k, v in out.items()})

        handle = model.register_forward_hook(capture)
        torch.manual_seed(1)
        with EventStorage(0) as storage:
            loop.storage = storage
            for it in range(steps):
                loop.iter = storage.iter = it
                loop.before_step()
                loop.run_step()
                loop.after_step()
        handle.remove()
    net = model.student if semi else model
    checks = {"weights": _checksum(net.parameters())}
    if semi:
        if model.teacher is not None:
            checks["teacher"] = _checksum(list(model.teacher.parameters()) + list(model.teacher.buffers()))
        for name, term in model.terms.items():
            state = [v for k, v in term.state_dict().items()]
            if state:
                checks[f"term:{name}"] = _checksum(state)
    return {"losses": captured, "checks": checks}


def _git_commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "semiseg_d2"], cwd=REPO) != 0
        return head + ("+dirty(semiseg_d2)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=FIXTURE)
    parser.add_argument("--commit", default="", help="commit of the code when run from an exported copy "
                        "(`git archive <commit>`), which has no .git")
    args = parser.parse_args()
    out = {
        "generated_from_commit": args.commit or _git_commit(),
        "torch": torch.__version__,
        "steps": STEPS,
        "tolerance": TOLERANCE,
        "methods": {m: run_method(m) for m in METHODS},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.output} ({out['generated_from_commit']})")
    for m, r in out["methods"].items():
        print(m, r["losses"][-1], r["checks"])


if __name__ == "__main__":
    main()
