"""Class-batched modules: BatchNorm with per-class statistics and C class-specific attention selectors, applied to
all classes at once (no per-class loop, no host sync). Alonso et al. (ICCV 2021) score pixels and memory entries with
the selectors (losses/memory_contrast.py, projects/SemiInstance)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.dtype import upcast
from .distributed import sum_over_ranks
from .memory_bank import class_row_blocks

__all__ = ["ClassBatchNorm", "ClassAttentionSelectors"]


class ClassBatchNorm(nn.Module):
    """BatchNorm1d with its own statistics and affine parameters for every class, batched over classes.

    ``forward(x [N, H], labels long[N] in [0, C), mask bool[N] or None) -> [N, H]``: row n is normalised with the
    statistics of the (masked-in) rows of its class. Training mode: batch statistics per class (biased variance,
    like BatchNorm1d), running statistics updated for classes present in the batch (variance: those with >= 2
    rows); eval mode: running statistics. A class with a single row is normalised to its bias (BatchNorm1d
    raises there). No host sync. ``sync=True`` (``MODEL.SEM_SEG_HEAD.NORM`` "SyncBN") takes the batch statistics
    over every rank's rows, differentiably, as SyncBatchNorm does.
    """

    def __init__(self, num_classes: int, dim: int, eps: float = 1e-5, momentum: float = 0.1, sync: bool = False):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.sync = bool(sync)
        self.weight = nn.Parameter(torch.ones(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes, dim))
        self.register_buffer("running_mean", torch.zeros(num_classes, dim))
        self.register_buffer("running_var", torch.ones(num_classes, dim))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Also takes x [N, ..., H] with labels [N] (all rows of x[n] of class labels[n]) and mask [N, ...]: rows in
        # class blocks then read per-class statistics and parameters broadcast, not gathered to every row.
        x = upcast(x)
        inner = tuple(x.shape[1:-1])

        def per_class(t: torch.Tensor) -> torch.Tensor:  # [C, H] -> [N, 1..., H]
            return t[labels].view(labels.shape[0], *(1 for _ in inner), t.shape[-1])

        def rows(t: torch.Tensor) -> torch.Tensor:  # sum over the rows of every x[n]: [N, ...(, H)] -> [N(, H)]
            return t.flatten(1, len(inner)).sum(1) if inner else t

        if self.training:
            C, H = self.running_mean.shape
            w = x.new_ones(x.shape[:-1]) if mask is None else mask.to(x.dtype)
            total = sum_over_ranks if self.sync else (lambda t: t)
            n = total(x.new_zeros(C).index_add_(0, labels, rows(w)))
            denom = n.clamp_min(1.0)[:, None]
            mean = total(x.new_zeros(C, H).index_add_(0, labels, rows(x * w[..., None]))) / denom
            centred = x - per_class(mean)
            var = total(x.new_zeros(C, H).index_add_(0, labels, rows(centred.square() * w[..., None]))) / denom
            with torch.no_grad():
                m = self.momentum
                present = (n > 0)[:, None]
                self.running_mean.copy_(torch.where(present, (1 - m) * self.running_mean + m * mean, self.running_mean))
                unbiased = var * (n / (n - 1).clamp_min(1.0))[:, None]
                self.running_var.copy_(
                    torch.where((n > 1)[:, None], (1 - m) * self.running_var + m * unbiased, self.running_var)
                )
        else:
            mean, var = self.running_mean, self.running_var
            centred = x - per_class(mean)
        return centred * per_class(torch.rsqrt(var + self.eps)) * per_class(self.weight) + per_class(self.bias)


class ClassAttentionSelectors(nn.Module):
    """C class-specific attention modules S_c = Linear(D, H) - BN - LeakyReLU(0.2) - Linear(H, 1) - sigmoid
    (paper Sec. 4.2), stored as ``[C, ...]`` tensors and applied batched over classes.

    - :meth:`score_pixels` ``(x [N, D], labels long[N]) -> [N]``: each row through its own class's module
      (rows grouped into class blocks, one bmm with each block's class weights: no per-class loop or host sync).
    - :meth:`score_per_class` ``(x [C, M, D], valid bool[C, M]) -> [C, M]``: row c through module c (one bmm),
      BN statistics over the valid entries of each class.
    Rows whose label is outside [0, C) are scored with class 0's module and must be masked by the caller.
    """

    def __init__(self, num_classes: int, dim: int, hidden_dim: int = 256, negative_slope: float = 0.2,
                 sync_norm: bool = False):
        super().__init__()
        self.num_classes, self.dim, self.hidden_dim = int(num_classes), int(dim), int(hidden_dim)
        self.negative_slope = negative_slope
        bound1, bound2 = 1.0 / math.sqrt(dim), 1.0 / math.sqrt(hidden_dim)  # nn.Linear's default init
        self.weight1 = nn.Parameter(torch.empty(num_classes, dim, hidden_dim).uniform_(-bound1, bound1))
        self.bias1 = nn.Parameter(torch.empty(num_classes, hidden_dim).uniform_(-bound1, bound1))
        self.norm = ClassBatchNorm(num_classes, hidden_dim, sync=sync_norm)
        self.weight2 = nn.Parameter(torch.empty(num_classes, hidden_dim).uniform_(-bound2, bound2))
        self.bias2 = nn.Parameter(torch.empty(num_classes).uniform_(-bound2, bound2))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, hidden_dim={self.hidden_dim}"

    def _tail(self, h: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        # h [N, ..., H], labels [N] (as ClassBatchNorm) -> [N, ...]
        h = F.leaky_relu(self.norm(h, labels, mask), self.negative_slope)
        inner = (1,) * (h.dim() - 2)
        w2 = self.weight2[labels].view(labels.shape[0], *inner, self.hidden_dim)
        return torch.sigmoid((h * w2).sum(-1) + self.bias2[labels].view(labels.shape[0], *inner))

    def score_pixels(self, x: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        C = self.num_classes
        labels = labels.clamp(0, C - 1)
        # Rows in class blocks, each through its own class's module (one bmm for the first layer, per-block class
        # parameters and BN statistics broadcast over the block): about 4 blocks per class, so padding adds at most
        # a quarter of the rows and the gathered weights stay ~4C copies.
        block = max(64, -(-labels.numel() // (4 * C)))
        rows, ok, block_class, slot = class_row_blocks(labels, C, block)
        h = torch.bmm(x[rows], self.weight1.to(x.dtype)[block_class])  # [G, B, H]
        h = upcast(h) + self.bias1[block_class][:, None, :]
        in_stats = ok if mask is None else ok & mask.reshape(-1)[rows]  # padding rows stay out of the statistics
        return self._tail(h, block_class, in_stats).flatten()[slot]

    def score_per_class(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        C = x.shape[0]
        h = torch.baddbmm(self.bias1[:, None, :], upcast(x), upcast(self.weight1))  # [C, M, H]
        return self._tail(h, torch.arange(C, device=x.device), valid)
