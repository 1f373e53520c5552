"""Pieces shared by the pixel-contrastive terms (DGCL, class-wise memory contrast): a per-pixel projection
MLP, class-grouped pixel sampling and InfoNCE. Pure tensor functions, batched over classes, no host syncs.

Class-grouped layout: a flat set of P pixels with labels is turned into ``index long[C, K]`` +
``valid bool[C, K]`` (row c lists up to K pixels of class c, padding entries point at pixel 0 and are
invalid). Features are then gathered as ``feats[index] -> [C, K, D]`` and every per-class operation is one
batched op over C.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import nn

from ..utils.dtype import upcast


def row_norm(norm: str, dim: int) -> nn.Module:
    """The norm layer for rows ``[N, dim]`` named like ``MODEL.SEM_SEG_HEAD.NORM``: "BN" -> BatchNorm1d,
    "SyncBN" -> nn.SyncBatchNorm (statistics over every rank's rows, as the official DGCL runs after
    ``convert_sync_batchnorm``; plain batch norm when no process group is running), other detectron2 names via
    ``get_norm``, "" -> none."""
    if norm == "BN":
        return nn.BatchNorm1d(dim)
    return get_norm(norm, dim) or nn.Identity()


class ProjectionHead(nn.Module):
    """Per-pixel MLP ``Linear - norm - ReLU - Linear`` on rows ``[N, in_dim] -> [N, out_dim]``
    (the projector of DGCL / U2PL / ReCo; BN statistics over the rows given; ``norm`` as :func:`row_norm`)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 256, norm: str = "BN"):
        super().__init__()
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            row_norm(norm, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def project_rows(self, x: torch.Tensor) -> "ProjectedRows":
        """Like ``forward(x)``, but the last Linear runs only on the rows read from the result (BN statistics
        still cover every row of x): for a loss that reads a few thousand of N rows."""
        last = self.net[-1]
        return ProjectedRows(self.net[:-1](x), last.weight, last.bias)


class ProjectedRows:
    """Rows of a projection ``[N, out_dim]`` computed on demand: ``rows[index]`` is ``Linear(hidden[index])``, the
    same values as ``forward(x)[index]`` without the N x out_dim matmul and its backward.

    ``detach()``: rows without gradient; ``frozen()``: detached, with a copy of the last layer's weights, so rows
    read after an optimizer step still are those of the forward pass (DGCL's bank update).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.hidden, self.weight, self.bias = hidden, weight, bias

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        # Under SOLVER.AMP the hidden rows are bf16/fp16 and the weights fp32; rows read outside autocast (the
        # bank update, after the step) use the weights cast to the hidden rows' dtype: the values autocast's
        # forward computes. A no-op in fp32, and inside autocast (which casts both operands the same way).
        weight = self.weight.to(self.hidden.dtype)
        bias = None if self.bias is None else self.bias.to(self.hidden.dtype)
        return F.linear(self.hidden[index], weight, bias)

    def detach(self) -> "ProjectedRows":
        bias = None if self.bias is None else self.bias.detach()
        return ProjectedRows(self.hidden.detach(), self.weight.detach(), bias)

    def frozen(self) -> "ProjectedRows":
        rows = self.detach()
        rows.weight = rows.weight.clone()
        rows.bias = None if rows.bias is None else rows.bias.clone()
        return rows


def flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w] -> [B*h*w, D]`` (pixel order b, y, x: the order of ``labels.reshape(-1)``)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _rand_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(x.shape, device=x.device, generator=generator)


def group_pixels_by_class(
    labels: torch.Tensor,
    num_classes: int,
    max_per_class: int,
    scores: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_per_class`` pixels of every class, as a padded class-major index.

    Args:
        labels: [P] long; values outside [0, num_classes) (ignore = 255) are never picked.
        num_classes: C.
        max_per_class: K (the output width is ``min(K, P)``, a static shape: no host sync).
        scores: [P] float, optional: keep the highest-scoring pixels of each class (ties: earlier first).
            Default: a uniform random subset (random keys drawn with ``generator``).
        generator: torch.Generator on ``labels.device`` for the random keys (rank-shared sampling).
    Returns:
        index: [C, K'] long, pixel indices into [0, P); valid: [C, K'] bool. Row c's valid entries come first,
        ordered by decreasing score (random order by default); ``valid.sum(1) == min(count_c, K)``.
    """
    labels = labels.reshape(-1).long()
    P = labels.numel()
    K = min(int(max_per_class), P)
    device = labels.device
    if K <= 0:
        return (torch.zeros(num_classes, 0, dtype=torch.long, device=device),
                torch.zeros(num_classes, 0, dtype=torch.bool, device=device))
    if scores is None:
        scores = _rand_like(labels, generator)
    in_range = (labels >= 0) & (labels < num_classes)
    group = torch.where(in_range, labels, torch.full_like(labels, num_classes))
    by_score = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    order = by_score[torch.argsort(group[by_score], stable=True)]  # by class, then score descending
    g_sorted = group[order]
    n = torch.bincount(group, minlength=num_classes + 1)
    start = n.cumsum(0) - n
    rank = torch.arange(P, device=device) - start[g_sorted]
    take = (rank < K) & (g_sorted < num_classes)
    slot = torch.where(take, g_sorted * K + rank, torch.full_like(rank, num_classes * K))  # dump slot
    index = torch.zeros(num_classes * K + 1, dtype=torch.long, device=device)
    valid = torch.zeros(num_classes * K + 1, dtype=torch.bool, device=device)
    index.scatter_(0, slot, order)
    valid.scatter_(0, slot, take)
    return index[:-1].view(num_classes, K), valid[:-1].view(num_classes, K)


def sample_pixels_per_class(
    labels: torch.Tensor, num_classes: int, max_per_class: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Mask of a uniform random subset of at most ``max_per_class`` pixels of each class.

    labels: [P] long (out-of-range labels never kept) -> [P] bool.
    """
    index, valid = group_pixels_by_class(labels, num_classes, max_per_class, generator=generator)
    keep = torch.zeros(labels.numel() + 1, dtype=torch.bool, device=labels.device)
    dump = torch.full_like(index, labels.numel())
    keep[torch.where(valid, index, dump).reshape(-1)] = True
    return keep[:-1]


def sample_negatives_per_class(
    labels: torch.Tensor,
    num_classes: int,
    num_negatives: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every class c, up to ``num_negatives`` uniform random pixels (without replacement) whose label is a
    valid class other than c (ignore pixels are never negatives).

    labels: [P] long -> (index [C, M] long, valid [C, M] bool), M = min(num_negatives, P). One [C, P] top-k
    over random keys (pixels of class c / ignore get key -1, below every random key).
    """
    labels = labels.reshape(-1).long()
    P = labels.numel()
    M = min(int(num_negatives), P)
    device = labels.device
    if M <= 0:
        return (torch.zeros(num_classes, 0, dtype=torch.long, device=device),
                torch.zeros(num_classes, 0, dtype=torch.bool, device=device))
    in_range = (labels >= 0) & (labels < num_classes)
    classes = torch.arange(num_classes, device=device)
    eligible = in_range[None, :] & (labels[None, :] != classes[:, None])  # [C, P]
    keys = torch.rand((num_classes, P), device=device, generator=generator)
    keys = torch.where(eligible, keys, torch.full_like(keys, -1.0))
    vals, index = keys.topk(M, dim=1)
    return index, vals >= 0


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    negative_valid: Optional[torch.Tensor] = None,
    normalize: bool = True,
) -> torch.Tensor:
    """InfoNCE with one positive per anchor: ``-log exp(a.p/t) / (exp(a.p/t) + sum_n exp(a.n/t))``.

    Args:
        anchors: [..., A, D]; positives: [..., A, D] or [..., 1, D] (e.g. one prototype per group);
        negatives: [..., M, D]; negative_valid: [..., M] bool (invalid negatives are left out).
        normalize: L2-normalise every vector first (cosine similarities).
    Returns:
        [..., A] fp32 per-anchor loss (0 when there are no valid negatives). Computed in fp32.
    """
    a, p, n = upcast(anchors), upcast(positives), upcast(negatives)
    if normalize:
        a, p, n = F.normalize(a, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)
    pos = (a * p).sum(-1, keepdim=True) / temperature  # [..., A, 1]
    neg = torch.matmul(a, n.transpose(-1, -2)) / temperature  # [..., A, M]
    if negative_valid is not None:
        neg = neg.masked_fill(~negative_valid.unsqueeze(-2), float("-inf"))
    logits = torch.cat([pos, neg], dim=-1)
    return torch.logsumexp(logits, dim=-1) - pos.squeeze(-1)
