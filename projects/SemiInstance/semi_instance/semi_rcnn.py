"""SemiRCNN: semi-supervised Mask R-CNN (Unbiased-Teacher style) on the semiseg_d2 engine.

One training step (``forward((labeled, unlabeled))``):
  1. student (a detectron2 ``GeneralizedRCNN``) on the labeled images with their ground truth -> RPN + RoI losses;
  after burn-in:
  2. teacher (EMA copy, eval mode, no grad) on the weak unlabeled views -> detections; those with
     ``score >= SEMI_INSTANCE.PSEUDO_SCORE_THRESHOLD`` become pseudo-instances (boxes, classes, masks pasted into the
     image and binarised at ``PSEUDO_MASK_THRESHOLD``). Weak and strong views share their geometry (photometric strong
     augmentation), so the pseudo-instances are the strong view's targets as they are;
  3. student on the strong views with the pseudo-instances as ground truth -> RPN + RoI losses;
  4. every ``SEMI.LOSSES`` term (task ``"instance"``) reads the :class:`InstanceStep` and returns weighted losses.
The two student passes are separate forward passes (as in Unbiased Teacher), so RPN/RoI sampling and loss
normalisation of labeled and pseudo-labeled images stay apart. After the optimizer step the trainer calls
``after_optimizer_step`` (memory bank), then ``EMAHook`` updates ``teacher`` from ``student``.
Inference runs ``eval_network`` ("student" / "teacher") as a plain GeneralizedRCNN.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from semiseg_d2.losses.registry import build_loss_terms
from semiseg_d2.losses.step_record import StepRecord
from semiseg_d2.modeling.heads.spec import HeadSpec
from semiseg_d2.modeling.meta_arch.teacher_student import TeacherStudent

__all__ = ["RCNNPass", "InstanceStep", "pseudo_instances_from_predictions", "roi_box_features", "SemiRCNN"]


@dataclass
class RCNNPass:
    """One R-CNN pass over a batch: ``images`` (normalised, padded), backbone ``features``, ``proposals`` (training:
    the RoI heads' sampled proposals with ``gt_classes``, background = num_classes; inference: detections),
    ``losses`` (training passes: detectron2's loss dict)."""

    images: ImageList
    features: Dict[str, torch.Tensor]
    proposals: List[Instances]
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class InstanceStep(StepRecord):
    """What one SemiRCNN step computed, read by the ``"instance"`` loss terms.

    ``labeled_instances``: ground truth of the labeled images (on the model's device);
    ``student_labeled`` / ``student_strong``: :class:`RCNNPass` of the student on the labeled images / strong views
    (``student_strong`` None during burn-in); ``teacher_weak``: the teacher's pass on the weak views (its
    ``proposals`` are the detections, in input-image coordinates, masks as box-relative probabilities);
    ``pseudo_instances``: the filtered targets of the strong views; ``teacher_labeled``: the teacher's backbone
    features on the labeled images (only when a term sets ``needs_teacher_labeled``);
    ``student_net`` / ``teacher_net``: the two GeneralizedRCNNs (for RoI features of given boxes).
    """

    num_classes: int = 0
    labeled_instances: List[Instances] = field(default_factory=list)
    student_labeled: Optional[RCNNPass] = None
    student_strong: Optional[RCNNPass] = None
    teacher_weak: Optional[RCNNPass] = None
    teacher_labeled: Optional[RCNNPass] = None
    pseudo_instances: List[Instances] = field(default_factory=list)
    student_net: Optional[nn.Module] = None
    teacher_net: Optional[nn.Module] = None


def pseudo_instances_from_predictions(
    predictions: Instances, score_threshold: float, mask_threshold: float = 0.5
) -> Instances:
    """Detections -> training targets: keep ``scores >= score_threshold``.

    Args:
        predictions: ``pred_boxes``, ``pred_classes``, ``scores`` and optionally ``pred_masks`` — either
            ``[N, 1, M, M]`` box-relative probabilities (RoI-head output before post-processing) or ``[N, H, W]``
            image-sized masks (probabilities or bool).
    Returns:
        ``Instances`` of the same image size with ``gt_boxes``, ``gt_classes``, ``scores`` and, with masks,
        ``gt_masks`` (``BitMasks [K, H, W]``, probability >= ``mask_threshold``). No gradient.
    """
    keep = predictions.scores >= score_threshold
    out = Instances(predictions.image_size)
    boxes = predictions.pred_boxes.tensor[keep].detach().float()
    out.gt_boxes = Boxes(boxes)
    out.gt_classes = predictions.pred_classes[keep].detach()
    out.scores = predictions.scores[keep].detach().float()
    if predictions.has("pred_masks"):
        masks = predictions.pred_masks[keep].detach()
        h, w = predictions.image_size
        if masks.dim() == 4:
            if masks.shape[0] == 0:
                pasted = torch.zeros((0, h, w), dtype=torch.bool, device=boxes.device)
            else:
                pasted = paste_masks_in_image(masks[:, 0].float(), Boxes(boxes), (h, w), threshold=mask_threshold)
        else:
            pasted = masks if masks.dtype == torch.bool else masks.float() >= mask_threshold
        out.gt_masks = BitMasks(pasted)
    return out


def roi_box_features(network: GeneralizedRCNN, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
    """The box head's output (the feature the classifier reads) for given boxes: ``[sum(len(b)), D]``, images in
    order. Standard RoI heads only (box_pooler + box_head)."""
    heads = network.roi_heads
    if not isinstance(heads, StandardROIHeads):
        raise TypeError(f"roi_box_features needs StandardROIHeads (box_pooler + box_head), got {type(heads).__name__}")
    x = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
    return heads.box_head(x)


@META_ARCH_REGISTRY.register()
class SemiRCNN(TeacherStudent):
    """Student GeneralizedRCNN + EMA teacher + instance loss terms (see module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        student: GeneralizedRCNN,
        terms: nn.ModuleDict,
        max_iter: int,
        burn_in_iters: int = 0,
        num_classes: int,
        score_threshold: float = 0.7,
        mask_threshold: float = 0.5,
        eval_network: str = "teacher",
    ):
        if not isinstance(student, GeneralizedRCNN):
            raise TypeError(f"SemiRCNN: the student must be a GeneralizedRCNN, got {type(student).__name__}")
        if student.proposal_generator is None:
            raise ValueError("SemiRCNN needs a proposal generator (MODEL.PROPOSAL_GENERATOR.NAME 'RPN')")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"SEMI_INSTANCE.PSEUDO_SCORE_THRESHOLD must lie in [0, 1], got {score_threshold}")
        super().__init__(student, terms, max_iter, burn_in_iters, eval_network=eval_network)
        self.num_classes = int(num_classes)
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.teacher_labeled = any(getattr(t, "needs_teacher_labeled", False) for t in terms.values())

    @classmethod
    def from_config(cls, cfg):
        name = cfg.SEMI_INSTANCE.STUDENT_ARCHITECTURE
        if name == "SemiRCNN" or name not in META_ARCH_REGISTRY:
            raise ValueError(f"SEMI_INSTANCE.STUDENT_ARCHITECTURE: '{name}' is not a registered R-CNN meta-architecture")
        if cfg.SEMI.VIS_PERIOD > 0:
            raise ValueError("SEMI.VIS_PERIOD: SemiRCNN puts no training pictures (SemiSegmentor does); set it to 0")
        student = META_ARCH_REGISTRY.get(name)(cfg)
        box_head = student.roi_heads.box_head
        # the instance terms read RoI box-head features: their spec is the built box head's
        spec = HeadSpec(type(box_head).__name__, cfg.MODEL.ROI_HEADS.NUM_CLASSES, box_head.output_shape.channels)
        return dict(
            student=student,
            terms=build_loss_terms(cfg, spec, task="instance"),
            max_iter=cfg.SOLVER.MAX_ITER,
            burn_in_iters=cfg.SEMI.BURN_IN_ITERS,
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            score_threshold=cfg.SEMI_INSTANCE.PSEUDO_SCORE_THRESHOLD,
            mask_threshold=cfg.SEMI_INSTANCE.PSEUDO_MASK_THRESHOLD,
            eval_network=cfg.SEMI.WEIGHTS_FOR_EXPORT,
        )

    @property
    def device(self) -> torch.device:
        return self.student.device

    def forward(self, batched_inputs):
        if not self.training:
            return self.inference_network(batched_inputs)
        labeled, unlabeled = batched_inputs
        return self.run_terms(self.compute_step(labeled, unlabeled))

    # ------------------------------------------------------------------ passes
    def _train_pass(self, net: GeneralizedRCNN, inputs: List[dict], targets: List[Instances]) -> RCNNPass:
        images = net.preprocess_image(inputs)
        features = net.backbone(images.tensor)
        proposals, rpn_losses = net.proposal_generator(images, features, targets)
        sampled, roi_losses = net.roi_heads(images, features, proposals, targets)
        return RCNNPass(images, features, sampled, {**rpn_losses, **roi_losses})

    @torch.no_grad()
    def _teacher_pass(self, inputs: List[dict], detect: bool = True) -> RCNNPass:
        """GeneralizedRCNN.inference without post-processing, keeping the backbone features."""
        t = self.teacher
        images = t.preprocess_image(inputs)
        features = t.backbone(images.tensor)
        detections = []
        if detect:
            proposals, _ = t.proposal_generator(images, features, None)
            detections, _ = t.roi_heads(images, features, proposals, None)
        return RCNNPass(images, features, detections)

    def pseudo_label(self, detections: List[Instances]) -> List[Instances]:
        return [pseudo_instances_from_predictions(d, self.score_threshold, self.mask_threshold) for d in detections]

    def compute_step(self, labeled: List[dict], unlabeled: List[dict]) -> InstanceStep:
        gt = [x["instances"].to(self.device) for x in labeled]
        common = dict(
            iteration=self.iteration,
            max_iter=self.max_iter,
            burn_in_iters=self.burn_in_iters,
            num_classes=self.num_classes,
            labeled_instances=gt,
            student_net=self.student,
            teacher_net=self.teacher,
        )
        student_labeled = self._train_pass(self.student, labeled, gt)
        if self.in_burn_in():
            return InstanceStep(burn_in=True, student_labeled=student_labeled, **common)

        weak = [{"image": u["image"], "height": u["height"], "width": u["width"]} for u in unlabeled]
        teacher_weak = self._teacher_pass(weak)
        teacher_labeled = self._teacher_pass(labeled, detect=False) if self.teacher_labeled else None
        pseudo = self.pseudo_label(teacher_weak.proposals)
        strong = [{"image": u["image_strong"], "height": u["height"], "width": u["width"]} for u in unlabeled]
        with get_event_storage().name_scope("unsup"):  # detectron2's head metrics of this pass: "unsup/..."
            student_strong = self._train_pass(self.student, strong, pseudo)
        return InstanceStep(
            student_labeled=student_labeled,
            student_strong=student_strong,
            teacher_weak=teacher_weak,
            teacher_labeled=teacher_labeled,
            pseudo_instances=pseudo,
            **common,
        )
