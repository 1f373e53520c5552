"""Explicit collectives used by stateful loss terms (never called implicitly by the pure layers), and the one
unwrapping of a data-parallel model."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel (whose parameter names carry a "module." prefix
    that an unwrapped copy, e.g. the EMA teacher, does not have), or the model itself."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _world_size(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks, differentiable (``torch.distributed.nn``: the gradient of every rank's sum
    flows back to each rank's input, as in SyncBatchNorm); ``x`` itself when no process group runs."""
    if _world_size(group) <= 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, group=group) if group is not None else all_reduce(x)


def all_gather_variable(tensors: List[torch.Tensor], group=None) -> List[torch.Tensor]:
    """All-gather tensors whose first dim differs across ranks; rank-major concatenation.

    Args:
        tensors: list of [K, ...] tensors sharing K on this rank (K may differ between ranks; trailing dims
            and dtypes must match across ranks). They must live on a device the backend supports (CPU for
            gloo, CUDA for NCCL).
    Returns:
        list of [sum_r K_r, ...] — identical on every rank. Not distributed / world 1: the inputs.
    One size exchange (a host sync for the max), then one all_gather per tensor on padded copies.
    """
    world = _world_size(group)
    if world == 1 or not tensors:
        return list(tensors)
    K = tensors[0].shape[0]
    if any(t.shape[0] != K for t in tensors):
        raise ValueError("all_gather_variable: tensors must share their first dim on each rank")
    device = tensors[0].device
    size = torch.tensor([K], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in torch.cat(sizes).tolist()]
    k_max = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((k_max,) + tuple(t.shape[1:]))
        padded[:K] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return out


def gather_for_enqueue(
    values: Dict[str, torch.Tensor], labels: torch.Tensor, group=None
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """All-gather a bank update so that every rank enqueues the same entries (and holds the same bank).

    Args:
        values: name -> [K, ...]; labels: [K] long. K may differ across ranks.
    Returns:
        (values, labels) with [sum_r K_r, ...], ordered by rank. No-op when not distributed.
    """
    names = list(values)
    gathered = all_gather_variable([values[n] for n in names] + [labels], group=group)
    return dict(zip(names, gathered[:-1])), gathered[-1]


def mean_over_ranks(tensors: List[torch.Tensor], group=None) -> List[torch.Tensor]:
    """Means over the ranks of ``tensors`` (one dtype and device), in one flattened all_reduce; not differentiable.

    Returns views of one flat buffer, shaped like the inputs; the inputs themselves when not distributed.
    """
    world = _world_size(group)
    if world == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= world
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@torch.no_grad()
def average_float_buffers_(module: torch.nn.Module, group=None) -> None:
    """In place: every floating-point buffer of ``module`` (BN running mean/var) becomes its mean over ranks.

    One flattened all_reduce per dtype. The EMA teacher uses it under DDP with plain BN, where each rank's
    student has its own running statistics: without it every rank's teacher would normalise (and pseudo-label)
    differently. With SyncBN the buffers already agree and this changes nothing. Not distributed: no-op.
    """
    if _world_size(group) == 1:
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for b in module.buffers():
        if b.is_floating_point():
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        torch._foreach_copy_(bufs, mean_over_ranks(bufs, group))
