#!/usr/bin/env python
"""Cluster quality of a trained model's per-pixel features (DGCL slides: silhouette, Calinski-Harabasz).

    python tools/feature_stats.py --config-file configs/dgcl_city.yaml --weights output/dgcl_city/model_final.pth \
        --dataset cityscapes_fine_val --num-pixels 10000 --output output/dgcl_city/feature_stats \
        [--network teacher] [--max-images 50] [--l2-normalize] [--plot] [MODEL.DEVICE cuda ...]

Runs the network on whole images, takes the head's "features" (the classifier input), labels them with the
ground truth nearest-downsampled to the feature resolution, samples ``--num-pixels`` labeled pixels (spread
evenly over the images) and writes ``feature_stats.json`` (silhouette, Calinski-Harabasz, counts) and, with
``--plot``, a 2-D PCA scatter ``feature_pca.png`` into ``--output``. The metrics are implemented here
(Euclidean distances, as scikit-learn's defaults) and tested in tests/tools/test_feature_stats.py.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import semiseg_d2  # noqa: E402,F401  (first: it filters detectron2's import-time warnings)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ------------------------------------------------------------------ metrics (pure)
def _cluster_ids(labels: torch.Tensor):
    classes, ids = torch.unique(labels, return_inverse=True)
    return classes, ids, torch.bincount(ids, minlength=classes.numel())


def silhouette_score(x: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) with Euclidean distances.

    x: [n, D] float; labels: [n] int (>= 2 distinct). s(i) = (b - a) / max(a, b), a = mean distance to the other
    members of i's cluster, b = the smallest mean distance to another cluster; s(i) = 0 in singleton clusters
    (scikit-learn's convention). Computed in fp64, rows in chunks (memory n * chunk).
    """
    x = x.double()
    classes, ids, sizes = _cluster_ids(labels)
    k = classes.numel()
    if k < 2 or k >= x.shape[0]:
        raise ValueError(f"silhouette needs 2 <= clusters < samples; got {k} clusters for {x.shape[0]} samples")
    onehot = F.one_hot(ids, k).double()  # [n, k]
    s = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start:start + chunk], x)  # [c, n]
        sums = d @ onehot  # [c, k] summed distance to every cluster
        own = ids[start:start + chunk]
        own_size = sizes[own].double()
        a = sums.gather(1, own[:, None]).squeeze(1) / (own_size - 1).clamp_min(1)
        mean_other = sums / sizes.double()
        mean_other.scatter_(1, own[:, None], float("inf"))
        b = mean_other.min(1).values
        si = (b - a) / torch.maximum(a, b).clamp_min(1e-300)
        s.append(torch.where(own_size > 1, si, torch.zeros_like(si)))
    return float(torch.cat(s).mean())


def calinski_harabasz_score(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Calinski-Harabasz index: [tr(B) / (k - 1)] / [tr(W) / (n - k)] (between- / within-cluster dispersion).

    x: [n, D] float; labels: [n] int with 2 <= k < n clusters. fp64. W == 0 gives inf unless B == 0 too (1.0,
    as scikit-learn).
    """
    x = x.double()
    classes, ids, sizes = _cluster_ids(labels)
    n, k = x.shape[0], classes.numel()
    if k < 2 or k >= n:
        raise ValueError(f"Calinski-Harabasz needs 2 <= clusters < samples; got {k} clusters for {n} samples")
    means = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, ids, x) / sizes[:, None].double()
    between = (sizes.double() * ((means - x.mean(0)) ** 2).sum(1)).sum()
    within = ((x - means[ids]) ** 2).sum()
    if within == 0:
        return 1.0 if between == 0 else float("inf")
    return float(between * (n - k) / (within * (k - 1)))


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Project rows of ``x [n, D]`` on their first two principal components (SVD of the centred data) -> [n, 2]."""
    xc = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(xc, full_matrices=False)
    return (xc @ v[:2].T).float()


def sample_labeled_pixels(feats: torch.Tensor, labels: torch.Tensor, n: int, ignore: int, generator=None):
    """Up to ``n`` random pixels with a label != ignore. feats [D, h, w], labels [h, w] -> ([m, D], [m])."""
    f = feats.flatten(1).T
    lab = labels.flatten()
    idx = (lab != ignore).nonzero().squeeze(1)
    idx = idx[torch.randperm(idx.numel(), generator=generator)[:n]]
    return f[idx], lab[idx]


# ------------------------------------------------------------------ CLI
def build_network(args):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from semiseg_d2.config import get_semiseg_cfg

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(args.weights)
    model.eval()
    net = getattr(model, args.network) if hasattr(model, "teacher") else model
    return cfg, net


@torch.no_grad()
def collect(cfg, net, dataset: str, num_pixels: int, max_images: int, seed: int):
    from detectron2.data import MetadataCatalog
    from semiseg_d2.data.io import read_image

    from semiseg_d2.data.build import load_dataset_dicts
    from semiseg_d2.data.label_io import load_sem_seg
    from semiseg_d2.layers.label_ops import resize_labels

    dicts = [d for d in load_dataset_dicts([dataset], f"--dataset '{dataset}'") if "sem_seg_file_name" in d]
    if not dicts:
        raise ValueError(f"--dataset '{dataset}' has no labeled images")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dicts), generator=g)[: max_images if max_images > 0 else len(dicts)].tolist()
    per_image = -(-num_pixels // len(order))
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    feats, labels = [], []
    for i in order:
        rec = dicts[i]
        image = read_image(rec["file_name"], rec.get("dataset_name", dataset))
        label = torch.from_numpy(load_sem_seg(rec["sem_seg_file_name"], rec.get("dataset_name", dataset)).astype(np.int64))
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(net.device)
        out = net.extract(net.normalize(x))
        f = out["features"][0].float().cpu()
        lab = resize_labels(label[None], f.shape[-2:])[0]
        fi, li = sample_labeled_pixels(f, lab, per_image, ignore, g)
        feats.append(fi)
        labels.append(li)
    feats, labels = torch.cat(feats)[:num_pixels], torch.cat(labels)[:num_pixels]
    names = MetadataCatalog.get(dataset).get("stuff_classes", None)
    return feats, labels, names


def plot_pca(path: str, feats: torch.Tensor, labels: torch.Tensor, names=None, colors=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = pca_2d(feats).numpy()
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    for c in torch.unique(labels).tolist():
        m = (labels == c).numpy()
        color = None if colors is None else np.array(colors[c]) / 255.0
        ax.scatter(xy[m, 0], xy[m, 1], s=2, alpha=0.6, color=color, label=names[c] if names else str(c))
    ax.set_title("per-pixel features, first two principal components")
    ax.legend(markerscale=5, fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="model checkpoint (trainer or exported Segmentor)")
    p.add_argument("--dataset", required=True, help="a registered labeled dataset, e.g. cityscapes_fine_val")
    p.add_argument("--num-pixels", type=int, default=10000, help="pixels sampled in total")
    p.add_argument("--output", required=True, help="output folder (feature_stats.json, feature_pca.png)")
    p.add_argument("--network", default="teacher", choices=["teacher", "student"], help="for SemiSegmentor checkpoints")
    p.add_argument("--max-images", type=int, default=100, help="images used (0 = all)")
    p.add_argument("--l2-normalize", action="store_true", help="L2-normalise features first (cosine geometry)")
    p.add_argument("--plot", action="store_true", help="also write a 2-D PCA scatter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    import semiseg_d2  # noqa: F401  registers datasets / models

    cfg, net = build_network(args)
    feats, labels, names = collect(cfg, net, args.dataset, args.num_pixels, args.max_images, args.seed)
    if args.l2_normalize:
        feats = F.normalize(feats, dim=1)
    stats = {
        "dataset": args.dataset,
        "weights": args.weights,
        "network": args.network,
        "num_pixels": int(feats.shape[0]),
        "num_classes_present": int(torch.unique(labels).numel()),
        "l2_normalize": args.l2_normalize,
        "silhouette": silhouette_score(feats, labels),
        "calinski_harabasz": calinski_harabasz_score(feats, labels),
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "feature_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    if args.plot:
        from detectron2.data import MetadataCatalog

        colors = MetadataCatalog.get(args.dataset).get("stuff_colors", None)
        plot_pca(os.path.join(args.output, "feature_pca.png"), feats, labels, names, colors)
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
