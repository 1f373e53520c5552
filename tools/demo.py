#!/usr/bin/env python
"""Run a semiseg_d2 segmentation model on images, folders of images and videos.

    python tools/demo.py --config-file output/demo/config.yaml --input a.jpg b.png --output out/ \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth
    python tools/demo.py --config-file C --input frames/ --output out/ --network student --confidence --entropy \\
        --opts MODEL.WEIGHTS W
    python tools/demo.py --config-file C --input drive.mp4 --output out/ --opts MODEL.WEIGHTS W

For every image ``X.<ext>`` it writes to the output folder, all at the image's size:
  X_overlay.png      the prediction over the image in the dataset's colours (detectron2's Visualizer.draw_sem_seg:
                     class names on the regions) and a legend of the classes present (--no-legend: none)
  X_label.png        uint8 class ids 0..C-1 (argmax; every pixel gets a class, the ignore value never appears)
  X_confidence.png   with --confidence: max softmax probability, inferno colours, black = 0 .. yellow = 1
  X_entropy.png      with --entropy: entropy of the prediction / log(C), same colours (yellow = uniform)
A video ``X.mp4`` (.avi, .mov, .mkv, .webm, .m4v) gives ``X_overlay.mp4`` frame by frame, same size and fps (mp4v).

Inputs are files, folders (their files, not recursive) or glob patterns. A file of a folder that cannot be
read as an image or video is reported (a warning naming it and why) and skipped; the rest is processed and
the exit status is 1 if anything was skipped. A named input that does not exist is an error before any work.

Weights (``--opts MODEL.WEIGHTS W``): a SemiSegmentor trainer checkpoint (``--network teacher|student``;
default ``SEMI.WEIGHTS_FOR_EXPORT``, the teacher), or an exported / supervised Segmentor checkpoint. Class
names and colours come from ``MetadataCatalog.get(DATASETS.TEST[0])``.
"""
import argparse
import dataclasses
import glob
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import semiseg_d2  # noqa: E402,F401  (first: it filters detectron2's import-time warnings)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from semiseg_d2.config import get_semiseg_cfg  # noqa: E402
from semiseg_d2.data.datasets import register_folder_datasets_from_cfg  # noqa: E402
from semiseg_d2.data.io import UnreadableFileError, read_image  # noqa: E402
from semiseg_d2.engine.predictor import NETWORKS, SemiSegPredictor, check_weights_file  # noqa: E402
from semiseg_d2.layers.label_ops import softmax_entropy  # noqa: E402

logger = logging.getLogger("semiseg_d2.demo")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class UnreadableInput(Exception):
    """An input file that is not a readable image or video (reported and skipped)."""


@dataclasses.dataclass
class DemoSummary:
    processed: List[str] = dataclasses.field(default_factory=list)  # inputs fully processed
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (input, why)
    outputs: List[str] = dataclasses.field(default_factory=list)  # files written
    network: str = ""  # weights that ran: "teacher", "student" or "segmentor"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="config (e.g. output/<run>/config.yaml)")
    p.add_argument("--input", required=True, nargs="+", help="images, folders, videos or glob patterns")
    p.add_argument("--output", required=True, help="output folder (created)")
    p.add_argument(
        "--network", choices=NETWORKS, default=None,
        help="which network of a SemiSegmentor trainer checkpoint (default: SEMI.WEIGHTS_FOR_EXPORT)",
    )
    p.add_argument("--confidence", action="store_true", help="also write <stem>_confidence.png")
    p.add_argument("--entropy", action="store_true", help="also write <stem>_entropy.png")
    p.add_argument("--alpha", type=float, default=0.6, help="opacity of the colours in the overlay")
    p.add_argument("--no-legend", dest="legend", action="store_false", help="no legend in the overlays")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- set-up
def setup_cfg(args):
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file: no such file: {args.config_file}")
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_folder_datasets_from_cfg(cfg)  # DATASETS.FOLDERS: DATASETS.TEST[0] may be one (its metadata)
    cfg.freeze()
    return cfg


def dataset_metadata(cfg):
    """``MetadataCatalog.get(DATASETS.TEST[0])``, checked to name every class of the model and give colours."""
    if not len(cfg.DATASETS.TEST):
        raise ValueError(
            "DATASETS.TEST is empty: name a registered dataset; its metadata gives class names and colours"
        )
    name = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(name)
    classes = meta.get("stuff_classes", None)
    if classes is None:
        raise KeyError(
            f"DATASETS.TEST[0] {name!r} has no stuff_classes in MetadataCatalog: is it a registered "
            "semantic segmentation dataset?"
        )
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if len(classes) != num_classes:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes} but DATASETS.TEST[0] {name!r} has "
            f"{len(classes)} stuff_classes"
        )
    if num_classes > 255:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {num_classes} does not fit a uint8 label PNG (<= 255)")
    if meta.get("stuff_colors", None) is None or len(meta.stuff_colors) < num_classes:
        raise KeyError(
            f"DATASETS.TEST[0] {name!r}: stuff_colors must give a colour to each of the {num_classes} classes"
        )
    return meta


def collect_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named by ``patterns``: files, the non-hidden files of folders (sorted), glob matches.

    A pattern that names nothing is a ``FileNotFoundError``; the same file twice is listed once.
    """
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            entries = sorted(e for e in os.listdir(pattern) if not e.startswith("."))
            found = [os.path.join(pattern, e) for e in entries if os.path.isfile(os.path.join(pattern, e))]
            subfolders = [e for e in entries if os.path.isdir(os.path.join(pattern, e))]
            if subfolders:
                logger.info("--input %s: not descending into %d subfolder(s): %s", pattern, len(subfolders), subfolders)
            if not found:
                raise FileNotFoundError(f"--input: folder {pattern} holds no files")
        elif os.path.isfile(pattern):
            found = [pattern]
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"--input: no file matches {pattern}")
        else:
            raise FileNotFoundError(f"--input: no such file or folder: {pattern}")
        files.extend(found)
    unique = list(dict.fromkeys(os.path.normpath(f) for f in files))
    stems: Dict[str, str] = {}
    for f in unique:
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem in stems:
            raise ValueError(f"--input: {stems[stem]} and {f} would write the same outputs '{stem}_*' in --output")
        stems[stem] = f
    return unique


# ---------------------------------------------------------------------------------------------- pictures
def label_map(probs: torch.Tensor) -> np.ndarray:
    """``probs float[C, H, W]`` -> ``uint8[H, W]`` class ids."""
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


def confidence_map(probs: torch.Tensor) -> np.ndarray:
    """``probs float[C, H, W]`` -> max probability ``float[H, W]`` in [0, 1]."""
    return probs.max(0).values.float().cpu().numpy()


def entropy_map(probs: torch.Tensor) -> np.ndarray:
    """``probs float[C, H, W]`` -> entropy / log(C) ``float[H, W]`` in [0, 1] (1 = uniform)."""
    return (softmax_entropy(probs[None], dim=1)[0] / math.log(probs.shape[0])).clamp(0, 1).cpu().numpy()


def heat_map(values: np.ndarray) -> np.ndarray:
    """``float[H, W]`` in [0, 1] -> ``uint8[H, W, 3]`` RGB with matplotlib's inferno colour map."""
    import matplotlib

    lut = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return lut[np.clip(np.round(values * 255), 0, 255).astype(np.int64)]


def draw_overlay(
    image_rgb: np.ndarray, label: np.ndarray, meta, alpha: float, legend: Optional[Sequence[int]]
) -> np.ndarray:
    """``image_rgb uint8[H, W, 3]``, ``label uint8[H, W]`` -> ``uint8[H, W, 3]`` RGB: ``Visualizer.draw_sem_seg``
    plus a legend of the classes in ``legend`` (None: no legend)."""
    from detectron2.utils.visualizer import Visualizer
    from matplotlib.patches import Patch

    vis = Visualizer(image_rgb, meta)
    out = vis.draw_sem_seg(label, alpha=alpha)
    if legend:
        handles = [
            Patch(facecolor=np.asarray(meta.stuff_colors[c]) / 255.0, edgecolor="white", label=meta.stuff_classes[c])
            for c in legend
        ]
        box = out.ax.legend(handles=handles, loc="upper right", fontsize=vis._default_font_size * 0.8, framealpha=0.7)
        box.set_zorder(100)  # above the class names draw_sem_seg writes on the regions
    return out.get_image()


def classes_by_area(label: np.ndarray) -> List[int]:
    ids, counts = np.unique(label, return_counts=True)
    return [int(i) for i in ids[np.argsort(-counts, kind="stable")]]


def save_png(array: np.ndarray, path: str) -> str:
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------------------------- inputs
def read_bgr(path: str) -> np.ndarray:
    """An image file as ``uint8[H, W, 3]`` BGR (EXIF orientation applied); ``UnreadableInput`` if it is not one."""
    try:
        return read_image(path, format="BGR")
    except UnreadableFileError as e:  # the one reader of every mapper; its message names the file
        raise UnreadableInput(f"not a readable image ({e})") from e


def process_image(predictor, path: str, out_dir: str, meta, args) -> List[str]:
    image = read_bgr(path)
    probs = predictor(image)["sem_seg"]
    label = label_map(probs)
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
    legend = classes_by_area(label) if args.legend else None
    written = [
        save_png(draw_overlay(image[:, :, ::-1], label, meta, args.alpha, legend), stem + "_overlay.png"),
        save_png(label, stem + "_label.png"),
    ]
    if args.confidence:
        written.append(save_png(heat_map(confidence_map(probs)), stem + "_confidence.png"))
    if args.entropy:
        written.append(save_png(heat_map(entropy_map(probs)), stem + "_entropy.png"))
    return written


def process_video(predictor, path: str, out_dir: str, meta, args) -> List[str]:
    import cv2

    capture = cv2.VideoCapture(path)
    writer = None
    try:
        if not capture.isOpened():
            raise UnreadableInput("not a readable video (OpenCV cannot open it)")
        fps = capture.get(cv2.CAP_PROP_FPS)
        if not fps or not math.isfinite(fps) or fps <= 0:
            raise UnreadableInput(f"not a readable video (frame rate {fps!r})")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        legend = list(range(len(meta.stuff_classes))) if args.legend else None  # fixed: no flicker between frames
        out_path = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_overlay.mp4")
        frames = 0
        with tqdm(total=total, desc=os.path.basename(path), unit="frame", leave=False) as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                if writer is None:
                    size = (frame.shape[1], frame.shape[0])
                    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                    if not writer.isOpened():
                        raise RuntimeError(f"OpenCV cannot write {out_path} (mp4v, {size[0]}x{size[1]}, {fps} fps)")
                label = label_map(predictor(frame)["sem_seg"])
                overlay = draw_overlay(frame[:, :, ::-1], label, meta, args.alpha, legend)
                writer.write(np.ascontiguousarray(overlay[:, :, ::-1]))
                frames += 1
                bar.update(1)
        if frames == 0:
            raise UnreadableInput("not a readable video (no frame could be decoded)")
        logger.info("%s: %d frames -> %s", path, frames, out_path)
        return [out_path]
    finally:
        capture.release()
        if writer is not None:
            writer.release()


def run(args) -> DemoSummary:
    """Everything but logging set-up and the exit status (tests call this)."""
    cfg = setup_cfg(args)
    meta = dataset_metadata(cfg)
    inputs = collect_inputs(args.input)
    check_weights_file(cfg.MODEL.WEIGHTS)
    predictor = SemiSegPredictor(cfg, network=args.network)
    os.makedirs(args.output, exist_ok=True)
    summary = DemoSummary(network=predictor.network)
    for path in tqdm(inputs, desc="demo", unit="input"):
        is_video = path.lower().endswith(VIDEO_EXTENSIONS)
        try:
            written = (process_video if is_video else process_image)(predictor, path, args.output, meta, args)
        except UnreadableInput as e:
            logger.warning("skipping %s: %s", path, e)
            summary.skipped.append((path, str(e)))
            continue
        summary.processed.append(path)
        summary.outputs.extend(written)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(
        f"processed {len(summary.processed)} input(s) with the {summary.network} weights, wrote "
        f"{len(summary.outputs)} file(s) to {args.output}; skipped {len(summary.skipped)}"
        + "".join(f"\n  skipped {p}: {why}" for p, why in summary.skipped)
    )
    return 1 if summary.skipped else 0


if __name__ == "__main__":
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="detectron2")
    setup_logger(name="semiseg_d2")
    sys.exit(main())
