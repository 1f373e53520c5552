"""SemiSegmentor: a student Segmentor, its EMA teacher and the configured loss terms.

One training step (docs/architecture.md):
  1. teacher (eval-mode BN, no autograd, fp32) on the weak unlabeled views -> probabilities, pseudo-labels,
     confidence, entropy, features (``SEMI.TEACHER_TRAIN_MODE``: train-mode BN and dropout on cat(weak, labeled),
     the official DGCL/DDFP computation; ``SEMI.TEACHER_AUTOCAST``: under the run's autocast);
  2. mixing masks (CutMix / ClassMix) applied to the strong views and to the teacher maps alike;
  3. the student runs ONCE on cat(labeled, strong[, weak]) and its outputs are split per part;
  4. each loss term reads the SemiStep record and returns named, weighted losses.
With ``SEMI.TEACHER_MODE "student"`` (UniMatch V1: no EMA copy) steps 1 and 3 become two student passes:
  1'. the student (train-mode BN, with autograd) on cat(labeled, weak); its weak outputs, detached, are the
      teacher maps of the weak views; the maps pasted in from the mixing partners come from a separate
      no-grad pass of the student in eval mode (BN running statistics) on the weak views, as UniMatch
      predicts its mixing partners with ``model.eval()``;
  3'. the student (train-mode BN) on the mixed strong views.
With ``SEMI.TEACHER_MODE "student"`` AND ``SEMI.TEACHER_TRAIN_MODE`` (the official DDFP, whose "EMA teacher" aliases
the student's parameters) step 1 is a no-grad train-mode pass of the student on cat(weak, labeled) (running
statistics untouched) and step 3 is the default single student pass.
After the optimizer step the trainer calls :meth:`after_optimizer_step` (stateful terms update their
memory banks / flows); the EMA hook then updates the teacher. The task-agnostic half (teacher copy, burn-in,
running the terms, metrics, state updates) is :class:`TeacherStudent`, shared with projects/SemiInstance.
Every ``SEMI.VIS_PERIOD`` iterations (``storage.iter % period == 0``, main process) forward also puts pictures of the
step into detectron2's event storage (:meth:`SemiSegmentor.visualize_training`, as ``GeneralizedRCNN`` does);
detectron2's ``TensorboardXWriter`` writes them.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from ...config import check_semiseg_config, check_teacher_mode
from ...evaluation.pseudo_label_diagnostics import PseudoLabelDiagnostics
from ...layers.label_ops import softmax_entropy
from ...layers.perturbation import (
    classmix_masks,
    complementary_channel_masks,
    cutmix_masks,
    mix,
    shifted_partner_index,
)
from ...losses.registry import build_loss_terms
from ...losses.step import SemiStep
from ...utils.dtype import upcast
from ...utils.profiling import scope
from ...utils.visualizer import denormalize, semi_step_pictures
from .segmentor import Segmentor
from .teacher_student import TeacherStudent

_MIX_TYPES = ("none", "cutmix", "classmix")


@contextmanager
def eval_mode(network: nn.Module):
    """``network`` in eval mode, its previous mode restored on exit."""
    was_training = network.training
    network.eval()
    try:
        yield network
    finally:
        network.train(was_training)


@contextmanager
def batch_statistics_mode(network: nn.Module):
    """``network`` in train mode (BN normalises with batch statistics, dropout is on) without touching its BN
    running statistics; its previous mode restored on exit. For the official DGCL / DDFP teacher forward."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was_training = network.training
    network.train()
    for m in norms:
        m.track_running_stats = False  # train mode + no tracking: batch statistics, buffers left as they are
    try:
        yield network
    finally:
        for m in norms:
            m.track_running_stats = True
        network.train(was_training)


def split_outputs(outputs: Dict[str, torch.Tensor], sizes: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
    """Split every batch-first tensor of a head's output dict into parts of ``sizes``."""
    parts = [dict() for _ in sizes]
    for key, value in outputs.items():
        if value is None:
            continue
        for part, chunk in zip(parts, torch.split(value, list(sizes), dim=0)):
            part[key] = chunk
    return parts


def _diagnostics_from_config(cfg) -> Optional[PseudoLabelDiagnostics]:
    if not cfg.SEMI.DIAGNOSTICS.ENABLED:
        return None
    names = list(cfg.DATASETS.TRAIN_UNLABELED) or list(cfg.SEMI.DIAGNOSTICS.GT_DATASETS)
    if not names:
        raise ValueError("SEMI.DIAGNOSTICS.ENABLED: DATASETS.TRAIN_UNLABELED is empty (the class names come from it)")
    return PseudoLabelDiagnostics(
        MetadataCatalog.get(names[0]).stuff_classes, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, cfg.SEMI.DIAGNOSTICS.WINDOW
    )


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
        teacher_autocast: bool = False,
        teacher_train_mode: bool = False,
        teacher_mode: str = "ema",
        diagnostics: Optional[PseudoLabelDiagnostics] = None,
        eval_network: str = "teacher",
        vis_period: int = 0,
        vis_dataset: Optional[str] = None,
        vis_images: int = 2,
        vis_max_size: int = 320,
    ):
        if mix_type not in _MIX_TYPES:
            raise ValueError(f"SEMI.MIX.TYPE: unknown '{mix_type}'; known: {', '.join(_MIX_TYPES)}")
        super().__init__(student, terms, max_iter, burn_in_iters, teacher_mode, eval_network)
        self.mix_type = mix_type
        self.mix_prob = mix_prob
        self.cutmix_area = tuple(cutmix_area)
        self.cutmix_ratio = tuple(cutmix_ratio)
        self.student_weak = student_weak or any(t.needs_student_weak for t in terms.values())
        self.second_strong = any(t.needs_second_strong for t in terms.values())
        self.fp_dropout = max([float(t.feature_dropout) for t in terms.values()] + [0.0])
        comp = [t.complementary_dropout for t in terms.values() if t.complementary_dropout is not None]
        if comp and not self.second_strong:
            raise ValueError("complementary dropout (SEMI.UNIMATCH_V2) needs the second strong stream")
        self.comp_unperturbed = comp[0] if comp else None  # UniMatch V2: fraction of unperturbed pairs
        self.teacher_labeled = any(t.needs_teacher_labeled for t in terms.values())
        self.teacher_autocast = teacher_autocast
        self.teacher_train_mode = teacher_train_mode
        self.diagnostics = diagnostics  # SEMI.DIAGNOSTICS: pseudo-label quality against unread ground truth
        if vis_period < 0:
            raise ValueError(f"SEMI.VIS_PERIOD must be >= 0 (0 = off), got {vis_period}")
        if vis_images < 1:
            raise ValueError(f"SemiSegmentor: vis_images must be >= 1, got {vis_images}")
        self.vis_period = vis_period  # SEMI.VIS_PERIOD: pictures from forward every N iterations (0 = off)
        # The labeled training set whose stuff_colors the pictures use, looked up when a picture is drawn: building
        # the model for inference needs no registered training set.
        self.vis_dataset = vis_dataset
        self.vis_images = vis_images  # images per part shown
        self.vis_max_size = vis_max_size  # longer side of a panel, larger crops are shrunk

    @classmethod
    def from_config(cls, cfg):
        check_semiseg_config(cfg)
        check_teacher_mode(cfg)
        m = cfg.SEMI.MIX
        student = Segmentor(cfg)
        return dict(
            student=student,
            # built from the spec of the built student's head (widths, decode), as detectron2 builds a head from
            # the ShapeSpec of its input
            terms=build_loss_terms(cfg, student.sem_seg_head.spec()),
            max_iter=cfg.SOLVER.MAX_ITER,
            burn_in_iters=cfg.SEMI.BURN_IN_ITERS,
            mix_type=m.TYPE,
            mix_prob=m.PROB,
            cutmix_area=m.CUTMIX_AREA,
            cutmix_ratio=m.CUTMIX_RATIO,
            student_weak=cfg.SEMI.STUDENT_WEAK,
            teacher_autocast=cfg.SEMI.TEACHER_AUTOCAST,
            teacher_train_mode=cfg.SEMI.TEACHER_TRAIN_MODE,
            teacher_mode=cfg.SEMI.TEACHER_MODE,
            diagnostics=_diagnostics_from_config(cfg),
            eval_network=cfg.SEMI.WEIGHTS_FOR_EXPORT,
            vis_period=cfg.SEMI.VIS_PERIOD,
            vis_dataset=next(iter(cfg.DATASETS.TRAIN_LABELED or cfg.DATASETS.TRAIN), None),
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
        if self.diagnostics is not None and not step.burn_in:
            step.metrics.update(self.diagnostics(step, self.diagnostics.ground_truth(unlabeled, step, self.device)))
        if self.vis_period > 0 and comm.is_main_process():
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:  # detectron2's VIS_PERIOD convention: iteration 0 shows the start
                self.visualize_training(step)
        return losses

    @torch.no_grad()
    def visualize_training(self, step: SemiStep) -> None:
        """Put the pictures of ``step`` (:func:`semi_step_pictures` of :meth:`vis_summary`: tags ``semi/labeled``,
        and after burn-in ``semi/pseudo_label`` and ``semi/strong``) into the event storage as ``uint8 [3,H,W]``."""
        meta = MetadataCatalog.get(self.vis_dataset) if self.vis_dataset else None
        if meta is None or not meta.get("stuff_colors"):
            raise ValueError(
                f"SEMI.VIS_PERIOD={self.vis_period} colours label maps with the stuff_colors of the first labeled "
                f"training set, MetadataCatalog.get({self.vis_dataset!r}), which has none: set them when registering "
                "the dataset, or SEMI.VIS_PERIOD 0"
            )
        storage = get_event_storage()
        record = self.vis_summary(step, self.vis_images)
        for tag, picture in semi_step_pictures(record, meta, self.vis_max_size).items():
            storage.put_image(tag, picture.transpose(2, 0, 1))

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

    @scope("teacher")
    @torch.no_grad()
    def _teacher_outputs(self, images: torch.Tensor, valid: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Teacher on normalised images -> fp32 maps at crop resolution + head outputs (one pass).
        ``SEMI.TEACHER_MODE "student"``: the student's own weights stand in for it.

        In fp32 unless ``teacher_autocast`` (every official code pseudo-labels in fp32); with eval-mode BN unless
        ``teacher_train_mode`` (batch statistics of ``images``, dropout on, running statistics untouched)."""
        precision = nullcontext() if self.teacher_autocast else torch.autocast(images.device.type, enabled=False)
        network = self.teacher if self.teacher is not None else self.student
        mode = batch_statistics_mode if self.teacher_train_mode else eval_mode
        role = scope("student") if network is self.student else nullcontext()  # the student's pass, named as such
        with torch.inference_mode(), precision, mode(network), role:
            out = network.extract(images)
        # Leave inference mode: terms use these as targets of autograd ops.
        return self._teacher_maps({k: v.clone() for k, v in out.items() if v is not None}, images, valid)

    @torch.no_grad()
    def _teacher_maps(self, out: Dict[str, torch.Tensor], images: torch.Tensor, valid: torch.Tensor):
        """Head outputs (detached) -> fp32 (or float64) copies + ``probs``/``confidence``/``pseudo_label``/``entropy``/
        ``valid`` at crop resolution (pseudo-labels are ``ignore_value`` where not ``valid``)."""
        out = {k: upcast(v.detach()) for k, v in out.items() if v is not None}
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
        )
        if burn_in:
            with scope("student"):
                student_labeled = student.extract(images_l)
            return SemiStep(student_labeled=student_labeled, burn_in=True, **common)

        valid = self._stack(unlabeled, "valid", torch.bool)
        weak = student.normalize(self._stack(unlabeled, "image"))
        strong = student.normalize(self._stack(unlabeled, "image_strong"))
        teacher_labeled, first = {}, None
        if self.teacher_mode == "student" and not self.teacher_train_mode:
            # UniMatch V1 (no EMA copy). First the eval-mode pass: it sees the BN running statistics of before
            # this step's train-mode passes update them, as UniMatch's model.eval() on its mix batch.
            partners = self._teacher_outputs(weak, valid)
            first = self._weak_pass(images_l, weak)
            own = self._teacher_maps(first[1], weak, valid)
            if self.teacher_labeled:
                valid_l = torch.ones_like(targets, dtype=torch.bool)
                teacher_labeled = self._teacher_maps(first[0], images_l, valid_l)
        elif self.teacher_labeled or self.teacher_train_mode:
            # One teacher pass over both: with eval-mode BN batching does not change the result; in train mode
            # the batch statistics come from labeled + unlabeled images, as in the official DGCL / DDFP codes
            # (with TEACHER_MODE "student" this no-grad pass of the student is the official DDFP "teacher").
            valid_l = torch.ones_like(targets, dtype=torch.bool)
            both = self._teacher_outputs(torch.cat([weak, images_l]), torch.cat([valid, valid_l]))
            own, teacher_labeled = split_outputs(both, [weak.shape[0], images_l.shape[0]])
            partners = own
        else:
            own = partners = self._teacher_outputs(weak, valid)

        partner = shifted_partner_index(weak.shape[0], device=weak.device)
        mask, strong, teacher_strong = self._mix_stream(strong, own, partners, partner)
        stream2 = dict(strong_images2=None, student_strong2={}, teacher_strong2={}, mix_mask2=None)
        strongs = [strong]
        if self.second_strong:
            # Its own photometric draw (mapper) and its own CutMix boxes; the same partner images (UniMatch).
            mask2, strong2, teacher_strong2 = self._mix_stream(self._strong2(unlabeled), own, partners, partner)
            stream2.update(strong_images2=strong2, teacher_strong2=teacher_strong2, mix_mask2=mask2)
            strongs.append(strong2)

        weak_fp = {}
        if first is None and not self.fp_dropout:
            # One student pass over every part (the default engine).
            parts = [images_l, *strongs] + ([weak] if self.student_weak else [])
            scale = self._channel_scale([p.shape[0] for p in parts], start=1, device=weak.device)
            split = split_outputs(self._extract(torch.cat(parts), scale), [p.shape[0] for p in parts])
            student_labeled, student_weak = split[0], split[-1] if self.student_weak else {}
            student_strongs = split[1 : 1 + len(strongs)]
        else:
            # UniMatch's two passes: cat(labeled, weak) (with the fp stream), then the strong views.
            if first is None:
                first = self._weak_pass(images_l, weak)
            student_labeled, student_weak, weak_fp = first
            scale = self._channel_scale([x.shape[0] for x in strongs], start=0, device=weak.device)
            student_strongs = split_outputs(self._extract(torch.cat(strongs), scale), [x.shape[0] for x in strongs])
        if self.second_strong:
            stream2["student_strong2"] = student_strongs[1]
        return SemiStep(
            student_labeled=student_labeled,
            student_strong=student_strongs[0],
            student_weak=student_weak,
            student_weak_fp=weak_fp,
            teacher_weak=own,
            teacher_strong=teacher_strong,
            teacher_labeled=teacher_labeled,
            unlabeled_valid=valid,
            mix_mask=mask,
            mix_partner=partner,
            weak_images=weak,
            strong_images=strong,
            **stream2,
            **common,
        )

    @scope("student")
    def _extract(self, images: torch.Tensor, channel_scale):
        """The student on ``images``, with UniMatch V2's channel scales when there are any."""
        if channel_scale is None:
            return self.student.extract(images)
        return self.student.extract(images, channel_scale=channel_scale)

    def _channel_scale(self, sizes: Sequence[int], start: int, device):
        """``[sum(sizes), D]`` channel scales for one student batch whose parts ``start`` and ``start + 1`` are the
        two strong streams (UniMatch V2's complementary masks; 1 elsewhere), or None without that dropout."""
        if self.comp_unperturbed is None:
            return None
        channels = {s.channels for s in self.student.backbone.output_shape().values()}
        if len(channels) != 1:
            raise ValueError(f"complementary dropout needs backbone outputs of one width, got {sorted(channels)}")
        d = channels.pop()
        scale = torch.ones(sum(sizes), d, device=device)
        lo = sum(sizes[:start])
        scale[lo : lo + 2 * sizes[start]] = complementary_channel_masks(
            sizes[start], d, self.comp_unperturbed, device=device
        )
        return scale

    def _strong2(self, unlabeled: List[dict]) -> torch.Tensor:
        if any("image_strong2" not in u for u in unlabeled):
            raise KeyError(
                "a SEMI.LOSSES term needs a second strong view (needs_second_strong) but an unlabeled record has no "
                "'image_strong2': build the loader with UnlabeledDatasetMapper(cfg) (it makes one for such terms)"
            )
        return self.student.normalize(self._stack(unlabeled, "image_strong2"))

    def _weak_pass(self, images_l: torch.Tensor, weak: torch.Tensor):
        """The student (train mode) on cat(labeled, weak) -> ``(labeled, weak, weak_fp)`` output dicts;
        ``weak_fp`` (with ``fp_dropout``) decodes the perturbed backbone features in the same head batch."""
        sizes = [images_l.shape[0], weak.shape[0]]
        if not self.fp_dropout:
            with scope("student"):
                out = self.student.extract(torch.cat([images_l, weak]))
            labeled, weak_out = split_outputs(out, sizes)
            return labeled, weak_out, {}
        with scope("student_fp"):
            clean, perturbed = self.student.extract_fp(torch.cat([images_l, weak]), self.fp_dropout)
        labeled, weak_out = split_outputs(clean, sizes)
        return labeled, weak_out, split_outputs(perturbed, sizes)[1]

    def _mix_stream(self, strong: torch.Tensor, own: Dict[str, torch.Tensor], partners: Dict[str, torch.Tensor],
                    partner: torch.Tensor):
        """Draw one stream's mixing masks and mix its strong images and the teacher maps alike: pixels inside a
        mask come from the partner image (its strong view; its maps in ``partners``), the rest from ``own``.
        Returns ``(mask, mixed strong, teacher maps of the stream)``."""
        mask = self._mix_masks(partners["pseudo_label"], partner)
        maps = {
            k: mix(own[k], mask, partner, source=partners[k])
            for k in ("probs", "confidence", "pseudo_label", "entropy", "valid")
        }
        return mask, mix(strong, mask, partner), maps
