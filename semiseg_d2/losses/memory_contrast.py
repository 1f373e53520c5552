"""Pixel-level contrastive learning from a class-wise memory bank (Alonso et al., ICCV 2021) and direct entropy
minimisation: the ``memory_contrast`` and ``entropy`` terms. Paper -> code map: docs/methods/memory_contrast.md.

``memory_contrast`` (paper Sec. 3.4, Eqs. 8-11):
  student features V (head "features") -> projection Z = g(V) -> prediction P = q(Z); per class c, an attention
  selector S_c weights every prediction p_c and a second one every memory entry z'_c (L1-normalised, Eq. 8);
  loss = 1/C sum_c 1/(N_p N_z) sum_p sum_z w_p w_z (1 - cos(p, z')) on labeled (ground truth) and unlabeled
  (teacher pseudo-label) pixels. The memory holds teacher projections g_xi(f_xi(x_l)) of labeled pixels that the
  teacher classifies correctly with confidence > phi, the top-K per image and class by the teacher's memory
  selector S_{c,xi}. The term keeps its own EMA copies of the projection head and memory selectors (g_xi, S_xi).
``entropy`` (Eq. 7): mean entropy of the student's softmax on the strong (mixed) unlabeled views.
"""
import copy
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..layers.distributed import gather_for_enqueue, sum_over_ranks
from ..layers.ema import ema_momentum, ema_update_
from ..layers.memory_bank import ClassMemoryBank, class_row_blocks, topk_per_class_per_image
from ..utils.dtype import upcast
from .contrastive import ProjectionHead, flatten_pixels, resize_labels
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

__all__ = [
    "ClassBatchNorm",
    "ClassAttentionSelectors",
    "memory_contrast_loss",
    "quality_filter",
    "head_feature_dim",
    "MemoryContrastTerm",
    "EntropyTerm",
]


# ---------------------------------------------------------------------------------------------- selectors
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


# ---------------------------------------------------------------------------------------------- the loss
def memory_contrast_loss(
    pred: torch.Tensor,
    labels: torch.Tensor,
    pred_scores: torch.Tensor,
    memory: torch.Tensor,
    memory_valid: torch.Tensor,
    memory_scores: torch.Tensor,
    pixel_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 8-11 of Alonso et al.: selector-weighted (1 - cosine) between predictions and same-class memory.

    Args:
        pred: [N, D] student predictions P = q(g(V)); labels: [N] long (outside [0, C) = not used).
        pred_scores: [N] S_{c,theta}(p) in (0, 1]; memory: [C, M, D] bank entries z'; memory_valid: [C, M] bool;
        memory_scores: [C, M] S'_{c,theta}(z'); pixel_mask: [N] bool, optional extra row selection.
    Returns:
        (loss, per_class [C]): loss = 1/C sum_c per_class[c] with
        per_class[c] = 1/(N_p N_z) sum_p sum_z w_p w_z (1 - cos(p, z')) and w = N S / sum S (Eq. 8).
        Because sum_z w_z = N_z, the double sum equals sum_p S_p (1 - p^ . m_c) / sum_p S_p with the weighted
        memory mean m_c = sum_z S_z z'^ / sum_z S_z: O((N + C M) D) instead of O(N M D), same value and gradient.
        A class without predictions or without memory contributes 0 (no NaN). Computed in fp32.
    """
    C = memory.shape[0]
    labels = labels.reshape(-1).long()
    in_range = (labels >= 0) & (labels < C)
    if pixel_mask is not None:
        in_range = in_range & pixel_mask.reshape(-1)
    lab = labels.clamp(0, C - 1)
    s_z = upcast(memory_scores) * memory_valid.float()  # [C, M]
    z_hat = F.normalize(upcast(memory), dim=-1)
    s_z_sum = s_z.sum(1)  # [C]
    m = (s_z[:, :, None] * z_hat).sum(1) / s_z_sum.clamp_min(1e-12)[:, None]  # [C, D]
    # p^ . m_c as (p . m_c) / max(|p|, eps) (F.normalize's eps): one [N, C] matmul instead of normalised and
    # gathered [N, D] copies of p and m (and their backward)
    pred = upcast(pred)
    cos = (pred @ m.t()).gather(1, lab[:, None]).squeeze(1) / torch.linalg.vector_norm(pred, dim=-1).clamp_min(1e-12)
    dist = 1.0 - cos  # [N]: sum_z w_z (1 - cos) / N_z
    s_p = upcast(pred_scores) * in_range.float()
    num = dist.new_zeros(C).index_add_(0, lab, s_p * dist)
    den = dist.new_zeros(C).index_add_(0, lab, s_p)
    has = (den > 0) & memory_valid.any(1)
    per_class = torch.where(has, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return per_class.sum() / C, per_class


def quality_filter(
    logits: torch.Tensor, targets: torch.Tensor, threshold: float, num_classes: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Feature Quality Filter (paper Sec. 3.4): labeled pixels the teacher gets right with confidence > phi.

    logits: [B, C, h, w] teacher logits at the feature resolution; targets: [B, h, w] long (ignore outside [0, C)).
    Returns (keep bool[B, h, w], confidence [B, h, w]).
    """
    probs = upcast(logits).softmax(1)
    confidence, pred = probs.max(1)
    keep = (pred == targets) & (confidence > threshold) & (targets >= 0) & (targets < num_classes)
    return keep, confidence


def head_feature_dim(cfg) -> int:
    """D of the head's "features" implied by the config: res5 channels for DeepLabV2 (2048 for R50/R101),
    CONVS_DIM for DeepLabV3+ and DPT (docs/architecture.md). 0 when the head is unknown."""
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.NAME == "DeepLabV2Head":
        return cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
    if head.NAME in ("DeepLabV3PlusFeatHead", "U2PLDeepLabV3PlusHead", "DPTHead"):
        return head.CONVS_DIM
    return 0


def _count_labeled(names: Sequence[str]) -> int:
    from detectron2.data import DatasetCatalog

    try:
        return sum(len(DatasetCatalog.get(n)) for n in names)
    except (KeyError, FileNotFoundError) as e:
        raise ValueError(
            f"SEMI.MEMORY_CONTRAST: counting the labeled images of {list(names)} for K = max(1, BANK_SIZE / |X_l|) "
            f"failed ({e}); set SEMI.MEMORY_CONTRAST.NUM_LABELED or PER_CLASS_PER_IMAGE"
        ) from e


def _momentum_iteration(iteration: int, burn_in: int, max_iter: int) -> Tuple[int, int]:
    return iteration - burn_in, max(max_iter - burn_in, 1)  # the EMAHook's clock (engine/hooks.py)


# ---------------------------------------------------------------------------------------------- terms
@SEMI_LOSS_REGISTRY.register_term
class MemoryContrastTerm(SemiLossTerm):
    """``memory_contrast``: Alonso et al.'s class-wise memory-bank contrastive loss (see module docstring).

    Returns ``loss_memory_contrast_labeled`` and ``loss_memory_contrast_unlabeled`` (each already x WEIGHT, as the
    paper applies L_contr to labeled and unlabeled features). Reads ``step.teacher_labeled`` (teacher head outputs
    on the labeled images: "features", "logits") in :meth:`update` and, when BANK_DATASETS is set,
    ``step.labeled_datasets`` (dataset name of every labeled image).
    """

    name = "memory_contrast"
    needs_teacher_labeled = True  # engine: run the teacher on the labeled images -> SemiStep.teacher_labeled

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        weight: float = 0.1,
        start_iter: int = 0,
        bank_start_iter: int = 0,
        projection_dim: int = 256,
        hidden_dim: int = 256,
        selector_hidden_dim: int = 256,
        bank_size: int = 256,
        confidence_threshold: float = 0.95,
        per_class_per_image: int = 1,
        bank_datasets: Sequence[str] = (),
        ema_base: float = 0.995,
        ema_schedule: str = "cosine",
        burn_in_iters: int = 0,
        feature_dim_source: str = "SEMI.MEMORY_CONTRAST.FEATURE_DIM",
        norm: str = "BN",
    ):
        super().__init__()
        if bank_size <= 0:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.BANK_SIZE must be > 0 (entries per class), got {bank_size}")
        if feature_dim <= 0:
            raise ValueError(f"{feature_dim_source}: feature dimension must be > 0, got {feature_dim}")
        if per_class_per_image <= 0:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE must be > 0, got {per_class_per_image}")
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.feature_dim_source = feature_dim_source
        self.weight = weight
        self.start_iter = start_iter
        self.bank_start_iter = bank_start_iter
        self.confidence_threshold = confidence_threshold
        self.per_class_per_image = int(per_class_per_image)
        self.bank_datasets = tuple(bank_datasets)
        self.ema_base = ema_base
        self.ema_schedule = ema_schedule
        self.burn_in_iters = burn_in_iters
        # norms follow MODEL.SEM_SEG_HEAD.NORM: SyncBN under DDP syncs these statistics too
        self.projection = ProjectionHead(feature_dim, hidden_dim, projection_dim, norm)  # g_theta
        self.prediction = ProjectionHead(projection_dim, hidden_dim, projection_dim, norm)  # q_theta
        sync = norm == "SyncBN"
        self.selector = ClassAttentionSelectors(  # S_c on P
            num_classes, projection_dim, selector_hidden_dim, sync_norm=sync
        )
        self.memory_selector = ClassAttentionSelectors(  # S_c on Z'
            num_classes, projection_dim, selector_hidden_dim, sync_norm=sync
        )
        # Teacher side (g_xi, S_xi): EMA copies, never trained, eval-mode BN like the teacher network.
        self.teacher_projection = copy.deepcopy(self.projection).requires_grad_(False).eval()
        self.teacher_memory_selector = copy.deepcopy(self.memory_selector).requires_grad_(False).eval()
        self.bank = ClassMemoryBank(num_classes, bank_size, {"feat": projection_dim})

    @classmethod
    def from_config(cls, cfg):
        c = cfg.SEMI.MEMORY_CONTRAST
        implied = head_feature_dim(cfg)
        feature_dim, source = c.FEATURE_DIM, "SEMI.MEMORY_CONTRAST.FEATURE_DIM"
        if feature_dim <= 0:
            feature_dim, source = implied, f"the feature dim implied by MODEL.SEM_SEG_HEAD.NAME '{cfg.MODEL.SEM_SEG_HEAD.NAME}'"
        elif implied > 0 and feature_dim != implied:
            raise ValueError(
                f"SEMI.MEMORY_CONTRAST.FEATURE_DIM = {feature_dim} but the head MODEL.SEM_SEG_HEAD.NAME "
                f"'{cfg.MODEL.SEM_SEG_HEAD.NAME}' outputs {implied}-d 'features'"
            )
        if c.BANK_SIZE <= 0:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.BANK_SIZE must be > 0 (entries per class), got {c.BANK_SIZE}")
        labeled = list(cfg.DATASETS.TRAIN_LABELED) or list(cfg.DATASETS.TRAIN)
        unknown = [n for n in c.BANK_DATASETS if n not in labeled]
        if unknown:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.BANK_DATASETS {unknown} are not in DATASETS.TRAIN_LABELED {labeled}")
        k = c.PER_CLASS_PER_IMAGE
        if k <= 0:  # paper: max(1, psi / |X_l|) vectors per image and class (rounded, as the reference)
            n_l = c.NUM_LABELED if c.NUM_LABELED > 0 else _count_labeled(list(c.BANK_DATASETS) or labeled)
            k = max(1, int(round(c.BANK_SIZE / max(n_l, 1))))
        return dict(
            cls.shared_kwargs(cfg, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, feature_dim, source, k),
            bank_datasets=list(c.BANK_DATASETS),
        )

    @staticmethod
    def shared_kwargs(cfg, num_classes: int, feature_dim: int, feature_dim_source: str, per_class_per_image: int):
        """The ``SEMI.MEMORY_CONTRAST`` / EMA arguments every task's memory-contrast term takes (the RoI variant
        of projects/SemiInstance too); the task supplies its class count, feature size and bank quota."""
        c = cfg.SEMI.MEMORY_CONTRAST
        return dict(
            num_classes=num_classes,
            feature_dim=feature_dim,
            feature_dim_source=feature_dim_source,
            weight=c.WEIGHT,
            start_iter=c.START_ITER,
            bank_start_iter=c.BANK_START_ITER,
            projection_dim=c.PROJECTION_DIM,
            hidden_dim=c.HIDDEN_DIM,
            selector_hidden_dim=c.SELECTOR_HIDDEN_DIM,
            bank_size=c.BANK_SIZE,
            confidence_threshold=c.CONFIDENCE_THRESHOLD,
            per_class_per_image=per_class_per_image,
            ema_base=cfg.SEMI.EMA.MOMENTUM,
            ema_schedule=cfg.SEMI.EMA.SCHEDULE,
            burn_in_iters=cfg.SEMI.BURN_IN_ITERS,
            norm=cfg.MODEL.SEM_SEG_HEAD.NORM,
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_projection.eval()
        self.teacher_memory_selector.eval()
        return self

    def _check_dim(self, features: torch.Tensor, where: str) -> None:
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"memory_contrast: {self.feature_dim_source} = {self.feature_dim} but the head's 'features' "
                f"({where}) have {features.shape[1]} channels"
            )

    # ------------------------------------------------------------------ loss
    def forward(self, step) -> Dict[str, torch.Tensor]:
        fl = step.student_labeled["features"]
        fu = step.student_strong["features"]
        self._check_dim(fl, "student, labeled")
        zero = upcast(fl.new_zeros(()))
        if step.iteration < self.start_iter:
            return {"loss_memory_contrast_labeled": zero, "loss_memory_contrast_unlabeled": zero}
        size = fl.shape[-2:]
        y_l = resize_labels(step.labeled_targets, size).reshape(-1)
        # Unlabeled pixels carry the teacher's pseudo-labels, mixed like the strong views (ignore on padding).
        y_u = resize_labels(step.teacher_strong["pseudo_label"], size).reshape(-1)
        feats = torch.cat([flatten_pixels(fl), flatten_pixels(fu)])
        labels = torch.cat([y_l, y_u])
        keep = (labels >= 0) & (labels < self.num_classes)
        idx = keep.nonzero().squeeze(1)  # one host sync: the projection BN sees only labelled pixels
        if idx.numel() < 2:
            return {"loss_memory_contrast_labeled": zero, "loss_memory_contrast_unlabeled": zero}
        labels = labels[idx]
        is_labeled = idx < y_l.numel()
        return self.contrast_losses(step, feats[idx], labels, is_labeled, "memory_contrast")

    def contrast_losses(self, step, features: torch.Tensor, labels: torch.Tensor, is_labeled: torch.Tensor,
                        name: str) -> Dict[str, torch.Tensor]:
        """Eqs. 8-11 for rows ``features [R, D]`` of classes ``labels [R]`` (pixels here, RoIs in
        projects/SemiInstance) against the bank: ``loss_<name>_labeled`` / ``loss_<name>_unlabeled`` (weighted)
        split by ``is_labeled [R]``; logs ``<name>/bank_fill``."""
        pred = self.prediction(self.projection(features))
        # The selectors learn to weight features; they do not shape them (input detached, as the reference).
        s_p = self.selector.score_pixels(pred.detach(), labels)
        memory, valid = self.bank.get("feat"), self.bank.valid_mask()
        s_z = self.memory_selector.score_per_class(memory, valid)
        loss_l, _ = memory_contrast_loss(pred, labels, s_p, memory, valid, s_z, pixel_mask=is_labeled)
        loss_u, _ = memory_contrast_loss(pred, labels, s_p, memory, valid, s_z, pixel_mask=~is_labeled)
        step.log(f"{name}/bank_fill", self.bank.counts.float().mean() / self.bank.size)
        return {f"loss_{name}_labeled": loss_l * self.weight, f"loss_{name}_unlabeled": loss_u * self.weight}

    # ------------------------------------------------------------------ bank + teacher heads
    def _source_mask(self, step, batch: int, device) -> Optional[torch.Tensor]:
        if not self.bank_datasets:
            return None
        names = getattr(step, "labeled_datasets", None)
        if names is None or len(names) != batch:
            raise RuntimeError(
                "memory_contrast: SEMI.MEMORY_CONTRAST.BANK_DATASETS is set, so every labeled image's dataset name "
                f"is needed, but SemiStep.labeled_datasets is {names!r} for {batch} labeled images"
            )
        allowed = set(self.bank_datasets)
        return torch.tensor([n in allowed for n in names], dtype=torch.bool).to(device, non_blocking=True)

    @torch.no_grad()
    def candidates(self, step) -> Tuple[torch.Tensor, torch.Tensor]:
        """Bank candidates of this rank: teacher projections of filtered labeled pixels, top-K per image and class
        by the teacher's memory selector. Returns (values [K, projection_dim], labels long[K])."""
        t = getattr(step, "teacher_labeled", None)
        if not t:
            raise RuntimeError(
                "memory_contrast needs SemiStep.teacher_labeled (teacher head outputs on the labeled images: "
                "'features', 'logits'); the engine provides it for terms with needs_teacher_labeled = True"
            )
        feats, logits = t["features"], t["logits"]
        self._check_dim(feats, "teacher, labeled")
        B, _, h, w = feats.shape
        if logits.shape[-2:] != feats.shape[-2:]:
            logits = F.interpolate(upcast(logits), size=(h, w), mode="bilinear", align_corners=False)
        targets = resize_labels(step.labeled_targets, (h, w))
        keep, _ = quality_filter(logits, targets, self.confidence_threshold, self.num_classes)
        source = self._source_mask(step, B, keep.device)
        if source is not None:
            keep = keep & source[:, None, None]  # SSDA: only the target domain fills the bank (paper Sec. 4.3.2)
        idx = keep.reshape(-1).nonzero().squeeze(1)
        labels = targets.reshape(-1)[idx]
        image = torch.div(idx, h * w, rounding_mode="floor")
        z = self.teacher_projection(upcast(flatten_pixels(feats)[idx]))
        scores = self.teacher_memory_selector.score_pixels(z, labels)
        top = topk_per_class_per_image(scores, labels, image, self.per_class_per_image, self.num_classes, B)
        return z[top], labels[top]

    @torch.no_grad()
    def update(self, step) -> None:
        if step.iteration >= self.bank_start_iter:
            values, labels = self.candidates(step)
            values, labels = gather_for_enqueue({"feat": values}, labels)  # same bank on every rank
            self.bank.enqueue(values, labels)
        t, T = _momentum_iteration(step.iteration, self.burn_in_iters, step.max_iter)
        m = ema_momentum(self.ema_schedule, self.ema_base, t, T)
        ema_update_(self.teacher_projection, self.projection, m)
        ema_update_(self.teacher_memory_selector, self.memory_selector, m)


@SEMI_LOSS_REGISTRY.register_term
class EntropyTerm(SemiLossTerm):
    """``entropy``: direct entropy minimisation (Eq. 7) of the student's softmax on the strong (mixed) unlabeled
    views, averaged over valid pixels at crop resolution; ``NORMALIZE`` divides by log C (reference code)."""

    name = "entropy"

    @configurable
    def __init__(self, *, weight: float = 0.01, start_iter: int = 0, normalize: bool = False):
        super().__init__()
        self.weight = weight
        self.start_iter = start_iter
        self.normalize = normalize

    @classmethod
    def from_config(cls, cfg):
        c = cfg.SEMI.ENTROPY
        return dict(weight=c.WEIGHT, start_iter=c.START_ITER, normalize=c.NORMALIZE)

    def forward(self, step) -> Dict[str, torch.Tensor]:
        logits = step.student_strong["logits"]
        valid = step.teacher_strong["valid"]
        if logits.shape[-2:] != valid.shape[-2:]:
            logits = F.interpolate(logits, size=valid.shape[-2:], mode="bilinear", align_corners=False)
        logp = F.log_softmax(upcast(logits), dim=1)
        ent = -(logp.exp() * logp).sum(1)
        loss = (ent * valid.float()).sum() / valid.sum().clamp_min(1).float()
        if self.normalize:
            loss = loss / math.log(logits.shape[1])
        scale = self.weight if step.iteration >= self.start_iter else 0.0
        return {"loss_entropy": loss * scale}
