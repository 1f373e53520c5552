"""SemiStep: everything one semi-supervised training step computed, handed to every loss term."""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..layers.label_ops import resize_labels
from ..layers.perturbation import mix
from .step_record import StepRecord


@dataclass(kw_only=True)
class SemiStep(StepRecord):
    """One step's record (the clock, ``burn_in``, ``metrics``/``log`` come from :class:`StepRecord`). Shapes: Bl labeled, Bu unlabeled images; H, W crop; h, w head resolution.

    Teacher maps (no gradient, fp32, crop resolution):
      ``teacher_weak``: the weak views as they are (unmixed) — ``probs [Bu,C,H,W]``, ``pseudo_label
      long[Bu,H,W]`` (ignore where ``valid`` is False), ``confidence``, ``entropy [Bu,H,W]``, and the
      head outputs (``features [Bu,D,h,w]``, ...).
      ``teacher_strong``: the same label maps mixed exactly like the strong images (what the student
      sees on its strong views): ``probs``, ``pseudo_label``, ``confidence``, ``entropy``, ``valid``.
      ``teacher_labeled``: when a term declares ``needs_teacher_labeled``, the same maps (``probs``,
      ``confidence``, ``pseudo_label`` = teacher argmax, ``entropy``) and head outputs for the labeled images.
    Student head outputs (with gradient), split by part: ``student_labeled``, ``student_strong`` and,
    when a term declares ``needs_student_weak``, ``student_weak``; each a dict as the head returns it.
    ``mix_mask bool[Bu,H,W]`` (True = pixel taken from the partner) and ``mix_partner long[Bu]``
    describe the mixing, so terms can mix any other map with :meth:`mix`.
    ``supervised_losses(outputs, targets, pixel_weight)`` is the student's supervised criterion (CE/OHEM + aux).
    ``class_weights [C]``, when a term (``class_balance``) sets it, weights the supervised and pseudo-label
    cross-entropy per pixel by the class of its (pseudo-)label (Alonso et al., Eq. 3).
    Dual strong streams (a term declares ``needs_second_strong``, UniMatch): ``strong_images2``,
    ``student_strong2``, ``teacher_strong2`` and ``mix_mask2`` are the second strong view's, mixed with its own
    CutMix boxes (same partners ``mix_partner``); empty/None otherwise. ``student_weak_fp`` (a term sets
    ``feature_dropout``, UniMatch ``fp``): the student head's outputs on Dropout2d-perturbed backbone features
    of the weak views (decoded in one batch with the clean pass that holds the weak views).
    ``weak_images [Bu,3,H,W]`` (unmixed) and ``strong_images`` (mixed: what the student sees) are the
    normalised unlabeled views. ``keep_masks``: term name -> ``bool [Bu,H,W]``, the pixels of the
    ``teacher_strong`` maps that the term trains on, recorded by the term itself (one source of truth for
    the TensorBoard pictures of ``SEMI.VIS_PERIOD``).
    """

    num_classes: int
    ignore_value: int
    labeled_images: torch.Tensor
    labeled_targets: torch.Tensor
    student_labeled: Dict[str, torch.Tensor]
    supervised_losses: Callable = None  # the student's Segmentor.losses(outputs, targets) -> dict
    unlabeled_valid: Optional[torch.Tensor] = None
    teacher_weak: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_strong: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_labeled: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_strong: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_weak: Dict[str, torch.Tensor] = field(default_factory=dict)
    labeled_datasets: Optional[List[str]] = None  # dataset_name of each labeled image (several sources)
    class_weights: Optional[torch.Tensor] = None  # [C] per-class CE weights, set by the class_balance term
    mix_mask: Optional[torch.Tensor] = None
    mix_partner: Optional[torch.Tensor] = None
    weak_images: Optional[torch.Tensor] = None
    strong_images: Optional[torch.Tensor] = None
    keep_masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    strong_images2: Optional[torch.Tensor] = None
    student_strong2: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_strong2: Dict[str, torch.Tensor] = field(default_factory=dict)
    mix_mask2: Optional[torch.Tensor] = None
    student_weak_fp: Dict[str, torch.Tensor] = field(default_factory=dict)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x [Bu, ..., h, w]`` like the strong images (mask resized nearest to ``h, w``)."""
        if self.mix_mask is None:
            return x
        return mix(x, resize_labels(self.mix_mask, x.shape[-2:]), self.mix_partner)

    def pixel_class_weights(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """``class_weights[labels]`` for ``labels long[B,H,W]`` (ignored pixels get 0); None when unset."""
        if self.class_weights is None:
            return None
        valid = labels != self.ignore_value
        return torch.where(valid, self.class_weights[labels.clamp(0, self.num_classes - 1)], 0.0)
