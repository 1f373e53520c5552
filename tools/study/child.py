"""One run of the study, in its own process (``run_study.py --child``): train, predict the figure's frames, and
write the run's study_run.json."""
import argparse
import json
import os
import resource
import time

from .configs import load_cfg, train_net_command
from .registry import RunRecord


def child_main(args) -> int:
    """Train one run like tools/train_net.py, then record predictions, peak memory and the run's summary."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import default_setup
    from PIL import Image

    from semiseg_d2.data.mapper import SemSegDatasetMapper
    from semiseg_d2.engine.checkpoint import atomic_write_text
    from semiseg_d2.engine.hooks import unwrap_model
    from semiseg_d2.engine.trainer import build_trainer
    from semiseg_d2.modeling import is_semi_supervised
    from semiseg_d2.utils.run_logging import setup_run_logging

    cfg = load_cfg(args.config_file, args.opts)
    cfg.freeze()
    setup_run_logging(cfg.OUTPUT_DIR, 0)  # as tools/train_net.py: plain-text log.txt (no ANSI colour codes)
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, resume=True, opts=args.opts))
    cuda = str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with RunRecord(cfg.OUTPUT_DIR) as record:  # which other study runs share the machine meanwhile
        trainer = build_trainer(cfg)
        trainer.resume_or_load(resume=True)
        trainer.train()
        concurrent = record.close()
    wall = time.perf_counter() - start
    peak_alloc = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
    # ru_maxrss is in KiB on Linux: the training process itself, and the largest of its finished children (the
    # data-loader workers, which have exited by now); their sum bounds the run's resident memory from above
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    semi = is_semi_supervised(cfg)
    networks = [n for n, on in (("student", cfg.TEST.EVAL_STUDENT), ("teacher", cfg.TEST.EVAL_TEACHER)) if on] if semi else [""]
    main_network = ("teacher" if "teacher" in networks else networks[0]) if semi else ""
    test_name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(test_name)

    model = unwrap_model(trainer.model)
    model.eval()
    if semi:
        model.eval_network = main_network
    mapper = SemSegDatasetMapper(cfg, False)
    by_id = {r["image_id"]: r for r in DatasetCatalog.get(test_name)}
    frames = [f for f in args.frames.split(",") if f]
    pred_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    os.makedirs(pred_dir, exist_ok=True)
    with torch.no_grad():
        for frame in frames:
            if frame not in by_id:
                raise KeyError(f"figure frame '{frame}' is not in '{test_name}'")
            probs = model([mapper(by_id[frame])])[0]["sem_seg"]
            Image.fromarray(probs.argmax(0).to("cpu", torch.uint8).numpy()).save(os.path.join(pred_dir, frame + ".png"))

    summary = {
        "method": args.method,
        "seed": int(cfg.SEED),
        "status": "done",
        "config_file": args.config_file,
        "overrides": list(args.opts),
        "train_command": train_net_command(args.config_file, args.opts),
        "study_command": args.study_command,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "max_iter": int(cfg.SOLVER.MAX_ITER),
        "burn_in_iters": int(cfg.SEMI.BURN_IN_ITERS) if semi else 0,
        "batch": [int(cfg.SOLVER.IMS_PER_BATCH), int(cfg.SOLVER.IMS_PER_BATCH_UNLABELED) if semi else 0],
        "networks": networks,
        "main_network": main_network,
        "test_dataset": test_name,
        "classes": list(meta.stuff_classes),
        "colors": [list(c) for c in meta.stuff_colors],
        "frames": frames,
        "wall_s": wall,
        "peak_mem_allocated_mib": peak_alloc,
        "peak_mem_reserved_mib": peak_reserved,
        "peak_rss_mib": peak_rss,
        "peak_rss_worker_mib": peak_rss_workers,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        # study runs on this machine at once during training, this one included, whichever driver started them
        "concurrent_runs": concurrent,
        "parallel": int(os.environ.get("RUN_STUDY_CONCURRENT", "1")),  # this driver's --parallel
        "torch_threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(json.dumps(summary, indent=1), os.path.join(cfg.OUTPUT_DIR, "study_run.json"))
    return 0
