"""Loss terms of SemiRCNN (task ``"instance"``), registered in the engine's ``SEMI_LOSS_REGISTRY``.

``rcnn_supervised``      the student's detectron2 losses on labeled images x ``SEMI.SUPERVISED.WEIGHT``.
``rcnn_pseudo_label``    the student's losses on the strong views against the teacher's pseudo-instances x
                         ``SEMI_INSTANCE.UNSUP_WEIGHT``: RPN objectness + RoI classification, mask
                         (``UNSUP_MASK``), box regression only with ``UNSUP_BOX_REGRESSION`` (Unbiased Teacher).
``roi_memory_contrast``  Alonso et al.'s class-wise memory-bank contrastive loss on RoI box-head features (the
                         paper's proposed extension to detection / instance segmentation: contrast "the features
                         from the semantic head", i.e. the part that outputs an instance's class). A subclass of
                         the segmentation term ``memory_contrast``: same projection / prediction heads, class
                         attention selectors, Eqs. 8-11 (``memory_contrast_loss``), ``ClassMemoryBank``, top-K
                         insertion and EMA teacher heads; only what a "pixel" is changes (a foreground RoI).
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable

from semiseg_d2.layers.memory_bank import topk_per_class_per_image
from semiseg_d2.losses.memory_contrast import MemoryContrastTerm
from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY, SemiLossTerm
from semiseg_d2.losses.supervised import SupervisedTerm

from .semi_rcnn import InstanceStep, RCNNPass, roi_box_features

__all__ = ["RCNNSupervisedTerm", "RCNNPseudoLabelTerm", "RoIMemoryContrastTerm", "UNSUP_CLASSIFICATION", "UNSUP_BOX",
           "UNSUP_MASK"]

UNSUP_CLASSIFICATION = ("loss_rpn_cls", "loss_cls")
UNSUP_BOX = ("loss_rpn_loc", "loss_box_reg")
UNSUP_MASK = ("loss_mask",)


@SEMI_LOSS_REGISTRY.register_term
class RCNNSupervisedTerm(SupervisedTerm):
    """``rcnn_supervised``: detectron2's R-CNN losses of the labeled pass (names unchanged: loss_cls, ...)."""

    name = "rcnn_supervised"
    task = "instance"
    # weight (SEMI.SUPERVISED.WEIGHT) and running during burn-in: inherited from the segmentation term

    def forward(self, step: InstanceStep) -> Dict[str, torch.Tensor]:
        return {k: v * self.weight for k, v in step.student_labeled.losses.items()}


@SEMI_LOSS_REGISTRY.register_term
class RCNNPseudoLabelTerm(SemiLossTerm):
    """``rcnn_pseudo_label``: losses of the strong pass against pseudo-instances, ``loss_*_unsup``; logs the number of
    pseudo-instances per image and their mean score."""

    name = "rcnn_pseudo_label"
    task = "instance"

    @configurable
    def __init__(self, *, weight: float = 4.0, box_regression: bool = False, mask: bool = True):
        super().__init__()
        self.weight = weight
        self.kept = UNSUP_CLASSIFICATION + (UNSUP_BOX if box_regression else ()) + (UNSUP_MASK if mask else ())

    @classmethod
    def from_config(cls, cfg, spec):
        s = cfg.SEMI_INSTANCE
        return dict(weight=s.UNSUP_WEIGHT, box_regression=s.UNSUP_BOX_REGRESSION, mask=s.UNSUP_MASK)

    def forward(self, step: InstanceStep) -> Dict[str, torch.Tensor]:
        pseudo = step.pseudo_instances
        n = torch.tensor([float(len(p)) for p in pseudo])
        step.log("pseudo/instances_per_image", n.mean())
        scores = [p.scores for p in pseudo if len(p)]
        if scores:
            step.log("pseudo/mean_score", torch.cat(scores).mean())
        return {f"{k}_unsup": v * self.weight for k, v in step.student_strong.losses.items() if k in self.kept}


@SEMI_LOSS_REGISTRY.register_term
class RoIMemoryContrastTerm(MemoryContrastTerm):
    """``roi_memory_contrast`` (see module docstring). Keys: ``SEMI.MEMORY_CONTRAST.*`` (shared with the segmentation
    term) + ``SEMI_INSTANCE.BANK_FROM_PSEUDO``.

    Loss: student box-head features of the foreground RoIs sampled by the labeled pass (class = matched GT class) and
    by the strong pass (class = matched pseudo-instance class) -> g -> q, contrasted with the bank of their class
    (``loss_roi_contrast_labeled`` / ``_unlabeled``, each x WEIGHT).
    Bank: teacher box-head features of the labeled GT boxes that the teacher classifies correctly with probability
    > CONFIDENCE_THRESHOLD (Alonso's feature quality filter), through the EMA projection g_xi, top-K per image and
    class by the teacher's memory selector; with BANK_FROM_PSEUDO also the weak views' pseudo-boxes whose teacher
    score is > CONFIDENCE_THRESHOLD.
    """

    name = "roi_memory_contrast"
    task = "instance"
    needs_teacher_labeled = True

    @configurable
    def __init__(self, *, bank_from_pseudo: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.bank_from_pseudo = bank_from_pseudo

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.MEMORY_CONTRAST
        feature_dim, source = c.FEATURE_DIM, "SEMI.MEMORY_CONTRAST.FEATURE_DIM"
        if feature_dim <= 0:
            feature_dim, source = spec.feature_dim, f"the output width of the box head '{spec.name}'"
        k = c.PER_CLASS_PER_IMAGE
        if k <= 0:
            raise ValueError("SEMI.MEMORY_CONTRAST.PER_CLASS_PER_IMAGE must be > 0 for roi_memory_contrast "
                             "(boxes per image and class entering the bank)")
        return dict(
            cls.shared_kwargs(cfg, spec.num_classes, feature_dim, source, k),
            bank_from_pseudo=cfg.SEMI_INSTANCE.BANK_FROM_PSEUDO,
            # rows are boxes, not pixels: batch norm over them (MODEL.SEM_SEG_HEAD.NORM is detectron2's "GN" in an
            # R-CNN config, and GroupNorm of 32 groups fails on one box), synced when the backbone is
            norm="SyncBN" if cfg.MODEL.RESNETS.NORM == "SyncBN" else "BN",
        )

    def _foreground(self, step: InstanceStep, part: RCNNPass) -> Tuple[torch.Tensor, torch.Tensor]:
        """Student box features [R, D] and classes [R] of the foreground RoIs the RoI heads sampled."""
        boxes, labels = [], []
        for p in part.proposals:
            fg = (p.gt_classes >= 0) & (p.gt_classes < self.num_classes)
            boxes.append(p.proposal_boxes[fg])
            labels.append(p.gt_classes[fg])
        return roi_box_features(step.student_net, part.features, boxes), torch.cat(labels)

    def forward(self, step: InstanceStep) -> Dict[str, torch.Tensor]:
        zero = step.student_labeled.features[next(iter(step.student_labeled.features))].new_zeros(()).float()
        empty = {"loss_roi_contrast_labeled": zero, "loss_roi_contrast_unlabeled": zero}
        if step.iteration < self.start_iter:
            return empty
        f_l, y_l = self._foreground(step, step.student_labeled)
        f_u, y_u = self._foreground(step, step.student_strong)
        self._check_dim(f_l, "student RoI box features")
        if f_l.shape[0] + f_u.shape[0] < 2:  # the projection's BatchNorm needs two rows
            return empty
        labels = torch.cat([y_l, y_u])
        is_labeled = torch.arange(labels.numel(), device=labels.device) < y_l.numel()
        return self.contrast_losses(step, torch.cat([f_l, f_u]).float(), labels, is_labeled, "roi_contrast")

    @torch.no_grad()
    def candidates(self, step: InstanceStep) -> Tuple[torch.Tensor, torch.Tensor]:
        """Bank candidates: (teacher projections [K, projection_dim], classes long[K])."""
        if step.teacher_labeled is None:
            raise RuntimeError("roi_memory_contrast needs InstanceStep.teacher_labeled (teacher features of the labeled "
                               "images); SemiRCNN provides it for terms with needs_teacher_labeled = True")
        boxes: List = [g.gt_boxes for g in step.labeled_instances]
        labels = [g.gt_classes for g in step.labeled_instances]
        feats = roi_box_features(step.teacher_net, step.teacher_labeled.features, boxes)
        labels = torch.cat(labels)
        probs = step.teacher_net.roi_heads.box_predictor(feats)[0].float().softmax(-1)[:, : self.num_classes]
        conf, pred = probs.max(-1)
        keep = (pred == labels) & (conf > self.confidence_threshold)  # feature quality filter on GT boxes
        image = torch.cat([torch.full((len(b),), i, device=labels.device) for i, b in enumerate(boxes)])
        num_images = len(boxes)
        if self.bank_from_pseudo and step.pseudo_instances:
            p_boxes = [p.gt_boxes for p in step.pseudo_instances]
            p_feats = roi_box_features(step.teacher_net, step.teacher_weak.features, p_boxes)
            p_labels = torch.cat([p.gt_classes for p in step.pseudo_instances])
            p_keep = torch.cat([p.scores for p in step.pseudo_instances]) > self.confidence_threshold
            p_image = torch.cat([torch.full((len(b),), num_images + i, device=labels.device)
                                 for i, b in enumerate(p_boxes)])
            feats, labels = torch.cat([feats, p_feats]), torch.cat([labels, p_labels])
            keep, image = torch.cat([keep, p_keep]), torch.cat([image, p_image])
            num_images += len(p_boxes)
        idx = keep.nonzero().squeeze(1)
        z = self.teacher_projection(feats[idx].float())
        scores = self.teacher_memory_selector.score_pixels(z, labels[idx])
        top = topk_per_class_per_image(scores, labels[idx], image[idx], self.per_class_per_image, self.num_classes,
                                       num_images)
        return z[top], labels[idx][top]
