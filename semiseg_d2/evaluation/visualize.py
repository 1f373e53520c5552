"""Small visualisation helpers: colour label maps with a dataset's colours, tile images into a PNG."""
from typing import List, Sequence

import numpy as np


def colorize(label: np.ndarray, meta, ignore_color=(0, 0, 0)) -> np.ndarray:
    """``label [H,W]`` int -> ``uint8 [H,W,3]`` with ``meta.stuff_colors``; ignore/unknown ids get ``ignore_color``."""
    colors = np.asarray(meta.stuff_colors, dtype=np.uint8)
    lut = np.tile(np.asarray(ignore_color, dtype=np.uint8), (256, 1))
    lut[: len(colors)] = colors
    return lut[np.clip(np.asarray(label), 0, 255).astype(np.int64)]


def save_grid(rows: List[Sequence[np.ndarray]], titles: Sequence[str], path: str, scale: float = 3.0) -> None:
    """Save ``rows`` of equally sized RGB images (uint8 [H,W,3]) as one PNG with column titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(titles)
    h, w = rows[0][0].shape[:2]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(scale * n_cols * w / h, scale * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
