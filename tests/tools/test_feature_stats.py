"""tools/feature_stats.py: silhouette / Calinski-Harabasz against hand-computed values, PCA, and the CLI on
two bundled CamVid frames with a tiny random model."""
import importlib.util
import json
import math
import os
import tempfile

import torch
from detectron2.modeling import build_model

from tests.tiny import tiny_cfg

_spec = importlib.util.spec_from_file_location(
    "feature_stats", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "feature_stats.py")
)
fs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fs)


def test_metrics_match_hand_computed_values():
    # 1-D: cluster 0 = {0, 1}, cluster 1 = {4, 5}
    x = torch.tensor([[0.0], [1.0], [4.0], [5.0]])
    y = torch.tensor([0, 0, 1, 1])
    # s(0) = (4.5 - 1) / 4.5, s(1) = (3.5 - 1) / 3.5, symmetric for cluster 1
    expected = (3.5 / 4.5 + 2.5 / 3.5) / 2
    assert math.isclose(fs.silhouette_score(x, y), expected, rel_tol=1e-12)
    assert math.isclose(fs.silhouette_score(x, y, chunk=1), expected, rel_tol=1e-12)
    # B = 2 * 2^2 + 2 * 2^2 = 16, W = 4 * 0.5^2 = 1, k = 2, n = 4: (16 / 1) / (1 / 2) = 32
    assert math.isclose(fs.calinski_harabasz_score(x, y), 32.0, rel_tol=1e-12)
    # label values need not be 0..k-1; a singleton cluster has s = 0
    x2 = torch.tensor([[0.0, 0.0], [0.0, 3.0], [4.0, 0.0]])
    y2 = torch.tensor([7, 7, 2])
    # s(0): a = 3, b = 4 -> 0.25; s(1): a = 3, b = 5 -> 0.4; s(2) = 0
    assert math.isclose(fs.silhouette_score(x2, y2), (0.25 + 0.4) / 3, rel_tol=1e-12)
    # mu = (4/3, 1); mu_7 = (0, 1.5), mu_2 = (4, 0): B = 2 * (16/9 + 1/4) + (64/9 + 1) = 12.1667, W = 4.5
    B = 2 * (16 / 9 + 0.25) + (64 / 9 + 1)
    assert math.isclose(fs.calinski_harabasz_score(x2, y2), (B / 1) / (4.5 / 1), rel_tol=1e-12)


def test_pca_2d_finds_the_main_axis():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([10.0, 3.0, 0.1, 0.1, 0.1])
    xy = fs.pca_2d(x)
    assert xy.shape == (200, 2)
    assert xy[:, 0].var() > xy[:, 1].var() > 1.0


def test_cli_on_bundled_camvid_frames():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, "cfg.yaml")
        with open(cfg_path, "w") as f:
            f.write(cfg.dump())
        weights = os.path.join(tmp, "model.pth")
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        out = os.path.join(tmp, "out")
        stats = fs.main(["--config-file", cfg_path, "--weights", weights, "--dataset", "camvid_mini_val",
                         "--num-pixels", "300", "--max-images", "2", "--output", out, "--plot"])
        assert stats["num_pixels"] == 300 and -1.0 <= stats["silhouette"] <= 1.0 and stats["calinski_harabasz"] > 0
        with open(os.path.join(out, "feature_stats.json")) as f:
            assert json.load(f)["silhouette"] == stats["silhouette"]
        assert os.path.getsize(os.path.join(out, "feature_pca.png")) > 1000
