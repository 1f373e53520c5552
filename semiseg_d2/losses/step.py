"""SemiStep: everything one semi-supervised training step computed, handed to every loss term."""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..data.transforms import mix


@dataclass
class SemiStep:
    """One step's record. Shapes: Bl labeled, Bu unlabeled images; H, W crop; h, w head resolution.

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
    ``supervised_losses(outputs, targets)`` is the student's supervised criterion (CE/OHEM + aux).
    ``student_decode(decoder_input, norms=None) -> (features, logits)`` re-runs the student's v3+ decoder
    (None for heads without ``decode``), e.g. on DDFP's perturbed decoder inputs.
    """

    iteration: int
    max_iter: int
    num_classes: int
    ignore_value: int
    labeled_images: torch.Tensor
    labeled_targets: torch.Tensor
    student_labeled: Dict[str, torch.Tensor]
    supervised_losses: Callable = None  # the student's Segmentor.losses(outputs, targets) -> dict
    student_decode: Callable = None  # the student head's decode(decoder_input, norms=None) (v3+ only; DDFP)
    burn_in: bool = False
    unlabeled_valid: Optional[torch.Tensor] = None
    teacher_weak: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_strong: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_labeled: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_strong: Dict[str, torch.Tensor] = field(default_factory=dict)
    student_weak: Dict[str, torch.Tensor] = field(default_factory=dict)
    mix_mask: Optional[torch.Tensor] = None
    mix_partner: Optional[torch.Tensor] = None
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(max(self.iteration / max(self.max_iter, 1), 0.0), 1.0)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x [Bu, ..., h, w]`` like the strong images (mask resized nearest to ``h, w``)."""
        if self.mix_mask is None:
            return x
        mask = self.mix_mask
        if mask.shape[-2:] != x.shape[-2:]:
            mask = F.interpolate(mask[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].bool()
        return mix(x, mask, self.mix_partner)

    def log(self, name: str, value: torch.Tensor) -> None:
        """Record a detached scalar metric (not a loss); the trainer writes it to the event storage."""
        self.metrics[name] = value.detach().float()
