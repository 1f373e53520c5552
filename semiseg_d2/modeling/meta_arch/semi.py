"""SemiSegmentor: a student Segmentor, its EMA teacher and the configured loss terms.

One training step (docs/architecture.md):
  1. teacher (eval-mode BN, no autograd) on the weak unlabeled views -> probabilities, pseudo-labels,
     confidence, entropy, features;
  2. mixing masks (CutMix / ClassMix) applied to the strong views and to the teacher maps alike;
  3. the student runs ONCE on cat(labeled, strong[, weak]) and its outputs are split per part;
  4. each loss term reads the SemiStep record and returns named, weighted losses.
After the optimizer step the trainer calls :meth:`after_optimizer_step` (stateful terms update their
memory banks / flows); the EMA hook then updates the teacher. The task-agnostic half (teacher copy, burn-in,
running the terms, metrics, state updates) is :class:`TeacherStudent`, shared with projects/SemiInstance.
On the steps where ``TrainingVisHook`` (``SEMI.VIS_PERIOD``) asks for pictures (``keep_vis > 0``), forward also
leaves a small detached CPU copy of the first images of each part in ``vis_record``; no other step keeps
anything beyond the optimizer step.
"""
from contextlib import nullcontext
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...config import check_semiseg_config
from ...data.transforms import classmix_masks, cutmix_masks, mix, shifted_partner_index
from ...evaluation.visualize import denormalize
from ...losses.pseudo_label import softmax_entropy
from ...losses.registry import build_loss_terms
from ...losses.step import SemiStep
from .segmentor import Segmentor
from .teacher_student import TeacherStudent

_MIX_TYPES = ("none", "cutmix", "classmix")


def split_outputs(outputs: Dict[str, torch.Tensor], sizes: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
    """Split every batch-first tensor of a head's output dict into parts of ``sizes``."""
    parts = [dict() for _ in sizes]
    for key, value in outputs.items():
        if value is None:
            continue
        for part, chunk in zip(parts, torch.split(value, list(sizes), dim=0)):
            part[key] = chunk
    return parts


@META_ARCH_REGISTRY.register()
class SemiSegmentor(TeacherStudent):
    """Student + EMA teacher + loss terms. Inference runs ``eval_network`` ("student" or "teacher"; default
    SEMI.WEIGHTS_FOR_EXPORT)."""

    @configurable
    def __init__(
        self,
        *,
        student: Segmentor,
        terms: nn.ModuleDict,
        max_iter: int,
        burn_in_iters: int = 0,
        mix_type: str = "cutmix",
        mix_prob: float = 0.5,
        cutmix_area: Tuple[float, float] = (0.02, 0.4),
        cutmix_ratio: Tuple[float, float] = (0.3, 1 / 0.3),
        student_weak: bool = False,
        teacher_autocast: bool = True,
        eval_network: str = "teacher",
    ):
        if mix_type not in _MIX_TYPES:
            raise ValueError(f"SEMI.MIX.TYPE: unknown '{mix_type}'; known: {', '.join(_MIX_TYPES)}")
        super().__init__(student, terms, max_iter, burn_in_iters, eval_network)
        self.mix_type = mix_type
        self.mix_prob = mix_prob
        self.cutmix_area = tuple(cutmix_area)
        self.cutmix_ratio = tuple(cutmix_ratio)
        self.student_weak = student_weak or any(t.needs_student_weak for t in terms.values())
        self.teacher_labeled = any(t.needs_teacher_labeled for t in terms.values())
        self.teacher_autocast = teacher_autocast
        self.keep_vis = 0  # images per part to copy into vis_record on this step (set by TrainingVisHook)
        self.vis_record = None  # detached CPU copy for the pictures, taken by TrainingVisHook

    @classmethod
    def from_config(cls, cfg):
        check_semiseg_config(cfg)
        m = cfg.SEMI.MIX
        return dict(
            student=Segmentor(cfg),
            terms=build_loss_terms(cfg),
            max_iter=cfg.SOLVER.MAX_ITER,
            burn_in_iters=cfg.SEMI.BURN_IN_ITERS,
            mix_type=m.TYPE,
            mix_prob=m.PROB,
            cutmix_area=m.CUTMIX_AREA,
            cutmix_ratio=m.CUTMIX_RATIO,
            student_weak=cfg.SEMI.STUDENT_WEAK,
            teacher_autocast=cfg.SEMI.TEACHER_AUTOCAST,
            eval_network=cfg.SEMI.WEIGHTS_FOR_EXPORT,
        )

    @property
    def device(self) -> torch.device:
        return self.student.device

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def ignore_value(self) -> int:
        return self.student.ignore_value

    # ------------------------------------------------------------------ inference
    def forward(self, batched_inputs):
        if not self.training:
            return self.inference_network(batched_inputs)
        labeled, unlabeled = batched_inputs
        step = self.compute_step(labeled, unlabeled)
        losses = self.run_terms(step)
        if self.keep_vis > 0:
            self.vis_record = self.vis_summary(step, self.keep_vis)
        return losses

    @torch.no_grad()
    def vis_summary(self, step: SemiStep, n: int) -> Dict[str, object]:
        """The first ``n`` images of each part of ``step``, detached on the CPU, for the training pictures:

        ``{"iteration", "labeled": {"image" uint8[n,3,H,W] RGB, "ground_truth" long[n,H,W], "student" long[n,H,W]},
        "unlabeled": {...}}``. ``unlabeled`` (absent during burn-in) is in the geometry of the mixed strong
        views the student trains on: ``weak`` (the weak views mixed like the strong ones), ``pseudo_label``
        (``teacher_strong``), ``kept`` (``step.keep_masks["pseudo_label"]``, None without that term),
        ``strong``, ``student`` (argmax on the strong views), ``mix_mask``. Predictions are the argmax of the
        logits upsampled (bilinear) to the crop, as the losses see them.
        """
        mean, std = self.student.pixel_mean, self.student.pixel_std

        def image(x):
            return denormalize(x[:n].detach(), mean, std).cpu()

        def argmax(logits, size):
            up = F.interpolate(logits[:n].detach().float(), size=size, mode="bilinear", align_corners=False)
            return up.argmax(1).cpu()

        size = step.labeled_targets.shape[-2:]
        record = {
            "iteration": step.iteration,
            "labeled": {
                "image": image(step.labeled_images),
                "ground_truth": step.labeled_targets[:n].cpu(),
                "student": argmax(step.student_labeled["logits"], size),
            },
        }
        if not step.burn_in:
            t = step.teacher_strong
            kept = step.keep_masks.get("pseudo_label")
            record["unlabeled"] = {
                "weak": image(step.mix(step.weak_images)),
                "pseudo_label": t["pseudo_label"][:n].cpu(),
                "kept": kept[:n].cpu() if kept is not None else None,
                "strong": image(step.strong_images),
                "student": argmax(step.student_strong["logits"], t["pseudo_label"].shape[-2:]),
                "mix_mask": step.mix_mask[:n].cpu(),
            }
        return record

    # ------------------------------------------------------------------ training step
    def _stack(self, dicts, key: str, dtype=None) -> torch.Tensor:
        x = torch.stack([d[key] for d in dicts]).to(self.device, non_blocking=True)
        return x if dtype is None else x.to(dtype)

    @torch.no_grad()
    def _teacher_outputs(self, images: torch.Tensor, valid: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Teacher on normalised images -> fp32 maps at crop resolution + head outputs (one pass)."""
        ctx = nullcontext() if self.teacher_autocast else torch.autocast(images.device.type, enabled=False)
        with torch.inference_mode(), ctx:
            out = self.teacher.extract(images)
        # Leave inference mode: terms use these as targets of autograd ops.
        out = {k: v.clone().float() for k, v in out.items() if v is not None}
        logits = F.interpolate(out["logits"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        probs = logits.softmax(1)
        confidence, pseudo_label = probs.max(1)
        pseudo_label = torch.where(valid, pseudo_label, torch.full_like(pseudo_label, self.ignore_value))
        out.update(
            probs=probs,
            confidence=confidence,
            pseudo_label=pseudo_label,
            entropy=softmax_entropy(probs),
            valid=valid,
        )
        return out

    def _mix_masks(self, pseudo_label: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        b, h, w = pseudo_label.shape
        if self.mix_type == "cutmix":
            return cutmix_masks(b, h, w, self.mix_prob, self.cutmix_area, self.cutmix_ratio, pseudo_label.device)
        if self.mix_type == "classmix":
            # Pixels of half of the partner's (pseudo-)classes are pasted onto each image.
            return classmix_masks(pseudo_label, self.mix_prob, self.ignore_value, partner_index=partner)
        return torch.zeros_like(pseudo_label, dtype=torch.bool)

    def compute_step(self, labeled: List[dict], unlabeled: List[dict]) -> SemiStep:
        student = self.student
        images_l = student.normalize(self._stack(labeled, "image"))
        targets = self._stack(labeled, "sem_seg", torch.long)
        burn_in = self.in_burn_in()
        common = dict(
            iteration=self.iteration,
            max_iter=self.max_iter,
            burn_in_iters=self.burn_in_iters,
            num_classes=self.num_classes,
            ignore_value=self.ignore_value,
            labeled_images=images_l,
            labeled_targets=targets,
            supervised_losses=student.losses,
            labeled_datasets=[x.get("dataset_name") for x in labeled],
            student_decode=getattr(student.sem_seg_head, "decode", None),
        )
        if burn_in:
            return SemiStep(student_labeled=student.extract(images_l), burn_in=True, **common)

        valid = self._stack(unlabeled, "valid", torch.bool)
        weak = student.normalize(self._stack(unlabeled, "image"))
        strong = student.normalize(self._stack(unlabeled, "image_strong"))
        teacher_labeled = {}
        if self.teacher_labeled:
            # One teacher pass over both (eval-mode BN: batching does not change the result).
            valid_l = torch.ones_like(targets, dtype=torch.bool)
            both = self._teacher_outputs(torch.cat([weak, images_l]), torch.cat([valid, valid_l]))
            teacher_weak, teacher_labeled = split_outputs(both, [weak.shape[0], images_l.shape[0]])
        else:
            teacher_weak = self._teacher_outputs(weak, valid)

        bu = weak.shape[0]
        partner = shifted_partner_index(bu, device=weak.device)
        mask = self._mix_masks(teacher_weak["pseudo_label"], partner)
        strong = mix(strong, mask, partner)
        teacher_strong = {
            k: mix(teacher_weak[k], mask, partner)
            for k in ("probs", "confidence", "pseudo_label", "entropy", "valid")
        }

        parts = [images_l, strong] + ([weak] if self.student_weak else [])
        outputs = student.extract(torch.cat(parts))
        split = split_outputs(outputs, [p.shape[0] for p in parts])
        return SemiStep(
            student_labeled=split[0],
            student_strong=split[1],
            student_weak=split[2] if self.student_weak else {},
            teacher_weak=teacher_weak,
            teacher_strong=teacher_strong,
            teacher_labeled=teacher_labeled,
            unlabeled_valid=valid,
            mix_mask=mask,
            mix_partner=partner,
            weak_images=weak,
            strong_images=strong,
            **common,
        )
