"""Small visualisation helpers: colour label maps with a dataset's colours, tile images into a PNG, and the
training pictures of ``SEMI.VIS_PERIOD`` (:func:`semi_step_pictures`, which ``SemiSegmentor.forward`` puts into
detectron2's event storage, as ``GeneralizedRCNN.visualize_training`` does)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

PANEL_GAP = 2  # pixels between panels of a tiled picture
CAPTION_HEIGHT = 14  # pixels of the caption strip above the first row (0 without captions)


def colorize(label: np.ndarray, meta, ignore_color=(0, 0, 0)) -> np.ndarray:
    """``label [H,W]`` int -> ``uint8 [H,W,3]`` with ``meta.stuff_colors``; ignore/unknown ids get ``ignore_color``."""
    colors = np.asarray(meta.stuff_colors, dtype=np.uint8)
    lut = np.tile(np.asarray(ignore_color, dtype=np.uint8), (256, 1))
    lut[: len(colors)] = colors
    return lut[np.clip(np.asarray(label), 0, 255).astype(np.int64)]


def class_legend(meta, ignore_color=(0, 0, 0)) -> List[Tuple[str, Tuple[int, int, int]]]:
    """``(class name, (r, g, b))`` per class of ``meta`` (``stuff_classes`` / ``stuff_colors``) and the colour
    :func:`colorize` gives ignored pixels, for :func:`save_grid`'s legend."""
    legend = [(name, tuple(int(v) for v in color)) for name, color in zip(meta.stuff_classes, meta.stuff_colors)]
    return legend + [("ignore (not scored)", tuple(ignore_color))]


def save_grid(rows: List[Sequence[np.ndarray]], titles: Sequence[str], path: str, scale: float = 3.0,
              legend: Optional[Sequence[Tuple[str, Tuple[int, int, int]]]] = None) -> None:
    """Save ``rows`` of equally sized RGB images (uint8 [H,W,3]) as one PNG with column titles and, with
    ``legend`` (:func:`class_legend`), a colour key of the classes below the grid."""
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
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=np.asarray(color) / 255.0, edgecolor="black", label=name) for name, color in legend]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 2 * n_cols), frameon=False)
        rows_of_legend = math.ceil(len(handles) / min(len(handles), 2 * n_cols))
        fig.tight_layout(rect=(0, 0.35 * rows_of_legend / (scale * n_rows), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def denormalize(images: torch.Tensor, pixel_mean, pixel_std) -> torch.Tensor:
    """Inverse of ``Segmentor.normalize``: ``float [B,3,H,W]`` normalised -> ``uint8 [B,3,H,W]`` RGB 0..255.

    ``pixel_mean`` / ``pixel_std``: 3 values each (sequence or tensor, e.g. the model's buffers)."""
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
    return (images.float() * std + mean).round_().clamp_(0, 255).to(torch.uint8)


def mask_to_rgb(mask: np.ndarray) -> np.ndarray:
    """``bool [H,W]`` -> ``uint8 [H,W,3]``: white where True, black elsewhere."""
    return np.repeat((np.asarray(mask, dtype=bool) * 255).astype(np.uint8)[..., None], 3, axis=2)


def tile_panels(rows: List[Sequence[np.ndarray]], captions: Optional[Sequence[str]] = None,
                gap: int = PANEL_GAP) -> np.ndarray:
    """Tile ``rows`` of equally sized RGB panels (``uint8 [H,W,3]``) into one ``uint8`` image.

    Panel ``(r, c)`` starts at ``y = CAPTION_HEIGHT * bool(captions) + r * (H + gap)``, ``x = c * (W + gap)``;
    the gaps are grey. ``captions`` (one per column) are drawn in a strip above the first row.
    """
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel.shape != (h, w, 3) or panel.dtype != np.uint8:
                raise ValueError(f"tile_panels: panel ({r}, {c}) is {panel.dtype} {panel.shape}, expected uint8 "
                                 f"{(h, w, 3)}")
    top = CAPTION_HEIGHT if captions else 0
    out = np.full((top + len(rows) * (h + gap) - gap, n_cols * (w + gap) - gap, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = top + r * (h + gap), c * (w + gap)
            out[y:y + h, x:x + w] = panel
    if captions:
        from PIL import Image, ImageDraw

        out[:top] = 0
        for c, text in enumerate(captions):  # each caption clipped to its column
            strip = Image.new("RGB", (w, top))
            ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255))
            out[:top, c * (w + gap):c * (w + gap) + w] = np.asarray(strip)
    return out


def _shrink(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Labels and masks ``[H,W]``: every ``stride``-th pixel (values kept exactly); RGB images ``uint8 [3,H,W]``:
    box-filtered to the same size."""
    if stride == 1:
        return x
    if x.dim() == 3:
        from PIL import Image

        h, w = x.shape[-2:]
        size = (math.ceil(w / stride), math.ceil(h / stride))
        small = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy()).resize(size, Image.BOX)
        return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)
    return x[::stride, ::stride]


def semi_step_pictures(record: Dict, meta, max_size: int = 320) -> Dict[str, np.ndarray]:
    """The TensorBoard pictures of one training step: tag -> ``uint8 [H,W,3]``, one row per image.

    ``record`` is ``SemiSegmentor.vis_summary`` (first images of each part, on the CPU: no model, no storage, only
    tensors in and arrays out); ``meta`` gives
    ``stuff_colors``. Tags:
      ``semi/labeled``: image | ground truth | student prediction;
      ``semi/pseudo_label`` (after burn-in): weak view | teacher pseudo-label | pixels kept by the
        ``pseudo_label`` term's filter (white; the column is left out without that term);
      ``semi/strong`` (after burn-in): strong view | student prediction | mix mask (white = pasted).
    The unlabeled pictures are in the geometry of the mixed strong views (the weak view mixed like them),
    so the pseudo-label, kept-pixel mask and student prediction are pixel-aligned with what the
    ``pseudo_label`` term compares. Panels whose longer side exceeds ``max_size`` are shrunk by an integer
    stride (labels and masks by subsampling, keeping their values).
    """

    def rgb(x):  # uint8 [3,H,W] tensor -> [H,W,3]
        return x.permute(1, 2, 0).contiguous().numpy()

    def lab(x):
        return colorize(x.numpy(), meta)

    def msk(x):
        return mask_to_rgb(x.numpy())

    h, w = record["labeled"]["image"].shape[-2:]
    stride = max(1, math.ceil(max(h, w) / max_size)) if max_size else 1

    def picture(columns, captions):
        n = len(columns[0][1])
        rows = [[fn(_shrink(x[i], stride)) for fn, x in columns] for i in range(n)]
        return tile_panels(rows, captions)

    lab_rec = record["labeled"]
    out = {
        "semi/labeled": picture(
            [(rgb, lab_rec["image"]), (lab, lab_rec["ground_truth"]), (lab, lab_rec["student"])],
            ["image", "ground truth", "student"],
        )
    }
    unl = record.get("unlabeled")
    if unl is not None:
        columns = [(rgb, unl["weak"]), (lab, unl["pseudo_label"])]
        captions = ["weak view (mixed)", "teacher pseudo-label"]
        if unl["kept"] is not None:
            columns.append((msk, unl["kept"]))
            captions.append("kept by pseudo_label")
        out["semi/pseudo_label"] = picture(columns, captions)
        out["semi/strong"] = picture(
            [(rgb, unl["strong"]), (lab, unl["student"]), (msk, unl["mix_mask"])],
            ["strong view (mixed)", "student", "mix mask"],
        )
    return out
