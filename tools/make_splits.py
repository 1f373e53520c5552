#!/usr/bin/env python
"""Make or convert labeled/unlabeled split lists.

  # seeded partition of a registered dataset (count or ratio) -> DIR/labeled.txt, DIR/unlabeled.txt
  python tools/make_splits.py partition --dataset camvid_train --labeled 46 --seed 0 --out semiseg_d2/data/splits/camvid/46
  python tools/make_splits.py partition --dataset cityscapes_fine_train --ratio 0.125 --format path --out DIR
  # convert a list between formats: id | path | unimatch | cps (see semiseg_d2/data/splits/splits.py)
  python tools/make_splits.py convert --input labeled.txt --output labeled_unimatch.txt --format unimatch --dataset voc_2012_seg_train_aug
  # partial-COCO protocol (Soft-Teacher folds; semiseg_d2/data/splits/coco_splits.py) -> OUT/{P}pct/fold{F}/*.txt
  python tools/make_splits.py coco --json datasets/coco/annotations/instances_train2017.json --percent 1 5 10 --folds 1 2 3 4 5 --out datasets/coco/semi_splits
  # each class's share of the labeled pixels and the images holding >= 1 % of it, per registered dataset
  python tools/make_splits.py stats --dataset camvid_train_46_labeled camvid_train camvid_val [--json out.json]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from semiseg_d2.data.splits.splits import FORMATS, class_pixel_stats, convert_list, partition_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    part = sub.add_parser("partition", help="seeded labeled/unlabeled partition of a registered dataset")
    part.add_argument("--dataset", required=True, help="registered dataset name (images are checked on disk)")
    group = part.add_mutually_exclusive_group(required=True)
    group.add_argument("--labeled", type=int, help="number of labeled images")
    group.add_argument("--ratio", type=float, help="labeled fraction, e.g. 0.125 for 1/8")
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--format", default="id", choices=FORMATS)
    part.add_argument("--out", required=True, help="folder for labeled.txt and unlabeled.txt")
    conv = sub.add_parser("convert", help="rewrite a split list in another format")
    conv.add_argument("--input", required=True)
    conv.add_argument("--output", required=True)
    conv.add_argument("--format", required=True, choices=FORMATS)
    conv.add_argument("--dataset", default=None, help="registered dataset to look paths up in (ids -> paths)")
    coco = sub.add_parser("coco", help="partial-COCO labeled/unlabeled image-id lists (Soft-Teacher folds)")
    coco.add_argument("--json", required=True, help="COCO instances json (e.g. instances_train2017.json)")
    coco.add_argument("--percent", type=float, nargs="+", default=[1.0, 5.0, 10.0], help="labeled percentages")
    coco.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="folds (= numpy seeds)")
    coco.add_argument("--out", required=True, help="folder for {P}pct/fold{F}/{labeled,unlabeled}.txt")
    stats = sub.add_parser("stats", help="class pixel shares of registered datasets (does a split represent the classes?)")
    stats.add_argument("--dataset", required=True, nargs="+", help="registered dataset names with semantic labels")
    stats.add_argument("--min-share", type=float, default=0.01,
                       help="an image holds a class when at least this fraction of its pixels is of it (default 0.01)")
    stats.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)

    if args.cmd == "coco":
        from semiseg_d2.data.splits.coco_splits import write_coco_semi_splits

        for (pct, fold), (n_l, n_u) in write_coco_semi_splits(args.json, args.out, args.percent, args.folds).items():
            print(f"{args.json}: {pct:g}% fold {fold}: {n_l} labeled, {n_u} unlabeled -> {args.out}")
        return 0

    import semiseg_d2  # noqa: F401  registers the datasets

    if args.cmd == "stats":
        import json

        results = [class_pixel_stats(name, args.min_share) for name in args.dataset]
        width = max(len(c) for c in results[0]["classes"])
        print(f"{'class':{width}s}  " + "  ".join(f"{r['dataset']} ({r['images']} images): % pixels, images" for r in results))
        for c in results[0]["classes"]:
            cells = [f"{100 * r['classes'][c]['share']:6.2f} %, {r['classes'][c]['images']:4d}" if c in r["classes"] else "—"
                     for r in results]
            print(f"{c:{width}s}  " + "  ".join(cells))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    if args.cmd == "partition":
        lab, unl = partition_dataset(args.dataset, args.out, args.labeled, args.ratio, args.seed, args.format)
        print(f"{args.dataset}: {len(lab)} labeled, {len(unl)} unlabeled (seed {args.seed}) -> {args.out}")
    else:
        n = convert_list(args.input, args.output, args.format, args.dataset)
        print(f"{args.input} -> {args.output}: {n} entries in format '{args.format}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
