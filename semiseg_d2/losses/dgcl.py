"""DGCL (Wang et al., CVPR 2023): density-guided contrastive learning — the ``dgcl`` loss term.

Per class c (GT on labeled pixels, entropy-filtered teacher pseudo-labels on weak unlabeled pixels, at the
head's feature resolution), the density of each student feature against class c's memory bank
(:func:`~semiseg_d2.layers.density.knn_density_grouped`, multi-scale kNN, fp32) picks
  anchors    = the NUM_ANCHORS lowest-density pixels (projections, with gradient),
  positives  = the NUM_POSITIVES highest-density pixels (detached) + the NUM_POSITIVES bank entries with
               the highest stored density; their mean is the class prototype,
  negatives  = up to NUM_NEGATIVES random pixels of other classes (detached),
and the loss is InfoNCE (temperature 0.5) with the prototype as the single positive, averaged over anchors,
then over active classes. Everything is batched over classes (padded ``[C, K]`` layout, no host sync).

The memory bank (:class:`~semiseg_d2.layers.memory_bank.ClassMemoryBank`, per class FIFO of decoder feature,
projection and density) is filled in :meth:`DGCLTerm.update` after the optimizer step, gathered across
ranks and sub-sampled with a rank-shared generator, so that every rank holds the same bank.
docs/methods/dgcl.md maps paper and reference code to this file and lists the deviations.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import Range, OneOf, POSITIVE, NON_NEGATIVE, AT_LEAST_1, PERCENT, declare
from ..layers.density import class_density_blocked, knn_density_grouped
from ..layers.distributed import gather_for_enqueue
from ..layers.label_ops import entropy_keep_mask, resize_labels, softmax_entropy
from ..layers.memory_bank import ClassMemoryBank
from ..utils.dtype import upcast
from .contrastive import (
    ProjectionHead,
    flatten_pixels,
    group_pixels_by_class,
    info_nce,
    sample_negatives_per_class,
)
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

_BANK_SOURCES = ("student", "teacher")
# "per_class": a class contributes once ITS bank holds MIN_FILL entries (ours);
# "all_classes": no class contributes until EVERY class's bank holds MIN_FILL (official ``memobank.check_if_full()``)
_STARTS = ("per_class", "all_classes")


# ---------------------------------------------------------------------------------------------- pure parts
def topk_valid(values: torch.Tensor, valid: torch.Tensor, k: int, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest (or smallest) values among the valid entries.

    values: [C, K] float; valid: [C, K] bool -> (position [C, k'] long into K, ok [C, k'] bool),
    k' = min(k, K). Row c's first ``min(k, valid[c].sum())`` picks are valid (invalid entries sort last).
    """
    k = min(int(k), values.shape[-1])
    fill = float("-inf") if largest else float("inf")
    values = upcast(values)
    masked = torch.where(valid, values, torch.full_like(values, fill))
    position = masked.topk(k, dim=-1, largest=largest, sorted=True).indices
    ok = torch.arange(k, device=values.device) < valid.sum(-1, keepdim=True)
    return position, ok


def select_anchors_and_positives(
    density: torch.Tensor, valid: torch.Tensor, num_anchors: int, num_positives: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DGCL's sampling: the ``num_anchors`` LOWEST-density and the ``num_positives`` HIGHEST-density entries.

    density: [C, K] float; valid: [C, K] bool (a class with fewer valid entries uses all it has).
    Returns (anchor_pos [C, A], anchor_ok [C, A], positive_pos [C, Pp], positive_ok [C, Pp]): positions into
    K and validity, A = min(num_anchors, K), Pp = min(num_positives, K).
    """
    anchor_pos, anchor_ok = topk_valid(density, valid, num_anchors, largest=False)
    positive_pos, positive_ok = topk_valid(density, valid, num_positives, largest=True)
    return anchor_pos, anchor_ok, positive_pos, positive_ok


def masked_prototype(positives: torch.Tensor, positive_ok: torch.Tensor) -> torch.Tensor:
    """Mean of the valid (un-normalised) positive keys: positives [C, P, D], positive_ok [C, P] -> [C, D]
    fp32 (zeros for a class without valid keys)."""
    w = positive_ok.float().unsqueeze(-1)
    return (upcast(positives) * w).sum(1) / w.sum(1).clamp_min(1.0)


def dgcl_contrastive_loss(
    anchors: torch.Tensor,
    anchor_ok: torch.Tensor,
    prototypes: torch.Tensor,
    negatives: torch.Tensor,
    negative_ok: torch.Tensor,
    class_active: torch.Tensor,
    temperature: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of every anchor against its class prototype (positive) and the class's negatives.

    anchors: [C, A, D]; anchor_ok: [C, A] bool; prototypes: [C, D]; negatives: [C, M, D]; negative_ok: [C, M];
    class_active: [C] bool (classes that contribute).
    Returns (loss: scalar fp32 = mean over active classes of the mean over their valid anchors, 0 with a
    gradient path when no class is active; per_class: [C] fp32, 0 for inactive classes). Never NaN.
    """
    per_anchor = info_nce(anchors, prototypes.unsqueeze(1), negatives, temperature, negative_ok)  # [C, A]
    per_anchor = torch.where(anchor_ok, per_anchor, torch.zeros_like(per_anchor))
    n_anchor = anchor_ok.sum(1)
    active = class_active & (n_anchor > 0)
    per_class = per_anchor.sum(1) / n_anchor.clamp_min(1).float()
    per_class = torch.where(active, per_class, torch.zeros_like(per_class))
    loss = per_class.sum() / active.sum().clamp_min(1).float()
    return loss, per_class


# ---------------------------------------------------------------------------------------------- the term
def add_dgcl_config(cfg) -> None:
    """Declare ``SEMI.DGCL.*``, the keys of the ``dgcl`` term (``add_semiseg_config`` calls this)."""
    # dgcl term (losses/dgcl.py, docs/methods/dgcl.md): density-guided contrastive loss + class-wise memory bank
    cfg.SEMI.DGCL = CN()
    # lambda_c of L = L_sup + lambda_u L_u + lambda_c L_dgcl (paper/reference: 0.5)
    declare(cfg, "SEMI.DGCL.WEIGHT", 0.5, NON_NEGATIVE)
    declare(cfg, "SEMI.DGCL.TEMPERATURE", 0.5, POSITIVE)  # InfoNCE temperature
    # projection MLP width (Linear-BN-ReLU-Linear on the head's "features")
    declare(cfg, "SEMI.DGCL.PROJ_DIM", 256, AT_LEAST_1)
    declare(cfg, "SEMI.DGCL.NUM_ANCHORS", 200, AT_LEAST_1)  # lowest-density pixels per class used as anchors
    # highest-density keys per class, taken from the batch AND from the bank
    declare(cfg, "SEMI.DGCL.NUM_POSITIVES", 50, AT_LEAST_1)
    declare(cfg, "SEMI.DGCL.NUM_NEGATIVES", 512, AT_LEAST_1)  # random pixels of other classes per class
    # random subset of a class's batch pixels whose density is computed
    declare(cfg, "SEMI.DGCL.MAX_PIXELS_PER_CLASS", 10000, AT_LEAST_1)
    declare(cfg, "SEMI.DGCL.MEMORY_SIZE", 10000, AT_LEAST_1)  # bank entries per class (FIFO)
    # at most this many new bank entries per class per step (all ranks together)
    declare(cfg, "SEMI.DGCL.UPDATE_PER_CLASS", 1000, AT_LEAST_1)
    # a class contributes once its bank holds this many entries (ref: all classes full)
    declare(cfg, "SEMI.DGCL.MIN_FILL", 10000, Range(0, "SEMI.DGCL.MEMORY_SIZE"))
    declare(cfg, "SEMI.DGCL.DENSITY_KS", [8, 16, 32], AT_LEAST_1)  # kNN sizes of the multi-scale density
    # contrastive labels / bank entries drop the max(DROP_PERCENT * (1 - progress), MIN_DROP_PERCENT) % highest-
    # entropy pseudo-labelled pixels; progress counts from the end of SEMI.BURN_IN_ITERS
    declare(cfg, "SEMI.DGCL.DROP_PERCENT", 80.0, PERCENT)
    declare(cfg, "SEMI.DGCL.MIN_DROP_PERCENT", 10.0, PERCENT)
    # classes that never get anchors (ref: [0] on every dataset; VOC background)
    declare(cfg, "SEMI.DGCL.SKIP_CLASSES", [], Range(0, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", hi_open=True))
    # "per_class": a class contributes once its bank holds MIN_FILL (ours); "all_classes": the loss is off until every
    # class's bank holds MIN_FILL (official check_if_full, which with SKIP_CLASSES [0] is the official start)
    declare(cfg, "SEMI.DGCL.START", "per_class", OneOf("per_class", "all_classes"))
    # 0: loss weight WEIGHT (ours, paper). W > 0: WEIGHT / W, the official effective weight of its non-autograd
    # all_reduce + / world_size on W GPUs (Cityscapes W = 8: 0.0625, VOC W = 4: 0.125), whatever world size we run on
    declare(cfg, "SEMI.DGCL.OFFICIAL_WORLD_SIZE", 0, NON_NEGATIVE)
    cfg.SEMI.DGCL.BANK_SOURCE = "student"  # bank features from the "student" (ref) or the "teacher" (weak views)
    # similarities materialised at once in the kNN density (memory)
    declare(cfg, "SEMI.DGCL.DENSITY_MAX_ELEMENTS", 134217728, AT_LEAST_1)


@SEMI_LOSS_REGISTRY.register_term
class DGCLTerm(SemiLossTerm):
    """``dgcl``: density-guided contrastive loss on labeled + weak-unlabeled student features, with its
    class-wise memory bank (module buffers: checkpointed with the model)."""

    name = "dgcl"
    needs_student_weak = True

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        proj_dim: int = 256,
        weight: float = 0.5,
        temperature: float = 0.5,
        num_anchors: int = 200,
        num_positives: int = 50,
        num_negatives: int = 512,
        max_pixels_per_class: int = 10000,
        memory_size: int = 10000,
        update_per_class: int = 1000,
        min_fill: int = 10000,
        density_ks: Sequence[int] = (8, 16, 32),
        drop_percent: float = 80.0,
        min_drop_percent: float = 10.0,
        skip_classes: Sequence[int] = (),
        start: str = "per_class",
        official_world_size: int = 0,
        bank_source: str = "student",
        density_max_elements: int = 1 << 27,
        ignore_value: int = 255,
        seed: int = 0,
        norm: str = "BN",
    ):
        super().__init__()
        if bank_source not in _BANK_SOURCES:
            raise ValueError(f"SEMI.DGCL.BANK_SOURCE: unknown '{bank_source}'; known: {', '.join(_BANK_SOURCES)}")
        if start not in _STARTS:
            raise ValueError(f"SEMI.DGCL.START: unknown '{start}'; known: {', '.join(_STARTS)}")
        if int(official_world_size) < 0:
            raise ValueError(f"SEMI.DGCL.OFFICIAL_WORLD_SIZE: must be >= 0 (0 = off), got {official_world_size}")
        bad = [c for c in skip_classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"SEMI.DGCL.SKIP_CLASSES: {bad} outside [0, {num_classes})")
        if min_fill > memory_size:
            raise ValueError(f"SEMI.DGCL.MIN_FILL ({min_fill}) > SEMI.DGCL.MEMORY_SIZE ({memory_size}): "
                             "no class could ever contribute")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.weight = weight
        self.start = start
        # The official all_reduce + / world_size on the loss is not autograd-aware: its gradient is the local one
        # divided by W, i.e. an effective weight WEIGHT / W whatever world size we run on (docs/methods/dgcl.md).
        self.official_world_size = int(official_world_size)
        self.temperature = temperature
        self.num_anchors = num_anchors
        self.num_positives = num_positives
        self.num_negatives = num_negatives
        self.max_pixels_per_class = max_pixels_per_class
        self.update_per_class = update_per_class
        self.min_fill = min_fill
        self.density_ks = tuple(int(k) for k in density_ks)
        self.drop_percent = drop_percent
        self.min_drop_percent = min_drop_percent
        self.bank_source = bank_source
        self.density_max_elements = density_max_elements
        self.ignore_value = ignore_value
        self.seed = seed
        self.proj = ProjectionHead(feature_dim, proj_dim, proj_dim, norm)  # SyncBN: the official convert_sync_batchnorm
        self.bank = ClassMemoryBank(num_classes, memory_size, {"feat": feature_dim, "proj": proj_dim, "density": 0})
        skip = torch.zeros(num_classes, dtype=torch.bool)
        skip[list(int(c) for c in skip_classes)] = True
        self.register_buffer("skip_mask", skip, persistent=False)
        self._pending = None  # (step, labels [P], frozen ProjectedRows [P, Dp]) from forward, for update

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.DGCL
        return dict(
            num_classes=spec.num_classes,
            feature_dim=spec.feature_dim,
            proj_dim=c.PROJ_DIM,
            weight=c.WEIGHT,
            temperature=c.TEMPERATURE,
            num_anchors=c.NUM_ANCHORS,
            num_positives=c.NUM_POSITIVES,
            num_negatives=c.NUM_NEGATIVES,
            max_pixels_per_class=c.MAX_PIXELS_PER_CLASS,
            memory_size=c.MEMORY_SIZE,
            update_per_class=c.UPDATE_PER_CLASS,
            min_fill=c.MIN_FILL,
            density_ks=c.DENSITY_KS,
            drop_percent=c.DROP_PERCENT,
            min_drop_percent=c.MIN_DROP_PERCENT,
            skip_classes=c.SKIP_CLASSES,
            start=c.START,
            official_world_size=c.OFFICIAL_WORLD_SIZE,
            bank_source=c.BANK_SOURCE,
            density_max_elements=c.DENSITY_MAX_ELEMENTS,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
            norm=cfg.MODEL.SEM_SEG_HEAD.NORM,
        )

    # ------------------------------------------------------------------ labels
    def drop_percent_at(self, step) -> float:
        """max(DROP_PERCENT * (1 - progress), MIN_DROP_PERCENT) with the step's ``semi_progress`` (counted from the
        end of burn-in: the reference's (epoch - sup_only_epoch) / (epochs - sup_only_epoch), per iteration here)."""
        return max(self.drop_percent * (1.0 - step.semi_progress), self.min_drop_percent)

    @torch.no_grad()
    def contrast_labels(self, step, size) -> torch.Tensor:
        """Labels of the labeled + weak-unlabeled pixels at the feature resolution ``size`` -> [Bl+Bu, h, w].

        GT is nearest-downsampled (as the reference does); pseudo-labels are the teacher's argmax at the head's
        resolution, the highest-entropy ``drop_percent_at(step)`` % of valid pixels set to ignore.
        """
        h, w = size
        gt = resize_labels(step.labeled_targets, (h, w))
        logits = upcast(step.teacher_weak["logits"])
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(1)
        pseudo = probs.argmax(1)
        valid = step.unlabeled_valid
        if valid is None:
            valid = torch.ones_like(pseudo, dtype=torch.bool)
        else:
            valid = resize_labels(valid, (h, w))
        keep = entropy_keep_mask(softmax_entropy(probs), valid, self.drop_percent_at(step))
        pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, self.ignore_value))
        return torch.cat([gt.long(), pseudo])

    def _student_features(self, step) -> torch.Tensor:
        if not step.student_weak:
            raise RuntimeError("dgcl: SemiStep.student_weak is empty; the engine must run the student on weak "
                               "views for terms with needs_student_weak (SemiSegmentor does)")
        feats = torch.cat([step.student_labeled["features"], step.student_weak["features"]])
        if feats.shape[1] != self.feature_dim:
            raise ValueError(
                f"dgcl: the head's 'features' have D={feats.shape[1]} but the projection head and bank were built "
                f"for D={self.feature_dim} (the head's spec when the term was built); the two must match"
            )
        return feats

    # ------------------------------------------------------------------ loss
    def forward(self, step) -> Dict[str, torch.Tensor]:
        feats = self._student_features(step)
        labels = self.contrast_labels(step, feats.shape[-2:]).reshape(-1)
        f = flatten_pixels(feats)  # [P, D], gradient to the student through the projection
        # Projections of the rows the loss and the bank update read (anchors, positives, negatives, new entries),
        # not of all P pixels: the projection's last layer and its backward dominated this term.
        z = self.proj.project_rows(f)
        self._pending = (step, labels, z.frozen())
        loss, per_class, active = self.loss_from_pixels(f.detach(), z, labels)
        step.log("dgcl/active_classes", active.sum().float())
        step.log("dgcl/bank_fill", self.bank.count.float().mean() / self.bank.size)
        return {"loss_dgcl": loss * self.effective_weight}

    @property
    def effective_weight(self) -> float:
        """WEIGHT, or WEIGHT / OFFICIAL_WORLD_SIZE: the official code's effective lambda_c on that many GPUs."""
        return self.weight / max(self.official_world_size, 1)

    def loss_from_pixels(
        self, feats: torch.Tensor, proj: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The DGCL loss on flat pixels against the current bank.

        feats: [P, D] (detached; density only); proj: [P, Dp] or :class:`ProjectedRows` (anchors carry its
        gradient); labels: [P] long.
        Returns (loss scalar, per_class [C], active [C] bool). No host sync.
        """
        C = self.num_classes
        index, valid = group_pixels_by_class(labels, C, self.max_pixels_per_class, generator=generator)
        density = class_density_blocked(
            feats, index, valid, self.bank.get("feat"), self.bank.count, self.density_ks,
            max_elements=self.density_max_elements,
        )
        a_pos, a_ok, p_pos, p_ok = select_anchors_and_positives(density, valid, self.num_anchors, self.num_positives)
        anchors = proj[index.gather(1, a_pos)]  # [C, A, Dp]
        batch_pos = upcast(proj.detach()[index.gather(1, p_pos)])  # [C, Pp, Dp]
        m_pos, m_ok = topk_valid(self.bank.get("density"), self.bank.valid_mask(), self.num_positives, largest=True)
        bank_proj = self.bank.get("proj")
        mem_pos = upcast(bank_proj.gather(1, m_pos[..., None].expand(-1, -1, bank_proj.shape[-1])))
        prototypes = masked_prototype(torch.cat([batch_pos, mem_pos], 1), torch.cat([p_ok, m_ok], 1))
        n_index, n_ok = sample_negatives_per_class(labels, C, self.num_negatives, generator=generator)
        negatives = proj.detach()[n_index]
        filled = self.bank.count >= max(self.min_fill, 1)
        if self.start == "all_classes":
            filled = filled.all().expand_as(filled)
        active = valid.any(1) & filled & ~self.skip_mask
        loss, per_class = dgcl_contrastive_loss(anchors, a_ok, prototypes, negatives, n_ok, active, self.temperature)
        return loss, per_class, active

    # ------------------------------------------------------------------ memory
    @torch.no_grad()
    def _project_eval(self, f: torch.Tensor) -> torch.Tensor:
        """Projection with BN running statistics (no update of them): for features not seen in forward."""
        was_training = self.proj.training
        self.proj.eval()
        try:
            return self.proj(f)
        finally:
            self.proj.train(was_training)

    @torch.no_grad()
    def update(self, step) -> None:
        """Enqueue at most UPDATE_PER_CLASS filtered pixels per class (gathered over ranks), with their density
        against the bank before insertion. Same entries on every rank -> same bank on every rank."""
        pending, self._pending = self._pending, None
        feats = self._student_features(step).detach()
        if pending is not None and pending[0] is step:
            _, labels, proj = pending
        else:
            labels = self.contrast_labels(step, feats.shape[-2:]).reshape(-1)
            proj = None
        if self.bank_source == "teacher":
            # The engine runs the teacher on weak views only: labeled entries stay student features.
            feats = torch.cat([upcast(step.student_labeled["features"].detach()), upcast(step.teacher_weak["features"])])
            proj = None
        f = flatten_pixels(feats)
        if proj is None:
            proj = self._project_eval(f)
        self.enqueue_pixels(f, proj, labels, step.iteration)

    @torch.no_grad()
    def enqueue_pixels(self, feats: torch.Tensor, proj: torch.Tensor, labels: torch.Tensor, iteration: int) -> None:
        """feats [P, D], proj [P, Dp] (or ProjectedRows), labels [P] long (ignore allowed): sample locally, gather
        over ranks, sub-sample with a generator seeded by (SEED, iteration) — identical on every rank — and
        enqueue."""
        C, U = self.num_classes, self.update_per_class
        index, valid = group_pixels_by_class(labels, C, U)  # local pre-selection, fixed size [C, U]
        index, valid = index.reshape(-1), valid.reshape(-1)
        lab = torch.where(valid, labels[index], torch.full_like(index, self.ignore_value))
        values = {"feat": upcast(feats[index]), "proj": upcast(proj[index])}
        values, lab = gather_for_enqueue(values, lab)
        gen = torch.Generator(device=lab.device)
        gen.manual_seed((self.seed * 1_000_003 + int(iteration)) % (2 ** 63))
        index, valid = group_pixels_by_class(lab, C, U, generator=gen)  # [C, U'], same on every rank
        feat = values["feat"][index]
        density = knn_density_grouped(
            feat, self.bank.get("feat"), self.bank.count, self.density_ks, self.density_max_elements
        )
        # Fixed-size [C * U'] batch with a validity mask: no host sync (padding entries are not written).
        cls = torch.arange(C, device=lab.device)[:, None].expand_as(index).reshape(-1)
        self.bank.enqueue(
            {
                "feat": feat.reshape(-1, feat.shape[-1]),
                "proj": values["proj"][index].reshape(-1, values["proj"].shape[-1]),
                "density": density.reshape(-1),
            },
            cls,
            valid=valid.reshape(-1),
        )
