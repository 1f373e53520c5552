"""Augmentations: the strong photometric view of unlabeled images (data side) and batched mixing masks
(CutMix / ClassMix) that the semi engine runs on the device inside the model.

Mask convention: ``mask[b, y, x] = True`` means output pixel (y, x) of image b comes from the partner image
``partner_index[b]``; :func:`mix` applies one mask to images, pseudo-labels, confidences alike, so mixed
images and mixed targets always agree.
"""
import math
from typing import Optional, Sequence

import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["StrongPhotometricAug", "cutmix_masks", "classmix_masks", "mix", "shifted_partner_index"]


class StrongPhotometricAug:
    """UniMatch's strong view, photometric only (geometry untouched, so it stays aligned with the weak view):
    ColorJitter(b, c, s, h) with probability ``color_jitter_prob`` (the four factors in random order),
    grayscale with ``grayscale_prob``, Gaussian blur (sigma ~ U(blur_sigma)) with ``blur_prob``.

    Call on ``uint8[3, H, W]`` RGB tensors; returns ``uint8[3, H, W]``. Randomness: the global torch RNG
    (detectron2 seeds it per data-loader worker), or ``generator``.
    """

    def __init__(
        self,
        color_jitter_prob: float = 0.8,
        color_jitter: Sequence[float] = (0.5, 0.5, 0.5, 0.25),
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
    ):
        self.color_jitter_prob = float(color_jitter_prob)
        self.brightness, self.contrast, self.saturation, self.hue = (float(v) for v in color_jitter)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

    @classmethod
    def from_config(cls, cfg) -> "StrongPhotometricAug":
        s = cfg.INPUT.STRONG
        return cls(s.COLOR_JITTER_PROB, s.COLOR_JITTER, s.GRAYSCALE_PROB, s.BLUR_PROB, s.BLUR_SIGMA)

    @staticmethod
    def _uniform(lo: float, hi: float, generator) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"StrongPhotometricAug expects uint8[3,H,W], got {image.dtype}{list(image.shape)}")
        out = image
        if torch.rand((), generator=generator).item() < self.color_jitter_prob:
            for op in torch.randperm(4, generator=generator).tolist():
                if op == 0 and self.brightness > 0:
                    f = self._uniform(max(0.0, 1 - self.brightness), 1 + self.brightness, generator)
                    out = TF.adjust_brightness(out, f)
                elif op == 1 and self.contrast > 0:
                    f = self._uniform(max(0.0, 1 - self.contrast), 1 + self.contrast, generator)
                    out = TF.adjust_contrast(out, f)
                elif op == 2 and self.saturation > 0:
                    f = self._uniform(max(0.0, 1 - self.saturation), 1 + self.saturation, generator)
                    out = TF.adjust_saturation(out, f)
                elif op == 3 and self.hue > 0:
                    out = TF.adjust_hue(out, self._uniform(-self.hue, self.hue, generator))
        if torch.rand((), generator=generator).item() < self.grayscale_prob:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if torch.rand((), generator=generator).item() < self.blur_prob:
            sigma = self._uniform(*self.blur_sigma, generator)
            # PIL's GaussianBlur(radius=sigma) (UniMatch) ~ a kernel covering +-3 sigma.
            k = 2 * math.ceil(3 * sigma) + 1
            out = TF.gaussian_blur(out, kernel_size=[k, k], sigma=[sigma, sigma])
        return out.contiguous()


def cutmix_masks(
    batch: int,
    h: int,
    w: int,
    prob: float = 0.5,
    area_range: Sequence[float] = (0.02, 0.4),
    ratio_range: Sequence[float] = (0.3, 1 / 0.3),
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One random box per image (with probability ``prob``; else all False): ``bool[batch, h, w]``.

    Box area ~ U(area_range) * h * w and aspect ratio w/h ~ U(ratio_range) as in UniMatch, clipped to the
    image and placed uniformly inside it. Fully vectorised: no host synchronisation.
    ``generator`` must live on ``device`` when given.
    """
    def rand(n):
        return torch.rand(n, device=device, generator=generator)

    area = (area_range[0] + (area_range[1] - area_range[0]) * rand(batch)) * (h * w)
    ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * rand(batch)
    bw = torch.sqrt(area * ratio).floor().clamp(1, w)
    bh = torch.sqrt(area / ratio).floor().clamp(1, h)
    x0 = (rand(batch) * (w - bw + 1)).floor().clamp(max=w - bw)
    y0 = (rand(batch) * (h - bh + 1)).floor().clamp(max=h - bh)
    apply = rand(batch) < prob
    xs = torch.arange(w, device=device, dtype=area.dtype).view(1, 1, w)
    ys = torch.arange(h, device=device, dtype=area.dtype).view(1, h, 1)
    inside_x = (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + bw).view(-1, 1, 1))
    inside_y = (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + bh).view(-1, 1, 1))
    return inside_x & inside_y & apply.view(-1, 1, 1)


def classmix_masks(
    labels: torch.Tensor,
    prob: float = 0.5,
    ignore_value: int = 255,
    partner_index: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """ClassMix masks ``bool[B, H, W]``: pixels of half of the classes present in the partner's label map.

    Args:
        labels: ``long[B, H, W]`` (pseudo-)labels. The mask of image b is drawn from the labels of its partner
            ``labels[partner_index[b]]`` (``partner_index`` None: ``labels`` are already the partners').
        prob: probability that an image is mixed at all (else its mask is all False).
        ignore_value: never counted as a class, never pasted.
    Half = ``ceil(n / 2)`` of the ``n`` classes present (ClassMix), chosen uniformly. Loops over the batch.
    """
    source = labels if partner_index is None else labels[partner_index]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    masks = torch.zeros(source.shape, dtype=torch.bool, device=source.device)
    apply = torch.rand(source.shape[0], generator=generator, device=gen_device) < prob
    for b in range(source.shape[0]):
        if not apply[b]:
            continue
        classes = torch.unique(source[b])
        classes = classes[classes != ignore_value]
        if classes.numel() == 0:
            continue
        order = torch.randperm(classes.numel(), generator=generator, device=gen_device).to(classes.device)
        chosen = classes[order[: (classes.numel() + 1) // 2]]
        masks[b] = torch.isin(source[b], chosen)
    return masks


def mix(
    x: torch.Tensor, mask: torch.Tensor, partner_index: torch.Tensor, source: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``where(mask, source[partner_index], x)`` for ``x: [B, ..., H, W]`` and ``mask: bool[B, H, W]``
    (broadcast over the channel dims between B and H, W). ``source`` (default ``x``), shaped like ``x``, is
    where the partners' pixels are read (e.g. the partners' maps from another pass of the same images)."""
    if mask.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1:] != x.shape[-2:]:
        raise ValueError(f"mix: mask {list(mask.shape)} does not match x {list(x.shape)} as [B,H,W] vs [B,...,H,W]")
    if source is not None and source.shape != x.shape:
        raise ValueError(f"mix: source {list(source.shape)} is not shaped like x {list(x.shape)}")
    m = mask.view(mask.shape[0], *([1] * (x.dim() - 3)), *mask.shape[1:])
    return torch.where(m, (x if source is None else source)[partner_index], x)


def shifted_partner_index(batch: int, device=None) -> torch.Tensor:
    """Partner of image b is image (b + 1) % batch: every image is mixed with another one of the batch."""
    return torch.roll(torch.arange(batch, device=device), shifts=-1)
