"""Class-wise FIFO memory bank (Alonso et al. ICCV 2021; DGCL CVPR 2023) and per-group top-k selection.

The bank is a set of preallocated ``[C, N, ...]`` ring buffers with one write pointer and one count per
class. Writing is batched over classes (sort by label, rank inside the class, scatter) with no host sync.
"""
from typing import Dict, Mapping, Optional

import torch
from torch import nn


class ClassMemoryBank(nn.Module):
    """Per-class ring buffers of N entries, with any number of aligned per-entry fields.

    Args:
        num_classes: C.
        size: N, entries kept per class.
        fields: name -> per-entry width; 0 means a scalar per entry (stored as [C, N]), D > 0 as [C, N, D].
            Default ``{"feat": 256}``. E.g. DGCL: ``{"feat": 256, "proj": 256, "density": 0}``.
        dtype: storage dtype of every field (default: torch's default dtype, fp32; bf16 halves memory).

    Layout and semantics (all buffers are registered, so they are part of the state_dict / checkpoint):
        ``bank_<name>``: [C, N(, D)]; ``ptr``: [C] long, next slot to write; ``count``: [C] long, valid entries.
        Class c writes its entries, in arrival order, to slots ptr[c], ptr[c]+1, ... (mod N): the oldest
        entries are overwritten first. Until a class has been filled once, its valid entries are exactly
        slots [0, count[c]), so ``valid_mask()`` is ``arange(N) < count[:, None]`` in both the raw layout
        and the :meth:`newest_first` order.
    """

    def __init__(self, num_classes: int, size: int, fields: Optional[Mapping[str, int]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if num_classes < 1 or size < 1:
            raise ValueError(f"ClassMemoryBank: num_classes and size must be >= 1; got {num_classes}, {size}")
        fields = dict(fields) if fields is not None else {"feat": 256}
        if not fields:
            raise ValueError("ClassMemoryBank: fields must name at least one field")
        for name, width in fields.items():
            if not name.isidentifier() or int(width) < 0:
                raise ValueError(f"ClassMemoryBank: bad field {name!r}: {width} (identifier name, width >= 0)")
        self.num_classes = int(num_classes)
        self.size = int(size)
        self.fields: Dict[str, int] = {k: int(v) for k, v in fields.items()}
        for name, width in self.fields.items():
            shape = (num_classes, size) + ((width,) if width > 0 else ())
            self.register_buffer(f"bank_{name}", torch.zeros(shape, dtype=dtype or torch.get_default_dtype()))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, fields={self.fields}"

    # ------------------------------------------------------------------ reading
    def get(self, field: str = "feat") -> torch.Tensor:
        """The raw buffer of ``field``: [C, N, D] (or [C, N] for scalar fields). Valid where valid_mask()."""
        if field not in self.fields:
            raise KeyError(f"ClassMemoryBank: unknown field '{field}'; known: {list(self.fields)}")
        return getattr(self, f"bank_{field}")

    @property
    def counts(self) -> torch.Tensor:
        """[C] long: valid entries per class (<= N)."""
        return self.count

    def valid_mask(self) -> torch.Tensor:
        """[C, N] bool: True where a slot holds data (same mask for the raw and the newest-first order)."""
        return torch.arange(self.size, device=self.count.device) < self.count[:, None]

    def newest_first_index(self) -> torch.Tensor:
        """[C, N] long: slot indices ordered newest to oldest per class (the first count[c] are valid)."""
        steps = torch.arange(1, self.size + 1, device=self.ptr.device)
        return (self.ptr[:, None] - steps) % self.size

    def newest_first(self, field: str = "feat") -> torch.Tensor:
        """[C, N(, D)] copy of ``field`` with entry 0 the newest of each class (DGCL's "cat new in front")."""
        buf = self.get(field)
        idx = self.newest_first_index()
        if buf.dim() == 3:
            idx = idx[:, :, None].expand(-1, -1, buf.shape[2])
        return buf.gather(1, idx)

    # ------------------------------------------------------------------ writing
    def reset(self) -> None:
        """Empty every class (buffers zeroed, pointers and counts to 0)."""
        for name in self.fields:
            self.get(name).zero_()
        self.ptr.zero_()
        self.count.zero_()

    @torch.no_grad()
    def enqueue(self, values: Mapping[str, torch.Tensor], labels: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> None:
        """Append K entries; every field must be given, aligned on the first dim.

        Args:
            values: name -> [K, D] (or [K] for scalar fields), any float dtype (cast to the storage dtype).
            labels: [K] long in [0, C) (out-of-range labels of VALID entries raise an index error).
            valid: optional [K] bool: entries marked False are not written (their labels may be anything).
                A fixed-size batch with a mask needs no host sync, unlike filtering it first (``x[mask]``).
        Entries of one class are written in the order given (later = newer). If more than N entries of a
        class arrive in one call, only its newest N are kept — the same result as N-at-a-time calls.
        Same data on every rank => same bank on every rank (see ``gather_for_enqueue``).
        """
        if set(values) != set(self.fields):
            raise KeyError(f"ClassMemoryBank.enqueue: got fields {sorted(values)}, expected {sorted(self.fields)}")
        labels = labels.reshape(-1).to(device=self.ptr.device, dtype=torch.long)
        K = labels.numel()
        for name, v in values.items():
            want = (K,) + ((self.fields[name],) if self.fields[name] > 0 else ())
            if tuple(v.shape) != want:
                raise ValueError(f"ClassMemoryBank.enqueue: field '{name}' has shape {tuple(v.shape)}, "
                                 f"expected {want}")
        if valid is not None and tuple(valid.shape) != (K,):
            raise ValueError(f"ClassMemoryBank.enqueue: valid has shape {tuple(valid.shape)}, expected ({K},)")
        if K == 0:
            return
        C, N = self.num_classes, self.size
        if valid is not None:
            valid = valid.to(device=labels.device, dtype=torch.bool)
            labels = torch.where(valid, labels, torch.full_like(labels, C))  # group C: never written
        n_all = torch.bincount(labels, minlength=C + (valid is not None))  # [C(+1)] entries per class
        n = n_all[:C]
        order = torch.argsort(labels, stable=True)  # grouped by class, arrival order inside a class
        cls = labels[order]
        start = n_all.cumsum(0) - n_all
        rank = torch.arange(K, device=labels.device) - start[cls]  # 0..n_c-1, oldest first
        n_c = n_all[cls]
        # Entries rank r and r + N of a class share a slot and the newer must win. Rather than filtering
        # (a host sync), every entry writes the value of the newest entry of its slot:
        # winner = r + N * floor((n_c - 1 - r) / N). Duplicate indices then carry identical values.
        winner = rank + N * torch.div(n_c - 1 - rank, N, rounding_mode="floor")
        src = order[start[cls] + winner]
        ptr = self.ptr if valid is None else torch.cat([self.ptr, self.ptr.new_zeros(1)])
        flat = cls * N + (ptr[cls] + winner) % N
        if valid is not None:
            # Masked-out entries rewrite slot 0 with the value it ends up with anyway: the source of a valid
            # entry writing slot 0 if there is one, else the slot's current content (index -1 below).
            written = cls < C
            flat = torch.where(written, flat, torch.zeros_like(flat))
            src0 = torch.where(written & (flat == 0), src, torch.full_like(src, -1)).amax()
            src = torch.where(written, src, src0.expand_as(src))
        for name, v in values.items():
            buf = self.get(name)
            rows = buf.view(C * N, -1)
            v = v.to(device=buf.device, dtype=buf.dtype).reshape(K, -1)
            if valid is not None:
                v = torch.cat([v, rows[:1]])  # row K (= index -1): slot 0's current content
            rows.index_copy_(0, flat, v[src])
        self.ptr.copy_((self.ptr + n) % N)
        self.count.copy_(torch.clamp(self.count + n, max=N))


def topk_per_class_per_image(
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_idx: torch.Tensor,
    k: int,
    num_classes: int,
    num_images: int,
) -> torch.Tensor:
    """Keep the k HIGHEST-scoring candidates of every (image, class) group.

    Alonso et al. keep, per image and class, the features with the best quality score before they
    enter the bank. (The reference code's sort keeps the lowest; we keep the highest, as the paper says.)

    Args:
        scores: [P] float; labels: [P] long; image_idx: [P] long.
        k: candidates kept per group (groups with fewer keep all).
        num_classes, num_images: group ranges; labels outside [0, num_classes) or images outside
            [0, num_images) (e.g. ignore = 255) are never kept.
    Returns:
        [P] bool mask. Ties are broken by position (earlier first). Batched: two stable sorts and a
        cumulative count, no host sync.
    """
    P = scores.numel()
    if P == 0 or k <= 0:
        return torch.zeros(P, dtype=torch.bool, device=scores.device)
    labels = labels.reshape(-1).long()
    image_idx = image_idx.reshape(-1).long()
    G = num_classes * num_images
    valid = (labels >= 0) & (labels < num_classes) & (image_idx >= 0) & (image_idx < num_images)
    group = torch.where(valid, image_idx * num_classes + labels, torch.full_like(labels, G))
    by_score = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    order = by_score[torch.argsort(group[by_score], stable=True)]  # by group, then score descending
    g_sorted = group[order]
    n = torch.bincount(group, minlength=G + 1)
    start = n.cumsum(0) - n
    rank = torch.arange(P, device=scores.device) - start[g_sorted]
    keep = torch.zeros(P, dtype=torch.bool, device=scores.device)
    keep[order] = rank < k
    return keep & valid


def class_row_blocks(labels: torch.Tensor, num_classes: int, block: int):
    """Rows grouped by class and cut into fixed-size blocks, each block holding rows of one class only.

    For per-class weights applied to rows (one small matmul per class) without a per-class loop or a host sync:
    ``x[rows]`` is ``[G, B, D]`` and block g uses class ``block_class[g]``'s weights in one ``bmm``. Costs
    ``(R + C * B) * D * H`` instead of the ``R * C * D * H`` of applying every class's weights to every row.

    Args:
        labels: [R] long in [0, C) (the caller clamps or masks other values).
        num_classes: C.
        block: B, rows per block (clipped to [1, R]).
    Returns:
        rows: [G, B] long into [0, R) (padding entries point at row 0); ok: [G, B] bool (False at padding);
        block_class: [G] long; slot: [R] long, the position of row r in ``rows.view(-1)`` (so a per-block result
        ``y [G, B, ...]`` is brought back to row order by ``y.flatten(0, 1)[slot]``). G = ceil(R / B) + C (0 for
        R = 0), a static bound on the non-empty blocks; class c's rows fill its blocks in their original order.
    """
    labels = labels.reshape(-1).long()
    R = labels.numel()
    device = labels.device
    B = max(1, min(int(block), R))
    G = -(-R // B) + num_classes if R else 0
    n = torch.bincount(labels, minlength=num_classes)[:num_classes]
    blocks_per_class = torch.div(n + B - 1, B, rounding_mode="floor")
    first_block = blocks_per_class.cumsum(0) - blocks_per_class
    order = torch.argsort(labels, stable=True)
    cls = labels[order]
    start = n.cumsum(0) - n
    rank = torch.arange(R, device=device) - start[cls]
    slot_sorted = (first_block[cls] + torch.div(rank, B, rounding_mode="floor")) * B + rank % B
    rows = torch.zeros(G * B, dtype=torch.long, device=device)
    ok = torch.zeros(G * B, dtype=torch.bool, device=device)
    rows[slot_sorted] = order
    ok[slot_sorted] = True
    block_class = torch.zeros(G, dtype=torch.long, device=device)
    block_class[torch.div(slot_sorted, B, rounding_mode="floor")] = cls
    slot = torch.empty(R, dtype=torch.long, device=device)
    slot[order] = slot_sorted
    return rows.view(G, B), ok.view(G, B), block_class, slot
