"""kNN feature density (DGCL, CVPR 2023): how crowded a feature's neighbourhood in a memory bank is.

density(q) = mean over k in ks of [ mean of the k largest cosine similarities between q and the keys ]

Features are L2-normalised, the similarity is their dot product (the official code's ``norm=True,
mode='dot'``), and everything is computed in fp32 with autocast disabled, whatever the input dtype.
One ``topk`` with ``max(ks)`` serves every k through a cumulative sum.
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from ..utils.dtype import upcast

# Default bound on the number of similarity entries materialised at once (64 MiB in fp32).
DEFAULT_MAX_ELEMENTS = 2 ** 24
# On a CPU, similarity chunks are also capped at this many entries (4 MiB in fp32: cache-sized), see _chunk_elements.
CPU_CHUNK_ELEMENTS = 2 ** 20
_CPU_PARTIAL_SORT_FACTOR = 64  # aten/src/ATen/native/TopKImpl.h: partial sort when k * 64 <= n


def _check_ks(ks: Sequence[int]):
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"knn density: ks must be a non-empty list of positive ints; got {ks}")
    return ks


def _mean_of_topk(sorted_vals: torch.Tensor, num_valid: torch.Tensor, ks) -> torch.Tensor:
    """sorted_vals: [..., K] descending, entries at positions >= num_valid are ignored (any value);
    num_valid: long broadcastable to [...]. Returns [...]: mean over ks of the mean of the first
    min(k, num_valid) values; 0 where num_valid == 0."""
    K = sorted_vals.shape[-1]
    pos = torch.arange(K, device=sorted_vals.device)
    valid = pos < num_valid.unsqueeze(-1)
    csum = torch.where(valid, sorted_vals, torch.zeros_like(sorted_vals)).cumsum(-1)
    out = torch.zeros(sorted_vals.shape[:-1], dtype=sorted_vals.dtype, device=sorted_vals.device)
    if K == 0:
        return out
    for k in ks:  # len(ks) is a small static number: no data-dependent work in this loop
        kk = torch.clamp(torch.minimum(num_valid, torch.full_like(num_valid, k)), min=1)
        kk = kk.expand(out.shape)
        out = out + csum.gather(-1, (kk - 1).unsqueeze(-1)).squeeze(-1) / kk.to(csum.dtype)
    out = out / len(ks)
    return torch.where(num_valid.expand(out.shape) > 0, out, torch.zeros_like(out))


def knn_density(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ks: Sequence[int] = (8, 16, 32),
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Density of each query w.r.t. one set of keys.

    Args:
        queries: [Q, D] float (any float dtype; computed in fp32).
        keys: [M, D] float.
        ks: neighbourhood sizes; k > M uses min(k, M) (the mean over all M keys).
        max_elements: queries are processed in chunks of ``max(1, max_elements // M)`` rows so that at most
            ``max(M, max_elements)`` similarities exist at once. Results do not depend on the chunking.
    Returns:
        [Q] fp32. M == 0 gives zeros (no keys: no density; callers mask such classes by the bank count).
    Differentiable w.r.t. queries and keys (wrap in no_grad when not needed).
    """
    ks = _check_ks(ks)
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"knn_density: expected queries [Q, D] and keys [M, D]; got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    Q, M = queries.shape[0], keys.shape[0]
    if M == 0 or Q == 0:
        return queries.new_zeros(Q, dtype=upcast(queries).dtype)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = F.normalize(upcast(queries), dim=1)
        kmat = F.normalize(upcast(keys), dim=1)
        kmax = min(max(ks), M)
        num_valid = torch.tensor(M, device=q.device)
        chunk = max(1, max_elements // M)
        out = []
        for start in range(0, Q, chunk):
            sim = q[start:start + chunk] @ kmat.t()
            top = sim.topk(kmax, dim=1, largest=True, sorted=True).values
            out.append(_mean_of_topk(top, num_valid.expand(top.shape[0]), ks))
        return torch.cat(out)


def knn_density_grouped(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_count: torch.Tensor,
    ks: Sequence[int] = (8, 16, 32),
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Density of class-grouped queries against their own class's bank, batched over classes (no host sync).

    Args:
        queries: [C, P, D] float; row c holds queries of class c (padding rows give meaningless values).
        bank: [C, N, D] float; class c's valid entries are ``bank[c, :bank_count[c]]`` (the layout of
            :class:`ClassMemoryBank`; any order, only the set matters).
        bank_count: [C] long, number of valid entries per class (clipped to N).
        ks, max_elements: as in :func:`knn_density`; chunks run over P with C * P_chunk * N <= max_elements
            (on a CPU also <= CPU_CHUNK_ELEMENTS, see ``_chunk_elements``); results do not depend on the chunks.
    Returns:
        [C, P] fp32. Per class: k > count uses the mean over the ``count`` available entries; count == 0
        gives 0.
    """
    ks = _check_ks(ks)
    if queries.dim() != 3 or bank.dim() != 3 or queries.shape[0] != bank.shape[0] or queries.shape[2] != bank.shape[2]:
        raise ValueError(f"knn_density_grouped: expected queries [C, P, D] and bank [C, N, D]; got "
                         f"{tuple(queries.shape)} and {tuple(bank.shape)}")
    C, P, _ = queries.shape
    N = bank.shape[1]
    if N == 0 or P == 0 or C == 0:
        return queries.new_zeros(C, P, dtype=upcast(queries).dtype)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = F.normalize(upcast(queries), dim=2)
        b = F.normalize(upcast(bank), dim=2)
        return _normalized_grouped_density(q, b, bank_count, ks, max_elements)


def _chunk_elements(device: torch.device, max_elements: int) -> int:
    """Similarities materialised at once: ``max_elements`` (a memory bound) on a GPU; on a CPU also at most
    ``CPU_CHUNK_ELEMENTS``, so that each chunk stays in the cache: a fresh multi-hundred-MB similarity buffer
    costs page faults and full memory passes (bmm write, mask, top-k read) that exceed its arithmetic."""
    if device.type == "cpu":
        return min(int(max_elements), CPU_CHUNK_ELEMENTS)
    return int(max_elements)


def _normalized_grouped_density(
    q: torch.Tensor, b: torch.Tensor, bank_count: torch.Tensor, ks: Sequence[int], max_elements: int
) -> torch.Tensor:
    """knn_density_grouped on L2-normalised fp32 (or float64) inputs: q [G, P, D], b [G, N, D], bank_count [G] -> [G, P]."""
    N = b.shape[1]
    kmax = min(max(ks), N)
    count = bank_count.to(device=q.device, dtype=torch.long).clamp(0, N)  # [G]
    top = _top_similarities(q, _pad_for_cpu_topk(b, kmax), count, kmax, max_elements)
    return _mean_of_topk(top, count[:, None], ks)


def _pad_for_cpu_topk(b: torch.Tensor, kmax: int) -> torch.Tensor:
    N = b.shape[1]
    if b.device.type == "cpu" and 32 * kmax <= N < _CPU_PARTIAL_SORT_FACTOR * kmax:
        # ATen's CPU top-k switches to its faster heap (partial-sort) path only from N >= 64 k on; a few padding
        # entries (invalid, so never counted) get there. Same values: the padding is -inf like any invalid entry.
        b = F.pad(b, (0, 0, 0, _CPU_PARTIAL_SORT_FACTOR * kmax - N))
    return b


def _top_similarities(
    q: torch.Tensor, b: torch.Tensor, count: torch.Tensor, kmax: int, max_elements: int
) -> torch.Tensor:
    """q [G, P, D], b [G, N', D] (row g's first count[g] entries valid) -> [G, P, kmax]: the kmax largest
    similarities of every query, descending (-inf past the valid entries). Only bmm, mask and top-k per chunk;
    the caller reduces them in one pass (per-chunk reductions were a dozen small ops per chunk)."""
    P = q.shape[1]
    bt = b.transpose(1, 2)  # [G, D, N']
    invalid = torch.arange(bt.shape[2], device=q.device) >= count[:, None]  # [G, N']
    # Entries before the smallest count are valid in every row: only the columns from there on need the mask.
    # Reading it is free on a CPU; on a GPU it would be a host sync, so there every column is masked.
    lo = int(count.min()) if q.device.type == "cpu" and q.shape[0] > 0 else 0
    chunk = max(1, _chunk_elements(q.device, max_elements) // (q.shape[0] * bt.shape[2]))
    out = []
    for start in range(0, P, chunk):
        sim = torch.bmm(q[:, start:start + chunk], bt)  # [G, p, N'], a fresh buffer: masked in place
        sim[:, :, lo:].masked_fill_(invalid[:, None, lo:], float("-inf"))
        out.append(sim.topk(kmax, dim=2, largest=True, sorted=True).values)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def knn_density_per_class(
    queries: torch.Tensor,
    query_class: torch.Tensor,
    bank: torch.Tensor,
    bank_count: torch.Tensor,
    ks: Sequence[int] = (8, 16, 32),
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Density of each query against the valid bank entries of its own class.

    Args:
        queries: [Q, D] float; query_class: [Q] long in [0, C).
        bank: [C, N, D] float; bank_count: [C] long (valid entries are ``bank[c, :count[c]]``).
    Returns:
        [Q] fp32, equal to ``knn_density(queries[i], bank[c, :count[c]], ks)`` for c = query_class[i]
        (mean over min(k, count) entries; 0 for an empty class).
    Queries are scattered into a padded [C, P_max, D] batch (one host sync for P_max = the largest
    per-class query count) and handed to :func:`knn_density_grouped`; cost is C * P_max * N * D, so it is
    best when queries are spread over classes (DGCL samples a bounded number per class).
    """
    if queries.dim() != 2 or query_class.shape != queries.shape[:1]:
        raise ValueError(f"knn_density_per_class: expected queries [Q, D] and query_class [Q]; got "
                         f"{tuple(queries.shape)} and {tuple(query_class.shape)}")
    C = bank.shape[0]
    Q = queries.shape[0]
    if Q == 0:
        return queries.new_zeros(0, dtype=upcast(queries).dtype)
    cls = query_class.long()
    n = torch.bincount(cls, minlength=C)
    p_max = int(n.max())  # the one host sync
    order = torch.argsort(cls, stable=True)
    start = n.cumsum(0) - n
    sorted_cls = cls[order]
    rank = torch.arange(Q, device=cls.device) - start[sorted_cls]
    slot = sorted_cls * p_max + rank
    padded = queries.new_zeros(C * p_max, queries.shape[1])
    padded.index_copy_(0, slot, queries[order])
    dens = knn_density_grouped(padded.view(C, p_max, -1), bank, bank_count, ks, max_elements).reshape(-1)
    out = torch.empty(Q, dtype=dens.dtype, device=dens.device)
    out[order] = dens[slot]
    return out


def class_density_blocked(
    feats: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
    bank: torch.Tensor,
    bank_count: torch.Tensor,
    ks: Sequence[int],
    block: int = 512,
    max_elements: int = 1 << 27,
) -> torch.Tensor:
    """kNN density of class-grouped pixels against their class's bank, computing only non-empty blocks.

    ``knn_density_grouped`` on the padded ``[C, K]`` layout costs C * K * N * D even when most classes hold
    far fewer than K pixels. Here each class row is cut into blocks of ``block`` queries and only non-empty
    blocks are computed: on a GPU ``ceil(P / block) + C`` of them (a static bound, so no host sync), on a CPU
    exactly the non-empty ones, each against its own class's bank rows (gathered per chunk of blocks).

    feats: [P, D]; index, valid: [C, K] (valid entries first per row, as ``group_pixels_by_class`` returns);
    bank: [C, N, D]; bank_count: [C]. Returns [C, K] fp32 (0 at invalid entries). Equal to
    ``knn_density_grouped(feats[index], bank, bank_count, ks)`` at valid entries.
    """
    C, K = index.shape
    P = feats.shape[0]
    N = bank.shape[1]
    if K == 0 or N == 0:
        return feats.new_zeros(C, K, dtype=upcast(feats).dtype)
    B = min(int(block), K)
    nb = -(-K // B)
    pad = nb * B - K
    idx = F.pad(index, (0, pad)).view(C * nb, B)
    ok = F.pad(valid, (0, pad)).view(C * nb, B)
    nonempty = ok[:, 0]
    # Reading the number of non-empty blocks is free on a CPU (a host sync on a GPU, which keeps the static bound):
    # the bound computes every block when most classes are full, e.g. 44 where 35 hold pixels.
    G = int(nonempty.sum()) if feats.device.type == "cpu" else min(C * nb, -(-P // B) + C)
    if G == 0:  # no valid pixel at all (CPU)
        return feats.new_zeros(C, K, dtype=upcast(feats).dtype)
    blocks = torch.argsort((~nonempty).to(torch.uint8), stable=True)[:G]  # non-empty blocks first
    block_cls = torch.div(blocks, nb, rounding_mode="floor")
    with torch.autocast(device_type=feats.device.type, enabled=False):
        # Normalised (and padded) once here (row-wise, so the same values as normalising every gathered block).
        q = F.normalize(upcast(feats), dim=1)
        kmax = min(max(ks), N)
        b = _pad_for_cpu_topk(F.normalize(upcast(bank), dim=2), kmax)
        count = bank_count.to(device=q.device, dtype=torch.long).clamp(0, N)
        chunk = max(1, _chunk_elements(feats.device, max_elements) // (B * N))
        top = []
        for start in range(0, G, chunk):
            sel, cls = blocks[start:start + chunk], block_cls[start:start + chunk]
            top.append(_top_similarities(q[idx[sel]], b[cls], count[cls], kmax, max_elements))
        dens = _mean_of_topk(torch.cat(top), count[block_cls][:, None], ks)  # [G, B]
    full = dens.new_zeros(C * nb + 1, B)
    dump = torch.full_like(blocks, C * nb)
    full.index_copy_(0, torch.where(nonempty[blocks], blocks, dump), dens)
    full = full[:-1].view(C, nb * B)[:, :K]
    return torch.where(valid, full, torch.zeros_like(full))
