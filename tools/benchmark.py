#!/usr/bin/env python
"""Benchmark real training steps of any config: s/iter, images/s, peak memory and a per-component breakdown.

    python tools/benchmark.py --config-file configs/dgcl_city.yaml --synthetic [--iters 20] [--warmup 5] \
        [--json out.json] [--device auto|cuda|cpu] [KEY VALUE ...]
    python tools/benchmark.py --config-file configs/camvid/demo_semi_cpu.yaml --data-only   # loader images/s

A step is the engine's own (``SemiSegTrainLoop.run_step`` + the LR-scheduler and EMA hooks), on one process with
the config's per-GPU batch (``SOLVER.REFERENCE_WORLD_SIZE`` scaling to 1 process, as ``train_net.py`` does).
Semi-supervised configs start after burn-in and every term's start iteration, so all terms run; memory banks are
filled with random entries first (steady-state cost: DGCL's loss only runs on full banks; ``--empty-banks`` to
keep them empty). The components are the named scopes of the step (``semiseg_d2.utils.profiling.scope``).
``--synthetic`` feeds random images and block labels of the config's crop and batch (no
dataset needed); otherwise the config's training loader is used. Weights are random (MODEL.WEIGHTS not loaded:
timing does not depend on them). Timing: CUDA events on GPU (read once at the end), perf_counter on CPU.
Exit status: 0 ok, 2 bad input, 3 out of memory (the report names the component and the peak so far).
JSON schema and how to read the breakdown: docs/benchmarks.md.
"""
import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from semiseg_d2.utils.profiling import StepProfiler, current_rss_peak_bytes, peak_memory_bytes  # noqa: E402

SCHEMA = "semiseg_d2.benchmark/1"
EXIT_OK, EXIT_BAD_INPUT, EXIT_OOM = 0, 2, 3
logger = logging.getLogger("semiseg_d2.benchmark")


class BenchmarkError(Exception):
    """Bad input: the message names the option, file or key at fault."""


# ---------------------------------------------------------------------------------------------- set-up
# What a CPU steps through in seconds (README "Benchmarks"): the CPU demo's shape (narrow ResNet-50, 160x224 crops,
# 4 + 4 images). A GPU recipe stays slow on a CPU even with a small crop: DGCL's kNN over full memory banks alone
# takes minutes per step there (hence --empty-banks for a look at the rest).
CPU_SMALL_SHAPE = ("--config-file configs/camvid/demo_semi_cpu.yaml --synthetic --iters 3 --warmup 1; a GPU recipe: "
                   "add --empty-banks --iters 3 --warmup 1 INPUT.CROP.SIZE \"(128, 128)\"")


class Progress:
    """One stderr line per step (warm-up k of W, iteration k of N, wall time per step, ETA), so a slow run shows it
    is running. Wall-clock time between steps, for the eye only; the report's timings are measured apart from it."""

    def __init__(self, warmup: int, iters: int, stream=None):
        self.warmup, self.iters = warmup, iters
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = None

    def begin(self, what: str) -> None:
        print(f"benchmark: {what}: {self.warmup} warm-up + {self.iters} measured steps", file=self.stream, flush=True)
        self.start = self.last = time.perf_counter()

    def step(self, index: int) -> str:
        """After step ``index`` (0-based, warm-up first); returns the line it printed."""
        now = time.perf_counter()
        took, self.last = now - self.last, now
        done, total = index + 1, self.warmup + self.iters
        eta = (now - self.start) / done * (total - done)
        if index < self.warmup:
            where = f"warm-up {done} of {self.warmup}"
        else:
            where = f"iteration {done - self.warmup} of {self.iters}"
        line = f"benchmark: {where} ({took:.2f} s; ETA {eta:.0f} s)"
        print(line, file=self.stream, flush=True)
        return line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--iters", type=int, default=20, help="measured iterations (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="iterations run first and not measured")
    p.add_argument("--synthetic", action="store_true", help="random tensors of the config's crop and batch sizes")
    p.add_argument("--data-only", action="store_true",
                   help="only the training loader (mapper + workers): images/s it delivers, no model")
    p.add_argument("--dgcl-official", default="", metavar="DIR",
                   help="time our DGCL loss (fwd+bwd) + bank update beside the official code in DIR "
                        "(../shared/bench) on the same synthetic tensors; no model")
    p.add_argument("--scale", type=float, default=1.0,
                   help="--dgcl-official: feature-map side factor (1.0 = 192x192, DGCL's Cityscapes step)")
    p.add_argument("--json", default="", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else the CPU fallback (slow; for development)")
    p.add_argument("--start-iter", type=int, default=-1,
                   help="iteration the steps are numbered from (default: after burn-in and every term's start)")
    p.add_argument("--empty-banks", action="store_true", help="do not pre-fill memory banks with random entries")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    args = p.parse_args(argv)
    if args.iters < 1:
        raise BenchmarkError(f"--iters must be >= 1, got {args.iters}")
    if args.warmup < 0:
        raise BenchmarkError(f"--warmup must be >= 0, got {args.warmup}")
    if len(args.opts) % 2:
        raise BenchmarkError(f"config overrides come as KEY VALUE pairs; got an odd list {args.opts}")
    return args


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False); "
                                 "use --device cpu or --device auto for the CPU fallback")
        return torch.device("cuda")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    print("benchmark: no CUDA GPU available (torch.cuda.is_available() is False); running the CPU fallback. "
          "CPU times are for development only and are not comparable with the GPU targets. A GPU recipe takes "
          f"minutes per step on a CPU; for a quick look: {CPU_SMALL_SHAPE}", file=sys.stderr)
    return torch.device("cpu")


def load_config(args, device: torch.device):
    from semiseg_d2.config import check_semiseg_config, get_semiseg_cfg
    from semiseg_d2.engine.trainer import SegTrainer

    if not os.path.isfile(args.config_file):
        raise BenchmarkError(f"--config-file: no such file '{args.config_file}'")
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(args.config_file)
    try:
        cfg.merge_from_list(list(args.opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise BenchmarkError(f"config overrides {args.opts}: {e}") from e
    cfg.MODEL.DEVICE = device.type
    check_semiseg_config(cfg)
    cfg = SegTrainer.auto_scale_workers(cfg, 1)  # the per-GPU batch of the recipe
    cfg.defrost()
    start = args.start_iter if args.start_iter >= 0 else first_full_iteration(cfg)
    cfg.SOLVER.MAX_ITER = max(int(cfg.SOLVER.MAX_ITER), start + args.warmup + args.iters + 1)
    cfg.freeze()
    return cfg, start


def first_full_iteration(cfg) -> int:
    """The first iteration at which every configured term runs: max of SEMI.BURN_IN_ITERS and the ``*START_ITER``
    keys of the configured terms' sections (e.g. SEMI.MEMORY_CONTRAST.START_ITER, SEMI.DDFP.FLOW_START_ITER)."""
    from semiseg_d2.modeling import is_semi_supervised

    if not is_semi_supervised(cfg):
        return 0
    starts = [int(cfg.SEMI.BURN_IN_ITERS)]
    for term in cfg.SEMI.LOSSES:
        section = cfg.SEMI.get(term.upper())
        if section is None:
            continue
        starts += [int(v) for k, v in section.items() if k.endswith("START_ITER") and isinstance(v, int)]
    return max(starts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} (CPU, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------- data
def _block_labels(g: torch.Generator, num_classes: int, h: int, w: int, block: int = 32) -> torch.Tensor:
    """Label map of ``block`` x ``block`` regions of random classes, ~5% ignore (255)."""
    coarse = torch.randint(0, num_classes, (h // block + 1, w // block + 1), generator=g)
    labels = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].clone()
    labels[torch.rand(h, w, generator=g) < 0.05] = 255
    return labels


class SyntheticBatches:
    """Endless batches shaped like the config's training loader output (docs/architecture.md "Mapper outputs"):
    labeled ``{"image" uint8[3,H,W], "sem_seg" long[H,W]}`` and, for SemiSegmentor, unlabeled ``{"image",
    "image_strong", "valid"}`` (+ ``"image_strong2"`` for terms with ``needs_second_strong``) at the crop size, per-process batch sizes. A small pool is built once and cycled,
    so the data cost is ~0 (use the real loader, or ``--data-only``, to measure the input pipeline)."""

    def __init__(self, cfg, pool: int = 2, seed: int = 0):
        h, w = (int(s) for s in cfg.INPUT.CROP.SIZE)
        c = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        g = torch.Generator().manual_seed(seed)
        bl = int(cfg.SOLVER.IMS_PER_BATCH)
        from semiseg_d2.modeling import is_semi_supervised

        semi = is_semi_supervised(cfg)
        bu = int(cfg.SOLVER.IMS_PER_BATCH_UNLABELED) if semi else 0
        names = list(cfg.DATASETS.TRAIN_LABELED) or list(cfg.DATASETS.TRAIN) or ["synthetic"]
        from semiseg_d2.losses.registry import terms_declare

        strong2 = semi and terms_declare(cfg, "needs_second_strong")  # UniMatch's second strong stream
        self.labeled_per_batch, self.unlabeled_per_batch = bl, bu
        self.batches = []
        for _ in range(pool):
            labeled = [
                {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                 "sem_seg": _block_labels(g, c, h, w), "height": h, "width": w,
                 "file_name": "synthetic", "dataset_name": names[0]}
                for _ in range(bl)
            ]
            if not semi:
                self.batches.append(labeled)
                continue
            unlabeled = []
            for _ in range(bu):
                img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
                strong = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
                unlabeled.append({"image": img, "image_strong": strong, "valid": torch.ones(h, w, dtype=torch.bool),
                                  "height": h, "width": w, "file_name": "synthetic"})
                if strong2:
                    unlabeled[-1]["image_strong2"] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
            self.batches.append((labeled, unlabeled))

    def __iter__(self):
        return itertools.cycle(self.batches)


def build_real_loader(cfg):
    from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainer
    from semiseg_d2.modeling import is_semi_supervised

    trainer_cls = SemiSegTrainer if is_semi_supervised(cfg) else SegTrainer
    try:
        return trainer_cls.build_train_loader(cfg)
    except (KeyError, FileNotFoundError, AssertionError) as e:
        names = list(cfg.DATASETS.TRAIN_LABELED) + list(cfg.DATASETS.TRAIN_UNLABELED) + list(cfg.DATASETS.TRAIN)
        raise BenchmarkError(
            f"building the training loader of {names} failed ({type(e).__name__}: {e}); prepare the dataset under "
            f"$DETECTRON2_DATASETS (docs/datasets.md) or pass --synthetic"
        ) from e


def batch_images(batch) -> int:
    if isinstance(batch, tuple):
        return sum(len(part) for part in batch)
    return len(batch)


# ---------------------------------------------------------------------------------------------- model
def fill_memory_banks(model, seed: int = 0) -> int:
    """Fill every ClassMemoryBank with random entries (all classes full). Returns the number of banks."""
    from semiseg_d2.layers.memory_bank import ClassMemoryBank

    g = torch.Generator().manual_seed(seed)
    n = 0
    for module in model.modules():
        if isinstance(module, ClassMemoryBank):
            with torch.no_grad():
                for name, width in module.fields.items():
                    buf = module.get(name)
                    rnd = torch.randn(buf.shape, generator=g) if width > 0 else torch.rand(buf.shape, generator=g)
                    buf.copy_(rnd.to(buf.dtype))
                module.count.fill_(module.size)
                module.ptr.zero_()
            n += 1
    return n


def build_training(cfg, data):
    """The engine's pieces for one process: model, optimizer, loop with the LR-scheduler (+ EMA) hooks."""
    from detectron2.engine import hooks
    from detectron2.modeling import build_model

    from semiseg_d2.engine.hooks import build_ema_hook
    from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainLoop, autocast_dtype
    from semiseg_d2.modeling import is_semi_supervised

    model = build_model(cfg)
    model.train()
    optimizer = SegTrainer.build_optimizer(cfg, model)
    scheduler = SegTrainer.build_lr_scheduler(cfg, optimizer)
    loop = SemiSegTrainLoop(model, data, optimizer, amp_dtype=autocast_dtype(cfg),
                            check_finite=cfg.SEMI.NONFINITE_CHECK)
    trainer_hooks = [hooks.LRScheduler(optimizer, scheduler)]
    if is_semi_supervised(cfg) and model.ema_pairs():  # nothing averaged (SEMI.TEACHER_MODE "student"): no "ema" row
        trainer_hooks.append(build_ema_hook(cfg))
    loop.register_hooks(trainer_hooks)
    return model, loop


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


# ---------------------------------------------------------------------------------------------- runs
def common_report(args, cfg, device, start_iter):
    from semiseg_d2.modeling import is_semi_supervised

    amp = cfg.SOLVER.AMP.PRECISION if cfg.SOLVER.AMP.ENABLED else None
    semi = is_semi_supervised(cfg)
    return {
        "schema": SCHEMA,
        "config": args.config_file,
        "overrides": list(args.opts),
        "device": {"type": device.type, "name": device_name(device)},
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "amp_dtype": amp,
        "channels_last": bool(cfg.MODEL.CHANNELS_LAST),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "losses": list(cfg.SEMI.LOSSES) if semi else [cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE],
        "crop": [int(s) for s in cfg.INPUT.CROP.SIZE],
        "ims_per_batch": {"labeled": int(cfg.SOLVER.IMS_PER_BATCH),
                          "unlabeled": int(cfg.SOLVER.IMS_PER_BATCH_UNLABELED) if semi else 0},
        "data": "synthetic" if args.synthetic else "loader",
        "iters": args.iters,
        "warmup": args.warmup,
        "start_iter": start_iter,
        "notes": [],
    }


def run_training(args, cfg, device, start_iter, report, profiler_hook=None):
    """Warm-up + measured steps. Fills ``report``; returns the exit status."""
    from detectron2.utils.events import EventStorage

    progress = Progress(args.warmup, args.iters)
    print(f"benchmark: building the data ({'synthetic' if args.synthetic else 'training loader'}) and the model of "
          f"{args.config_file} on {device.type}", file=sys.stderr, flush=True)
    data = SyntheticBatches(cfg) if args.synthetic else build_real_loader(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, loop = build_training(cfg, data)
    banks = 0 if args.empty_banks else fill_memory_banks(model)
    report["banks_filled"] = banks
    if device.type == "cpu":
        report["notes"].append("CPU fallback: times are for development only, not comparable with GPU figures")
    prof = StepProfiler(device)
    if profiler_hook is not None:
        profiler_hook(model, loop, prof)
    it = start_iter
    try:
        with EventStorage(start_iter) as storage, prof:  # prof: the step's scopes feed it
            loop.storage = storage
            loop.iter = loop.start_iter = start_iter
            loop.max_iter = cfg.SOLVER.MAX_ITER
            loop.before_train()
            progress.begin(f"training steps from iteration {start_iter}")
            for it in range(start_iter, start_iter + args.warmup + args.iters):
                loop.iter = it
                prof.begin_iteration()
                loop.before_step()
                loop.run_step()
                loop.after_step()
                prof.end_iteration()
                progress.step(it - start_iter)
    except BaseException as e:
        if not is_oom(e):
            raise
        prof.record_failure()
        peak = peak_memory_bytes(device)
        component = prof.failed_component()
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        report.update(
            status="oom",
            oom={"iteration": it, "component": component, "peak_memory_bytes_so_far": peak,
                 "peak_memory_component": prof.peak_component, "error": first_line},
            peak_memory_bytes=peak,
        )
        print(f"benchmark: OUT OF MEMORY at iteration {it} in component '{component}'; peak memory so far "
              f"{_gib(peak)} ({'GPU max allocated' if device.type == 'cuda' else 'process max RSS'}, last raised "
              f"in '{prof.peak_component}'). {first_line}", file=sys.stderr)
        return EXIT_OOM
    finally:
        report["components_attached"] = prof.components()
    s = prof.summary(skip=args.warmup)
    images = report["ims_per_batch"]["labeled"] + report["ims_per_batch"]["unlabeled"]
    report.update(
        status="ok",
        median_s_per_iter=s["median_s"],
        p90_s_per_iter=s["p90_s"],
        images_per_iter=images,
        images_per_s=images / s["median_s"] if s["median_s"] > 0 else 0.0,
        peak_memory_bytes=peak_memory_bytes(device),
        peak_memory_kind="cuda_max_memory_allocated" if device.type == "cuda" else "cpu_max_rss",
        peak_memory_component=prof.peak_component,
        breakdown=s["breakdown"],
        attributed_fraction=s["attributed_fraction"],
        host_data_wait_median_ms=s["host_data_wait_median_ms"],
        step_times_s=s["step_times"],
        per_iteration_ms=s["per_iteration"],
    )
    if device.type == "cuda":
        report["peak_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return EXIT_OK


def run_data_only(args, cfg, device, report):
    """Images/s that the config's mapper + workers deliver (no model)."""
    if args.synthetic:
        raise BenchmarkError("--data-only measures the real loader; it cannot be combined with --synthetic")
    loader = build_real_loader(cfg)
    it = iter(loader)
    produced = 0
    for _ in range(args.warmup):
        produced += batch_images(next(it))
    times, counts = [], []
    start = time.perf_counter()
    for _ in range(args.iters):
        t0 = time.perf_counter()
        n = batch_images(next(it))
        times.append(time.perf_counter() - t0)
        counts.append(n)
    seconds = time.perf_counter() - start
    produced += sum(counts)
    report.update(
        status="ok",
        mode="data",
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        batches=args.iters,
        images=sum(counts),
        images_including_warmup=produced,
        seconds=seconds,
        images_per_s=sum(counts) / seconds if seconds > 0 else 0.0,
        median_s_per_batch=statistics.median(times),
        peak_memory_bytes=current_rss_peak_bytes(),
        peak_memory_kind="cpu_max_rss",
    )
    return EXIT_OK


def run_dgcl_vs_official(args, cfg, device, report):
    """Our DGCL loss + bank update vs the official code, same inputs (``time_dgcl_official.make_inputs``: 4 images
    of 256-d features, 19 classes, bank full at 10,000 per class), same process, same device."""
    import importlib.util

    from semiseg_d2.losses.dgcl import DGCLTerm

    path = os.path.join(args.dgcl_official, "time_dgcl_official.py")
    if not os.path.isfile(path):
        raise BenchmarkError(f"--dgcl-official: no time_dgcl_official.py in '{args.dgcl_official}'")
    sys.path.insert(0, os.path.abspath(args.dgcl_official))
    spec = importlib.util.spec_from_file_location("time_dgcl_official", path)
    off = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(off)
    off.ref.DEVICE = device
    fts, rep, labels = off.make_inputs(device, args.scale)
    mem = off.full_memory(device)
    c = cfg.SEMI.DGCL
    term = DGCLTerm(num_classes=19, feature_dim=256, proj_dim=256, temperature=c.TEMPERATURE,
                    num_anchors=c.NUM_ANCHORS, num_positives=c.NUM_POSITIVES, num_negatives=c.NUM_NEGATIVES,
                    max_pixels_per_class=c.MAX_PIXELS_PER_CLASS, memory_size=10000, min_fill=10000,
                    update_per_class=c.UPDATE_PER_CLASS, density_ks=c.DENSITY_KS).to(device)
    with torch.no_grad():  # the official bank's content, in our layout
        term.bank.get("feat").copy_(torch.stack(mem.fts_memory))
        term.bank.get("proj").copy_(torch.stack(mem.proj_memory))
        term.bank.get("density").copy_(torch.stack(mem.feat_density))
        term.bank.count.fill_(10000)
    f = fts.permute(0, 2, 3, 1).reshape(-1, fts.shape[1])
    flat_labels = labels.reshape(-1)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ours_loss():
        z = rep.permute(0, 2, 3, 1).reshape(-1, rep.shape[1])
        loss, _, _ = term.loss_from_pixels(f, z, flat_labels)
        loss.backward()

    def ours_update():
        term.enqueue_pixels(f, rep.detach().permute(0, 2, 3, 1).reshape(-1, rep.shape[1]), flat_labels, 0)

    def official_update():
        mem.update(fts, rep.detach(), labels)

    def official_loss():
        off.ref.compute_dgcl_loss(rep=rep, fts=fts, memo=mem, label=labels, k_low_thresh=200,
                                  k_den_cal=[8, 16, 32]).backward()

    fns = {"official_update_ms": official_update, "official_loss_fwd_bwd_ms": official_loss,
           "ours_update_ms": ours_update, "ours_loss_fwd_bwd_ms": ours_loss}
    times = {k: [] for k in fns}
    import numpy as np

    np.random.seed(0)
    for i in range(args.warmup + args.iters):  # interleaved, so that a change of machine load hits both
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) * 1000.0 for k, v in times.items()}
    res["official_total_ms"] = res["official_update_ms"] + res["official_loss_fwd_bwd_ms"]
    res["ours_total_ms"] = res["ours_update_ms"] + res["ours_loss_fwd_bwd_ms"]
    res["speedup"] = res["official_total_ms"] / res["ours_total_ms"] if res["ours_total_ms"] > 0 else 0.0
    report.update(status="ok", mode="dgcl_vs_official", feature_map=[int(fts.shape[-2]), int(fts.shape[-1])],
                  scale=args.scale, **res)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- output
def format_table(report) -> str:
    lines = [
        f"benchmark of {report['config']} on {report['device']['name']} ({report['device']['type']}), "
        f"torch {report['torch']}",
    ]
    if report.get("mode") == "dgcl_vs_official":
        h, w = report["feature_map"]
        lines.append(
            f"  DGCL loss (fwd+bwd) + memory update, 4 images of 256-d features at {h}x{w}, 19 classes, full banks:\n"
            f"    official: update {report['official_update_ms']:.1f} ms + loss {report['official_loss_fwd_bwd_ms']:.1f}"
            f" ms = {report['official_total_ms']:.1f} ms\n"
            f"    ours:     update {report['ours_update_ms']:.1f} ms + loss {report['ours_loss_fwd_bwd_ms']:.1f}"
            f" ms = {report['ours_total_ms']:.1f} ms   ({report['speedup']:.1f}x faster, medians of {report['iters']})"
        )
        return "\n".join(lines)
    if report.get("mode") == "data":
        lines.append(
            f"  data loader only: {report['images']} images in {report['batches']} batches, "
            f"{report['seconds']:.2f} s -> {report['images_per_s']:.1f} images/s "
            f"({report['num_workers']} workers, median {report['median_s_per_batch'] * 1000:.1f} ms/batch)"
        )
        return "\n".join(lines)
    ims = report["ims_per_batch"]
    lines.append(
        f"  {report['meta_architecture']} {report['losses']}, {ims['labeled']} labeled + {ims['unlabeled']} unlabeled "
        f"images/iter, crop {report['crop'][0]}x{report['crop'][1]}, amp {report['amp_dtype'] or 'off (fp32)'}, "
        f"channels_last {report['channels_last']}, {report['data']} data, {report['iters']} iters after "
        f"{report['warmup']} warm-up (from iteration {report['start_iter']})"
    )
    if report["status"] == "oom":
        o = report["oom"]
        lines.append(f"  OUT OF MEMORY at iteration {o['iteration']} in '{o['component']}', peak so far "
                     f"{_gib(o['peak_memory_bytes_so_far'])}")
        return "\n".join(lines)
    lines.append(
        f"  s/iter median {report['median_s_per_iter']:.4f}  p90 {report['p90_s_per_iter']:.4f}  "
        f"images/s {report['images_per_s']:.2f}  peak memory {_gib(report['peak_memory_bytes'])} "
        f"({report['peak_memory_kind']}, raised last in '{report['peak_memory_component']}')"
    )
    lines.append(f"  {'component':<36}{'median ms':>12}{'mean ms':>12}{'share':>9}")
    for name, b in sorted(report["breakdown"].items(), key=lambda kv: -kv[1]["mean_ms"]):
        lines.append(f"  {name:<36}{b['median_ms']:>12.2f}{b['mean_ms']:>12.2f}{b['share'] * 100:>8.1f}%")
    lines.append(f"  attributed: {report['attributed_fraction'] * 100:.1f}% of the mean step time; host data wait "
                 f"median {report['host_data_wait_median_ms']:.2f} ms")
    return "\n".join(lines)


def main(argv=None, profiler_hook=None) -> int:
    try:
        args = parse_args(argv)
        # the loader runs on the CPU whatever the device; no fallback message for --data-only
        device = torch.device("cpu") if args.data_only else resolve_device(args.device)
        cfg, start_iter = load_config(args, device)
        report = common_report(args, cfg, device, start_iter)
        if args.dgcl_official:
            status = run_dgcl_vs_official(args, cfg, device, report)
        elif args.data_only:
            status = run_data_only(args, cfg, device, report)
        else:
            report["mode"] = "train"
            status = run_training(args, cfg, device, start_iter, report, profiler_hook)
    except BenchmarkError as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_table(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
