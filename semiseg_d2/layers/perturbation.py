"""Batched tensor ops that perturb the views of a training step, run on the device by the meta-architecture:
CutMix / ClassMix masks and :func:`mix`, and UniMatch V2's complementary channel-dropout masks.

Mask convention: ``mask[b, y, x] = True`` means output pixel (y, x) of image b comes from the partner image
``partner_index[b]``; :func:`mix` applies one mask to images, pseudo-labels, confidences alike, so mixed
images and mixed targets always agree.
"""
from typing import Optional, Sequence

import torch

__all__ = ["cutmix_masks", "classmix_masks", "mix", "shifted_partner_index", "complementary_channel_masks"]


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


def complementary_channel_masks(pairs: int, channels: int, unperturbed_fraction: float = 0.5, *,
                                device=None, generator=None) -> torch.Tensor:
    """Channel scales for ``cat(strong1, strong2)`` of ``pairs`` images each -> ``[2 * pairs, channels]`` float.

    Image ``j`` of the first stream gets ``m_j = 2 * Bernoulli(0.5)`` per channel (0 or 2), image ``j`` of the
    second ``2 - m_j``: together the two views see every channel once, at twice its value. A random
    ``int(pairs * unperturbed_fraction)`` of the pairs keep all channels (scale 1 in both): the official
    ``num_kept = int(bs // 2 * (1 - dropout_prob))`` with ``dropout_prob = 0.5``.
    """
    if not 0.0 <= unperturbed_fraction <= 1.0:
        raise ValueError(f"unperturbed_fraction must lie in [0, 1], got {unperturbed_fraction}")
    m1 = torch.randint(0, 2, (pairs, channels), generator=generator).float() * 2.0
    m2 = 2.0 - m1
    kept = torch.randperm(pairs, generator=generator)[: int(pairs * unperturbed_fraction)]
    m1[kept] = 1.0
    m2[kept] = 1.0
    return torch.cat([m1, m2]).to(device)
