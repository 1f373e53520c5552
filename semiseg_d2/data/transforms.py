"""Per-sample augmentation of the data loader: the strong photometric view of unlabeled images. The batched
mixing of the training step (CutMix / ClassMix) runs on the device inside the model: layers/perturbation.py.
"""
import math
from typing import Optional, Sequence

import torch
import torchvision.transforms.v2.functional as TF

__all__ = ["StrongPhotometricAug"]


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
