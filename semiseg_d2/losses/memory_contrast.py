"""Pixel-level contrastive learning from a class-wise memory bank (Alonso et al., ICCV 2021): the ``memory_contrast``
term. Paper -> code map: docs/methods/memory_contrast.md.

``memory_contrast`` (paper Sec. 3.4, Eqs. 8-11):
  student features V (head "features") -> projection Z = g(V) -> prediction P = q(Z); per class c, an attention
  selector S_c weights every prediction p_c and a second one every memory entry z'_c (L1-normalised, Eq. 8);
  loss = 1/C sum_c 1/(N_p N_z) sum_p sum_z w_p w_z (1 - cos(p, z')) on labeled (ground truth) and unlabeled
  (teacher pseudo-label) pixels. The memory holds teacher projections g_xi(f_xi(x_l)) of labeled pixels that the
  teacher classifies correctly with confidence > phi, the top-K per image and class by the teacher's memory
  selector S_{c,xi}. The term holds EMA copies of the projection head and memory selector (g_xi, S_xi), which the
  engine's EMAHook updates with the teacher's momentum (:meth:`MemoryContrastTerm.ema_pairs`).
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import NON_NEGATIVE, AT_LEAST_1, UNIT, ITERATION, declare
from ..layers.class_attention import ClassAttentionSelectors
from ..layers.distributed import gather_for_enqueue
from ..layers.ema import EMAPair
from ..layers.label_ops import resize_labels
from ..layers.memory_bank import ClassMemoryBank, topk_per_class_per_image
from ..utils.dtype import upcast
from .contrastive import ProjectionHead, flatten_pixels
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

__all__ = [
    "memory_contrast_loss",
    "quality_filter",
    "MemoryContrastTerm",
]


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


def _count_labeled(names: Sequence[str]) -> int:
    from detectron2.data import DatasetCatalog

    try:
        return sum(len(DatasetCatalog.get(n)) for n in names)
    except (KeyError, FileNotFoundError) as e:
        raise ValueError(
            f"SEMI.MEMORY_CONTRAST: counting the labeled images of {list(names)} for K = max(1, BANK_SIZE / |X_l|) "
            f"failed ({e}); set SEMI.MEMORY_CONTRAST.NUM_LABELED or PER_CLASS_PER_IMAGE"
        ) from e


def _bank_datasets(cfg) -> List[str]:
    """BANK_DATASETS, checked against the labeled training sets; all of them when empty."""
    c = cfg.SEMI.MEMORY_CONTRAST
    labeled = list(cfg.DATASETS.TRAIN_LABELED) or list(cfg.DATASETS.TRAIN)
    unknown = [n for n in c.BANK_DATASETS if n not in labeled]
    if unknown:
        raise ValueError(f"SEMI.MEMORY_CONTRAST.BANK_DATASETS {unknown} are not in DATASETS.TRAIN_LABELED {labeled}")
    return list(c.BANK_DATASETS) or labeled


# ---------------------------------------------------------------------------------------------- terms
def add_memory_contrast_config(cfg) -> None:
    """Declare ``SEMI.MEMORY_CONTRAST.*``, the keys of the ``memory_contrast`` term (``add_semiseg_config`` calls this)."""
    # memory_contrast term (losses/memory_contrast.py, docs/methods/memory_contrast.md): Alonso et al. ICCV 2021
    cfg.SEMI.MEMORY_CONTRAST = CN()
    # lambda_contr, applied to the labeled and to the unlabeled part each
    declare(cfg, "SEMI.MEMORY_CONTRAST.WEIGHT", 0.1, NON_NEGATIVE)
    declare(cfg, "SEMI.MEMORY_CONTRAST.START_ITER", 2000, ITERATION)  # loss is zero before this iteration (paper: 2K)
    # bank filled from this iteration on (paper: every iteration; code: 1000)
    declare(cfg, "SEMI.MEMORY_CONTRAST.BANK_START_ITER", 0, ITERATION)
    # D of the head's "features" (v2: 2048, v3+: 256); 0 = implied by the head
    declare(cfg, "SEMI.MEMORY_CONTRAST.FEATURE_DIM", 0, NON_NEGATIVE)
    # output of the projection g and prediction q heads (= bank width)
    declare(cfg, "SEMI.MEMORY_CONTRAST.PROJECTION_DIM", 256, AT_LEAST_1)
    declare(cfg, "SEMI.MEMORY_CONTRAST.HIDDEN_DIM", 256, AT_LEAST_1)  # hidden width of g and q (Linear-BN-ReLU-Linear)
    # hidden width of the class attention selectors S_c
    declare(cfg, "SEMI.MEMORY_CONTRAST.SELECTOR_HIDDEN_DIM", 256, AT_LEAST_1)
    declare(cfg, "SEMI.MEMORY_CONTRAST.BANK_SIZE", 256, AT_LEAST_1)  # psi: entries per class (FIFO)
    # phi of the feature quality filter (teacher right and > phi)
    declare(cfg, "SEMI.MEMORY_CONTRAST.CONFIDENCE_THRESHOLD", 0.95, UNIT)
    # K entries per image and class; 0 = max(1, round(BANK_SIZE / |X_l|))
    declare(cfg, "SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE", 0, NON_NEGATIVE)
    # |X_l| for K; 0 = SemiSegTrainer counts the images of BANK_DATASETS (or TRAIN_LABELED) before building the model
    declare(cfg, "SEMI.MEMORY_CONTRAST.NUM_LABELED", 0, NON_NEGATIVE)
    # DATASETS.TRAIN_LABELED entries whose images fill the bank (SSDA: the Cityscapes subset, not GTA5); empty = all
    cfg.SEMI.MEMORY_CONTRAST.BANK_DATASETS = []


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
        per_class_per_image: Optional[int] = 1,
        bank_datasets: Sequence[str] = (),
        feature_dim_source: str = "SEMI.MEMORY_CONTRAST.FEATURE_DIM",
        norm: str = "BN",
    ):
        super().__init__()
        if bank_size <= 0:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.BANK_SIZE must be > 0 (entries per class), got {bank_size}")
        if feature_dim <= 0:
            raise ValueError(f"{feature_dim_source}: feature dimension must be > 0, got {feature_dim}")
        if per_class_per_image is not None and per_class_per_image <= 0:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE must be > 0, got {per_class_per_image}")
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.feature_dim_source = feature_dim_source
        self.weight = weight
        self.start_iter = start_iter
        self.bank_start_iter = bank_start_iter
        self.confidence_threshold = confidence_threshold
        # K bank entries per image and class; None: not known yet (no |X_l|), only filling the bank needs it
        self.per_class_per_image = None if per_class_per_image is None else int(per_class_per_image)
        self.bank_datasets = tuple(bank_datasets)
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
        # Teacher side (g_xi, S_xi): EMA copies (EMAHook, ema_pairs), never trained, eval-mode BN like the teacher.
        self.teacher_projection = copy.deepcopy(self.projection).requires_grad_(False).eval()
        self.teacher_memory_selector = copy.deepcopy(self.memory_selector).requires_grad_(False).eval()
        self.bank = ClassMemoryBank(num_classes, bank_size, {"feat": projection_dim})

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.MEMORY_CONTRAST
        feature_dim, source = c.FEATURE_DIM, "SEMI.MEMORY_CONTRAST.FEATURE_DIM"
        if feature_dim <= 0:
            feature_dim, source = spec.feature_dim, f"the 'features' width of the head '{spec.name}'"
        elif feature_dim != spec.feature_dim:
            raise ValueError(
                f"SEMI.MEMORY_CONTRAST.FEATURE_DIM = {feature_dim} but the head '{spec.name}' "
                f"(MODEL.SEM_SEG_HEAD.NAME) outputs {spec.feature_dim}-d 'features'"
            )
        if c.BANK_SIZE <= 0:
            raise ValueError(f"SEMI.MEMORY_CONTRAST.BANK_SIZE must be > 0 (entries per class), got {c.BANK_SIZE}")
        _bank_datasets(cfg)
        k = c.PER_CLASS_PER_IMAGE
        if k <= 0:  # paper: max(1, psi / |X_l|) vectors per image and class (rounded, as the reference)
            k = max(1, int(round(c.BANK_SIZE / c.NUM_LABELED))) if c.NUM_LABELED > 0 else None
        return dict(
            cls.shared_kwargs(cfg, spec.num_classes, feature_dim, source, k),
            bank_datasets=list(c.BANK_DATASETS),
        )

    @classmethod
    def config_from_datasets(cls, cfg) -> Dict[str, int]:
        """NUM_LABELED = the images of BANK_DATASETS (or of every labeled training set) when neither it nor
        PER_CLASS_PER_IMAGE is set: |X_l| of K = max(1, BANK_SIZE / |X_l|)."""
        c = cfg.SEMI.MEMORY_CONTRAST
        if c.PER_CLASS_PER_IMAGE > 0 or c.NUM_LABELED > 0:
            return {}
        return {"SEMI.MEMORY_CONTRAST.NUM_LABELED": _count_labeled(_bank_datasets(cfg))}

    @staticmethod
    def shared_kwargs(cfg, num_classes: int, feature_dim: int, feature_dim_source: str,
                      per_class_per_image: Optional[int]):
        """The ``SEMI.MEMORY_CONTRAST`` arguments every task's memory-contrast term takes (the RoI variant
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
            norm=cfg.MODEL.SEM_SEG_HEAD.NORM,
        )

    def ema_pairs(self) -> List[EMAPair]:
        """g_xi <- g_theta and S'_xi <- S'_theta with the teacher's momentum; their buffers (BN statistics) are
        copied from the student heads, whatever SEMI.EMA.AVERAGE_BUFFERS says for the teacher network."""
        return [
            EMAPair(self.teacher_projection, self.projection, average_buffers=False),
            EMAPair(self.teacher_memory_selector, self.memory_selector, average_buffers=False),
        ]

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
        if self.per_class_per_image is None:
            raise ValueError(
                "memory_contrast: K = max(1, BANK_SIZE / |X_l|) bank entries per image and class needs |X_l|: set "
                "SEMI.MEMORY_CONTRAST.NUM_LABELED or PER_CLASS_PER_IMAGE (SemiSegTrainer counts the images of "
                "BANK_DATASETS / DATASETS.TRAIN_LABELED when both are 0)"
            )
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
