"""Segmentor: backbone + segmentation head, supervised training and (sliding-window / MS+flip) inference."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from detectron2.structures import ImageList

from ...config import check_semiseg_config
from ...losses.segmentation import ohem_cross_entropy, sem_seg_cross_entropy, upsample_logits
from ...utils.profiling import scope
from ..backbone.build import build_backbone_checked
from ..heads.build import build_sem_seg_head_checked

__all__ = ["Segmentor", "window_starts", "pad_to_multiple", "LOSS_TYPES"]

LOSS_TYPES = ("cross_entropy", "ohem")


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start offsets of windows of size ``window`` covering ``[0, length)``; the last one ends at the edge.

    ``length <= window`` gives ``[0]`` (the caller pads the image up to the window).
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def pad_to_multiple(images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad ``[B, C, H, W]`` at the bottom/right to multiples of ``divisor`` (0 or 1: unchanged)."""
    if divisor <= 1:
        return images
    H, W = images.shape[-2:]
    pad_h, pad_w = -H % divisor, -W % divisor
    return F.pad(images, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else images


@META_ARCH_REGISTRY.register()
class Segmentor(nn.Module):
    """Backbone + head (``MODEL.SEM_SEG_HEAD.NAME``) for semantic segmentation.

    Training input: list of ``{"image": uint8[3,H,W] RGB, "sem_seg": long[H,W]}``; output
    ``{"loss_sem_seg", ["loss_aux"]}`` (already weighted). Inference input: ``{"image": [3,h,w] RGB,
    ["height", "width"]}`` (the image may be resized, e.g. by DefaultPredictor); output
    ``[{"sem_seg": float[C, height, width]}]`` softmax probabilities at the original size.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        ignore_value: int = 255,
        loss_type: str = "cross_entropy",
        loss_weight: float = 1.0,
        aux_loss_weight: float = 0.0,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100000,
        sliding_window: Optional[Tuple[Tuple[int, int], Tuple[int, int], int]] = None,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        channels_last: bool = False,
        freeze_bn: bool = False,
    ):
        """
        Args:
            sliding_window: ``((win_h, win_w), (stride_h, stride_w), windows_per_batch)`` or None (whole image).
            test_scales / test_flip: multi-scale + horizontal-flip test; probabilities are averaged.
            freeze_bn: backbone norm layers stay in eval mode (running statistics fixed) in training.
        """
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.LOSS_TYPE: unknown {loss_type!r}; known: {list(LOSS_TYPES)}")
        if sliding_window is not None:
            (wh, ww), (sh, sw), bs = sliding_window
            if min(wh, ww, sh, sw, bs) <= 0:
                raise ValueError(
                    "TEST.SLIDING_WINDOW: SIZE, STRIDE and BATCH_SIZE must be positive, got "
                    f"SIZE={(wh, ww)}, STRIDE={(sh, sw)}, BATCH_SIZE={bs}"
                )
            sliding_window = ((int(wh), int(ww)), (int(sh), int(sw)), int(bs))
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        # Inputs are padded to multiples of this (ViT/14: 14; ResNets: 0), as Mask2Former takes it from the backbone.
        self.size_divisibility = backbone.size_divisibility
        self.num_classes = sem_seg_head.num_classes
        self.feature_dim = sem_seg_head.feature_dim  # D of head output "features"
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.ignore_value = ignore_value
        self.loss_type = loss_type
        self.loss_weight = loss_weight
        self.aux_loss_weight = aux_loss_weight
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.sliding_window = sliding_window
        self.test_scales = tuple(float(s) for s in test_scales)
        self.test_flip = test_flip
        self.channels_last = channels_last
        self.freeze_bn = freeze_bn
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        check_semiseg_config(cfg)  # a plain detectron2 cfg fails obscurely below (e.g. in SemSegFPNHead)
        backbone = build_backbone_checked(cfg)
        input_shape = backbone.output_shape()
        check_crop_size(cfg, max(s.stride for s in input_shape.values()), backbone.size_divisibility)
        head = build_sem_seg_head_checked(cfg, input_shape)
        h = cfg.MODEL.SEM_SEG_HEAD
        sw = cfg.TEST.SLIDING_WINDOW
        aug = cfg.TEST.AUG
        return {
            "backbone": backbone,
            "sem_seg_head": head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "ignore_value": h.IGNORE_VALUE,
            "loss_type": h.LOSS_TYPE,
            "loss_weight": h.LOSS_WEIGHT,
            "aux_loss_weight": h.AUX_LOSS_WEIGHT,
            "ohem_thresh": h.OHEM_THRESH,
            "ohem_min_kept": h.OHEM_MIN_KEPT,
            "sliding_window": (tuple(sw.SIZE), tuple(sw.STRIDE), sw.BATCH_SIZE) if sw.ENABLED else None,
            "test_scales": aug.SCALES if aug.ENABLED else (1.0,),
            "test_flip": bool(aug.ENABLED and aug.FLIP),
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "freeze_bn": cfg.MODEL.FREEZE_BN,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ building blocks for the semi engine
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images: uint8/float [B, 3, H, W]`` RGB 0..255 -> float ``(x - mean) / std``."""
        return (images.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std

    def extract(self, images: torch.Tensor, channel_scale: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``images: float [B, 3, H, W]`` normalised -> the head's output dict (see docs/architecture.md).

        ``channel_scale [B, D]`` multiplies every backbone output channel-wise before the head (UniMatch V2's
        complementary dropout; every backbone output needs D channels)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(images)
        if channel_scale is not None:
            bad = {k: v.shape[1] for k, v in feats.items() if v.shape[1] != channel_scale.shape[1]}
            if bad:
                raise ValueError(f"channel_scale has {channel_scale.shape[1]} channels, backbone outputs {bad}")
            scale = channel_scale.to(images.dtype)[:, :, None, None]
            feats = {k: v * scale for k, v in feats.items()}
        return self.sem_seg_head(feats)

    def extract_fp(self, images: torch.Tensor, dropout: float) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """UniMatch's feature perturbation: the head's outputs on the clean backbone features and on the same
        features after ``Dropout2d(dropout)`` (always on, also in eval mode), decoded in ONE head batch
        ``cat(clean, perturbed)`` as UniMatch's ``_decode(cat(c1, drop(c1)), cat(c4, drop(c4)))`` (its BN sees
        both). Every backbone output is perturbed; the image is not. Returns ``(clean, perturbed)`` output dicts."""
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"extract_fp: dropout must lie in (0, 1), got {dropout}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(images)
        both = {k: torch.cat([v, F.dropout2d(v, dropout, training=True)]) for k, v in feats.items()}
        out = self.sem_seg_head(both)
        clean, perturbed = {}, {}
        for key, value in out.items():
            if value is not None:
                clean[key], perturbed[key] = value.chunk(2)
        return clean, perturbed

    def pixel_loss(self, logits: torch.Tensor, targets: torch.Tensor, pixel_weight=None) -> torch.Tensor:
        """Unweighted ``MODEL.SEM_SEG_HEAD.LOSS_TYPE`` loss; ``logits [B,C,h,w]``, ``targets long [B,H,W]``;
        ``pixel_weight [B,H,W]`` (e.g. class balancing) multiplies each pixel's CE (mean over valid pixels)."""
        if pixel_weight is not None:
            if self.loss_type == "ohem":
                raise ValueError("per-pixel class weights and MODEL.SEM_SEG_HEAD.LOSS_TYPE 'ohem' cannot be combined")
            return sem_seg_cross_entropy(logits, targets, self.ignore_value, weight=pixel_weight)
        if self.loss_type == "ohem":
            return ohem_cross_entropy(
                logits, targets, self.ignore_value, thresh=self.ohem_thresh, min_kept=self.ohem_min_kept
            )
        return sem_seg_cross_entropy(logits, targets, self.ignore_value)

    def losses(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor, pixel_weight=None) -> Dict[str, torch.Tensor]:
        """Weighted supervised losses of a head output dict against ``targets long [B, H, W]``."""
        losses = {"loss_sem_seg": self.loss_weight * self.pixel_loss(outputs["logits"], targets, pixel_weight)}
        if self.aux_loss_weight > 0:
            if "aux_logits" not in outputs:
                raise KeyError("MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT > 0 but the head returned no 'aux_logits'")
            losses["loss_aux"] = self.aux_loss_weight * self.pixel_loss(outputs["aux_logits"], targets, pixel_weight)
        return losses

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if self.training:
            d = self.size_divisibility
            images = ImageList.from_tensors(
                [self.normalize(x["image"]) for x in batched_inputs], size_divisibility=d, pad_value=0.0
            )
            targets = ImageList.from_tensors(
                [x["sem_seg"].to(self.device) for x in batched_inputs], size_divisibility=d,
                pad_value=float(self.ignore_value),
            ).tensor.long()
            with scope("student"):
                outputs = self.extract(images.tensor)
            with scope("loss:supervised"):
                return self.losses(outputs, targets)
        results = []
        for x in batched_inputs:
            image = self.normalize(x["image"][None])
            probs = self.predict_probs(image)
            size = (x.get("height", image.shape[-2]), x.get("width", image.shape[-1]))
            if tuple(probs.shape[-2:]) != tuple(size):
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            results.append({"sem_seg": probs[0]})
        return results

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``images: float [B, 3, H, W]`` normalised -> probabilities ``[B, C, H, W]``.

        Averages softmax probabilities over ``test_scales`` x (identity, horizontal flip); each view runs
        whole-image or sliding-window inference.
        """
        if self.test_scales == (1.0,) and not self.test_flip:
            return self._view_probs(images)
        H, W = images.shape[-2:]
        total, n = 0.0, 0
        for scale in self.test_scales:
            x = images
            if scale != 1.0:
                size = (max(1, round(H * scale)), max(1, round(W * scale)))
                x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True) if self.test_flip else (False,):
                p = self._view_probs(x.flip(-1) if flip else x)
                p = p.flip(-1) if flip else p
                if scale != 1.0:
                    p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
                total = total + p
                n += 1
        return total / n

    def _view_probs(self, images: torch.Tensor) -> torch.Tensor:
        if self.sliding_window is not None:
            return self.sliding_window_probs(images)
        return self.whole_image_probs(images)

    def whole_image_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised -> softmax of logits upsampled to ``[B, C, H, W]``.

        The image is zero-padded (bottom/right) to ``size_divisibility``; logits are upsampled to the padded size
        and cropped back to ``H x W``.
        """
        H, W = images.shape[-2:]
        padded = pad_to_multiple(images, self.size_divisibility)
        logits = self.extract(padded)["logits"]
        return upsample_logits(logits, padded.shape[-2:])[..., :H, :W].softmax(dim=1)

    def sliding_window_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Average of window probabilities where windows overlap; ``[B, 3, H, W]`` -> ``[B, C, H, W]``.

        Windows step by the stride and the last row/column is aligned to the image edge. An image smaller
        than the window is zero-padded (the mean colour after normalisation) at the bottom/right up to the
        window and the result cropped back; the padding does change the logits near it (convolutions, BN
        shifts and ASPP image pooling see it), so only a window exactly the image size equals whole-image
        inference.
        """
        (wh, ww), (sh, sw), per_batch = self.sliding_window
        B, _, H, W = images.shape
        pad_h, pad_w = max(wh - H, 0), max(ww - W, 0)
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), value=0.0)
        Hp, Wp = images.shape[-2:]
        wh, ww = min(wh, Hp), min(ww, Wp)
        boxes = [(y, x) for y in window_starts(Hp, wh, sh) for x in window_starts(Wp, ww, sw)]
        probs = images.new_zeros(B, self.num_classes, Hp, Wp)
        count = images.new_zeros(1, 1, Hp, Wp)
        for i in range(0, len(boxes), per_batch):
            chunk = boxes[i : i + per_batch]
            crops = torch.cat([images[:, :, y : y + wh, x : x + ww] for y, x in chunk])
            p = self.whole_image_probs(crops)
            for j, (y, x) in enumerate(chunk):
                probs[:, :, y : y + wh, x : x + ww] += p[j * B : (j + 1) * B]
                count[:, :, y : y + wh, x : x + ww] += 1
        return (probs / count)[:, :, :H, :W]


def check_crop_size(cfg, output_stride: int, size_divisibility: int = 0) -> None:
    """Training crops need >= 2 feature cells per side at the output stride, and sides that are multiples of
    the backbone's ``size_divisibility`` (the semi-supervised engine feeds crops to the network unpadded).

    ASPP and decoder align features by interpolation, so any size runs; but with fewer than 2x2 cells at the
    deepest feature a batch of one has a single value per channel and BatchNorm cannot train on it.
    """
    if not cfg.INPUT.CROP.ENABLED or cfg.INPUT.CROP.TYPE != "absolute":
        return
    size = tuple(cfg.INPUT.CROP.SIZE)
    if size_divisibility > 1 and any(s % size_divisibility for s in size):
        raise ValueError(
            f"INPUT.CROP.SIZE: {size} must be multiples of {size_divisibility} for this backbone "
            f"(MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r}; e.g. 518 or 798 for DINOv2)"
        )
    if min(size) < 2 * output_stride:
        raise ValueError(
            f"INPUT.CROP.SIZE: {size} is too small for an output stride of {output_stride} "
            f"(MODEL.RESNETS.OUTPUT_STRIDE); each side must be >= {2 * output_stride}"
        )
