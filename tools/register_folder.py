#!/usr/bin/env python
"""Check a folder dataset (images + class-index masks, or images only) and write the config that trains on it.

  # summary of a labeled folder + an unlabeled folder: what training's first DatasetCatalog.get checks
  # (images, a mask per image, mask values and sizes unless CHECK_MASKS is off)
  python tools/register_folder.py --name my_data --image-dir data/images --mask-dir data/masks \\
      --unlabeled-dir data/unlabeled --classes road car person
  # ... and read every mask: values outside the classes / ignore label, sizes, per-class pixel histogram
  python tools/register_folder.py --name my_data --image-dir data/images --mask-dir data/masks --classes road car person --check
  # write the DATASETS.FOLDERS snippet ('-' = stdout), or a whole config on top of a shipped one
  python tools/register_folder.py ... --yaml -
  python tools/register_folder.py ... --yaml configs/my_data.yaml --base configs/camvid/demo_semi_cpu.yaml
  # check every DATASETS.FOLDERS dataset of a config (after its opts)
  python tools/register_folder.py --config-file configs/folder/example_camvid_folders.yaml --check
  # ... and fully decode every image and mask, in parallel: lists every truncated / unreadable file
  python tools/register_folder.py --config-file configs/folder/example_camvid_folders.yaml --check --decode
  # lay out the bundled CamVid frames as plain folders (the documented example, docs/datasets.md)
  python tools/register_folder.py --layout-camvid datasets/camvid_folders

Exit status: 0 when every dataset is valid, 1 when one is not (the reason is printed, naming the file/key/value).
Relative paths are relative to the working directory, as in tools/train_net.py.
"""
import argparse
import os
import shutil
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import yaml  # noqa: E402

CAMVID_LAYOUT = ("images", "masks", "unlabeled", "val_images", "val_masks")


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="my_data", help="dataset name (the unlabeled / val sets get _unlabeled / _val)")
    p.add_argument("--image-dir", help="folder of images (with masks: the labeled set)")
    p.add_argument("--mask-dir", default=None, help="folder of <stem><suffix>.png class-index masks")
    p.add_argument("--unlabeled-dir", default=None, help="folder of unlabeled images -> NAME_unlabeled")
    p.add_argument("--val-image-dir", default=None, help="folder of validation images -> NAME_val (needs --val-mask-dir)")
    p.add_argument("--val-mask-dir", default=None, help="folder of validation masks")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--classes", nargs="+", help="class names; mask value i = i-th name")
    classes.add_argument("--classes-file", help="text file with one class name per line")
    p.add_argument("--ignore-label", type=int, default=255)
    p.add_argument("--mask-suffix", default="", help="mask name = <image stem><suffix>.png")
    p.add_argument("--list", default=None, help="split list (image stems) selecting images of --image-dir")
    p.add_argument("--select", default="all", choices=("all", "with_mask", "without_mask"),
                   help="with --mask-dir: every image needs a mask / only images with one / only those without")
    p.add_argument("--check", action="store_true", help="read every mask: values, sizes, per-class histogram")
    p.add_argument("--decode", action="store_true",
                   help="with --check: also fully decode every image and mask (in parallel) and list unreadable files")
    p.add_argument("--jobs", type=int, default=0, help="with --decode: processes (default: every CPU of this process)")
    p.add_argument("--yaml", default=None, help="write the DATASETS.FOLDERS snippet here ('-' = stdout)")
    p.add_argument("--base", default=None, help="with --yaml: write a whole config with _BASE_ = this file")
    p.add_argument("--config-file", default=None, help="check the DATASETS.FOLDERS datasets of this config")
    p.add_argument("--layout-camvid", metavar="OUT", default=None,
                   help="copy the bundled CamVid frames to OUT/{" + ",".join(CAMVID_LAYOUT) + "} and exit")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="with --config-file: KEY VALUE overrides")
    args = p.parse_args(argv)
    modes = [bool(args.layout_camvid), bool(args.config_file), bool(args.image_dir)]
    if sum(modes) != 1:
        p.error("give exactly one of --image-dir (a folder dataset), --config-file or --layout-camvid")
    if args.image_dir and not (args.classes or args.classes_file):
        p.error("--image-dir needs --classes or --classes-file")
    if args.base and not args.yaml:
        p.error("--base needs --yaml (the file to write)")
    if args.decode and not args.check:
        p.error("--decode goes with --check")
    if bool(args.val_image_dir) != bool(args.val_mask_dir):
        p.error("--val-image-dir and --val-mask-dir go together")
    if args.opts and not args.config_file:
        p.error(f"unexpected arguments {args.opts} (KEY VALUE overrides go with --config-file)")
    return args


def layout_camvid(out: str) -> Dict[str, int]:
    """Bundled camvid_mini as plain folders: the 5 labeled frames of the shipped split (+ masks), the 36 others
    (no masks) and the 12 val frames (+ masks). Masks store class indices with void (11) written as 255."""
    from PIL import Image

    from semiseg_d2.data.datasets.register_camvid import BUNDLED_CAMVID_MINI, CAMVID_VOID
    from semiseg_d2.data.splits.splits import SHIPPED_SPLITS_DIR, entry_id, read_list

    split = os.path.join(SHIPPED_SPLITS_DIR, "camvid_mini", "5")
    jobs = [(entry_id(e), "train", "images", "masks") for e in read_list(os.path.join(split, "labeled.txt"))]
    jobs += [(entry_id(e), "train", "unlabeled", None) for e in read_list(os.path.join(split, "unlabeled.txt"))]
    val_dir = os.path.join(BUNDLED_CAMVID_MINI, "val")
    jobs += [(os.path.splitext(f)[0], "val", "val_images", "val_masks") for f in sorted(os.listdir(val_dir))]
    counts = {d: 0 for d in CAMVID_LAYOUT}
    for d in CAMVID_LAYOUT:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for stem, src_split, img_dst, mask_dst in jobs:
        shutil.copyfile(os.path.join(BUNDLED_CAMVID_MINI, src_split, stem + ".jpg"), os.path.join(out, img_dst, stem + ".jpg"))
        counts[img_dst] += 1
        if mask_dst:
            with Image.open(os.path.join(BUNDLED_CAMVID_MINI, src_split + "annot", stem + ".png")) as m:
                mask = np.asarray(m).copy()
            mask[mask == CAMVID_VOID] = 255
            Image.fromarray(mask).save(os.path.join(out, mask_dst, stem + ".png"))
            counts[mask_dst] += 1
    return counts


def _read_classes(args) -> List[str]:
    if args.classes:
        return list(args.classes)
    with open(args.classes_file) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def folder_nodes(args) -> Dict[str, Dict]:
    """``{name: DATASETS.FOLDERS entry}`` for the folders given on the command line (paths as typed)."""
    classes = _read_classes(args)
    main = {"IMAGE_DIR": args.image_dir}
    if args.mask_dir:
        main["MASK_DIR"] = args.mask_dir
    main["CLASSES"] = classes
    main["IGNORE_LABEL"] = args.ignore_label
    if args.mask_suffix:
        main["MASK_SUFFIX"] = args.mask_suffix
    if args.list:
        main["LIST"] = args.list
    if args.select != "all":
        main["SELECT"] = args.select
    nodes = {args.name: main}
    if args.unlabeled_dir:
        nodes[args.name + "_unlabeled"] = {"IMAGE_DIR": args.unlabeled_dir, "CLASSES": classes,
                                           "IGNORE_LABEL": args.ignore_label}
    if args.val_image_dir:
        val = {"IMAGE_DIR": args.val_image_dir, "MASK_DIR": args.val_mask_dir, "CLASSES": classes,
               "IGNORE_LABEL": args.ignore_label}
        if args.mask_suffix:
            val["MASK_SUFFIX"] = args.mask_suffix
        nodes[args.name + "_val"] = val
    return nodes


class _NoAliasDumper(yaml.SafeDumper):
    """Writes the shared CLASSES list out in every dataset (no YAML anchors: readers edit one entry)."""

    def ignore_aliases(self, data):
        return True


def _fmt_names(names: List[str]) -> str:
    return "(" + "".join(f'"{n}", ' for n in names).rstrip(" ") + ")" if names else "()"


SUPERVISED_BASE_EXAMPLE = "configs/camvid/supervised_R50_dlv3p_46.yaml"


def refuse_unfit_base(base: str, labeled: List[str], unlabeled: List[str]) -> None:
    """ValueError when the datasets cannot train under ``base``: no labeled set, or a semi-supervised base
    (MODEL.META_ARCHITECTURE SemiSegmentor) without unlabeled images. Refused, not rewritten: which method trains
    is the user's choice (a supervised base trains on the labeled set alone)."""
    from semiseg_d2.config import get_semiseg_cfg
    from semiseg_d2.modeling import is_semi_supervised

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(base)
    if not labeled:
        raise ValueError(f"--base {base}: no labeled images (--mask-dir, and not --select without_mask): "
                         "every config trains on a labeled set")
    if is_semi_supervised(cfg) and not unlabeled:
        raise ValueError(
            f"--base {base} is semi-supervised (MODEL.META_ARCHITECTURE SemiSegmentor) and needs unlabeled images, "
            "but none were given (its DATASETS.TRAIN_UNLABELED would be empty): add --unlabeled-dir DIR, or train on "
            f"the labeled images alone with a supervised base (MODEL.META_ARCHITECTURE Segmentor), e.g. --base "
            f"{SUPERVISED_BASE_EXAMPLE}; nothing was written"
        )


def config_text(nodes: Dict[str, Dict], args, out_path: Optional[str]) -> str:
    """YAML for ``nodes``: the DATASETS.FOLDERS snippet with TRAIN/TEST names, or with ``args.base`` a whole config
    (refused when the datasets cannot train under the base: :func:`refuse_unfit_base`)."""
    main_labeled = bool(args.mask_dir) and args.select != "without_mask"
    labeled = [args.name] if main_labeled else []
    unlabeled = ([] if main_labeled else [args.name]) + ([args.name + "_unlabeled"] if args.unlabeled_dir else [])
    val = [args.name + "_val"] if args.val_image_dir else []
    if args.base:
        refuse_unfit_base(args.base, labeled, unlabeled)
    folders = yaml.dump({"FOLDERS": nodes}, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None, width=1000)
    lines = []
    if args.base:
        base = os.path.relpath(os.path.abspath(args.base), os.path.dirname(os.path.abspath(out_path)))
        lines += ["# Written by tools/register_folder.py; relative paths are relative to the working directory.",
                  f'_BASE_: "{base}"',
                  "MODEL:", "  SEM_SEG_HEAD:", f"    NUM_CLASSES: {len(_read_classes(args))}",
                  f"    IGNORE_VALUE: {args.ignore_label}"]
    lines.append("DATASETS:")
    lines += ["  " + ln for ln in folders.rstrip("\n").split("\n")]
    lines.append(f"  TRAIN: {_fmt_names(labeled)}")
    lines.append(f"  TRAIN_LABELED: {_fmt_names(labeled)}")
    lines.append(f"  TRAIN_UNLABELED: {_fmt_names(unlabeled)}")
    if val or args.base:
        lines.append(f"  TEST: {_fmt_names(val)}")
    if args.base:
        lines.append(f'OUTPUT_DIR: "output/{args.name}"')
    return "\n".join(lines) + "\n"


def _cfg_with_nodes(nodes: Dict[str, Dict]):
    from semiseg_d2.config import get_semiseg_cfg

    cfg = get_semiseg_cfg()
    cfg.merge_from_other_cfg(type(cfg)({"DATASETS": {"FOLDERS": nodes}}))
    return cfg


def describe(name: str, check: bool) -> List[str]:
    """Summary lines of a registered folder dataset; ``check`` reads every mask (histogram)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from semiseg_d2.data.datasets.register_folder import _mask_path, _list_images, check_folder_masks

    meta = MetadataCatalog.get(name)
    spec = meta.folder_spec
    records = DatasetCatalog.get(name)  # structure checks (+ mask values/sizes with CHECK_MASKS)
    labeled = [r for r in records if "sem_seg_file_name" in r]
    kind = "labeled" if labeled else "unlabeled"
    out = [f"{name}: {len(records)} {kind} image(s) in {spec['image_dir']}"]
    if spec["mask_dir"]:
        used = {os.path.basename(_mask_path(spec, s)) for s in _list_images(spec, name)}
        extra = [f for f in os.listdir(spec["mask_dir"]) if f.lower().endswith(".png") and f not in used]
        out.append(f"  masks: {spec['mask_dir']} ({len(extra)} mask file(s) there match no image)" if extra
                   else f"  masks: {spec['mask_dir']}")
    if spec["list_file"]:
        out.append(f"  list: {spec['list_file']}")
    out.append(f"  {len(meta.stuff_classes)} classes, ignore label {meta.ignore_label}")
    if check and labeled:
        hist = check_folder_masks(labeled, meta.stuff_classes, meta.ignore_label, name)
        per_image = np.zeros(len(meta.stuff_classes), dtype=np.int64)
        from semiseg_d2.data.datasets.register_folder import mask_histogram

        for r in labeled:
            per_image += mask_histogram(r["sem_seg_file_name"])[: len(meta.stuff_classes)] > 0
        total = int(hist.sum())
        out.append(f"  all {len(labeled)} masks valid; {total} pixels:")
        out.append(f"  {'id':>4}  {'class':<20} {'pixels':>12} {'%':>7} {'images':>7}")
        for i, cname in enumerate(meta.stuff_classes):
            out.append(f"  {i:>4}  {cname:<20} {int(hist[i]):>12} {100.0 * hist[i] / total:>7.2f} {int(per_image[i]):>7}")
        ign = int(hist[meta.ignore_label])
        out.append(f"  {meta.ignore_label:>4}  {'(ignore)':<20} {ign:>12} {100.0 * ign / total:>7.2f}")
        absent = [c for i, c in enumerate(meta.stuff_classes) if hist[i] == 0]
        if absent:
            out.append(f"  warning: no pixel of class(es) {absent}")
    return out


def decode_all(names: List[str], jobs: int) -> Tuple[bool, List[str]]:
    """Fully decode every image and mask of the folder datasets ``names`` (``jobs`` processes, 0 = every CPU), with a
    progress bar on stderr; returns (all readable, summary lines: one per unreadable file). Records come from the folders'
    structure only, so a bad mask does not hide the other files."""
    from detectron2.data import MetadataCatalog
    from tqdm import tqdm

    from semiseg_d2.data.datasets.register_folder import _folder_records
    from semiseg_d2.data.io import default_num_workers, find_unreadable

    work = []
    for name in names:
        for rec in _folder_records(name, MetadataCatalog.get(name).folder_spec, name):
            work.append(("image", rec["file_name"], name))
            if "sem_seg_file_name" in rec:
                work.append(("label", rec["sem_seg_file_name"], name))
    with tqdm(total=len(work), desc="decode", unit="file", file=sys.stderr) as bar:
        bad = find_unreadable(work, jobs or default_num_workers(), progress=bar.update)
    if not bad:
        return True, [f"decoded all {len(work)} image and mask file(s) of {', '.join(names)}: every one is readable"]
    return False, [f"{len(bad)} of {len(work)} file(s) cannot be used:"] + [f"  {message}" for _, message in bad]


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.layout_camvid:
        counts = layout_camvid(args.layout_camvid)
        print(f"wrote {args.layout_camvid}: " + ", ".join(f"{d}/ {n}" for d, n in counts.items()))
        if os.path.normpath(args.layout_camvid) == os.path.join("datasets", "camvid_folders"):
            print("next: python tools/register_folder.py --config-file configs/folder/example_camvid_folders.yaml --check")
        else:  # the example config expects datasets/camvid_folders under the working directory
            print(f"next: python tools/register_folder.py --name camvid_folders --image-dir {args.layout_camvid}/images "
                  f"--mask-dir {args.layout_camvid}/masks --unlabeled-dir {args.layout_camvid}/unlabeled --classes "
                  "sky building pole road pavement tree sign_symbol fence car pedestrian bicyclist --check")
        return 0

    import semiseg_d2  # noqa: F401  registers the builtin datasets (a FOLDERS name must not clash with them)
    from semiseg_d2.config import get_semiseg_cfg
    from semiseg_d2.data.datasets.register_folder import register_folder_datasets_from_cfg

    try:
        if args.config_file:
            cfg = get_semiseg_cfg()
            cfg.merge_from_file(args.config_file)
            cfg.merge_from_list(args.opts)
        else:
            nodes = folder_nodes(args)
            cfg = _cfg_with_nodes(nodes)
        names = register_folder_datasets_from_cfg(cfg)
        if not names:
            raise ValueError(f"{args.config_file}: DATASETS.FOLDERS declares no dataset")
        summary_stream = sys.stderr if args.yaml == "-" else sys.stdout  # stdout then holds the YAML only
        if args.decode:
            readable, lines = decode_all(names, args.jobs)
            print("\n".join(lines), file=summary_stream)
            if not readable:
                return 1
        for name in names:
            print("\n".join(describe(name, args.check)), file=summary_stream)
        if args.image_dir and args.yaml:
            text = config_text(nodes, args, args.yaml)
            if args.yaml == "-":
                sys.stdout.write(text)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(args.yaml)), exist_ok=True)
                with open(args.yaml, "w") as f:
                    f.write(text)
                if args.base:  # the written config must load and agree with its model
                    check = get_semiseg_cfg()
                    check.merge_from_file(args.yaml)
                    register_folder_datasets_from_cfg(check)
                print(f"wrote {args.yaml}; train with: python tools/train_net.py --config-file {args.yaml}"
                      if args.base else f"wrote {args.yaml}")
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
