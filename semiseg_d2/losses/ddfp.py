"""DDFP (Wang et al., CVPR 2024): density-descending feature perturbation with an online normalizing flow.

Paper -> code map and deviations: docs/methods/ddfp.md. Pieces:
  - :func:`density_descending_perturbation` (pure): one normalised gradient-ascent step on the flow's
    marginal NLL of the decoder features, taken w.r.t. the 304-d decoder input (eq. "delta = eps * g / |g|").
  - :func:`flow_nll` / :func:`sample_pixels` / :func:`gather_pixels` (pure): the flow's training objective
    on a random subset of teacher pixel features.
  - :class:`DDFPTerm` (``ddfp``): the loss term. ``forward`` perturbs the strong (mixed) views' decoder input,
    re-decodes it with a separate BN set and returns the CE against the teacher's pseudo-labels;
    ``update`` (after the model's optimizer step) trains the flow with its own Adam optimizer.
The Adam state is written into the module's state dict (fixed-shape tensors), so any checkpoint of the
model carries it.
"""
import logging
import math
from typing import Callable, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.utils import comm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.utils.logger import log_every_n_seconds
from torch import nn

from ..layers.flow import CouplingFlow
from ..utils.dtype import upcast
from .pseudo_label import pseudo_label_cross_entropy, threshold_keep_mask
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

logger = logging.getLogger(__name__)

_FLOW_TARGETS = ("mixture", "pseudo_label")
_NORMALIZE = ("all", "kept")
_OPT_PREFIX = "flow_optimizer."
_OPT_FIELDS = ("exp_avg", "exp_avg_sq", "step")


def _check_dim(flow_dim: int, feat_dim: int, where: str) -> None:
    if feat_dim != flow_dim:
        raise ValueError(
            f"SEMI.DDFP: {where} are {feat_dim}-d but the flow models {flow_dim}-d features "
            f"(the flow is built with MODEL.SEM_SEG_HEAD.CONVS_DIM)"
        )


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest resize of ``mask bool/long [B,H,W]`` to ``size`` (the reference resizes labels this way)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    out = F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return out.to(mask.dtype)


def density_descending_perturbation(
    decode_features: Callable[[torch.Tensor], torch.Tensor],
    flow: CouplingFlow,
    decoder_input: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """One step from ``decoder_input`` towards LOWER density of the decoded features.

    L = sum over ``mask`` pixels of -log p(f(x)) (the flow's marginal density, as the reference attack),
    delta = eps * dL/dx / ||dL/dx||_2 per pixel (L2 over the channels of each pixel).

    Args:
        decode_features: x [B,Cin,h,w] -> features [B,D,h,w] (the decoder convs; gradient must reach x).
        flow: density model of D-d features; its parameters get no gradient from this call.
        decoder_input: [B,Cin,h,w] (Cin = 304 for DeepLabV3+); treated as a constant (detached).
        mask: [B,h,w] bool, pixels whose NLL is ascended (confident pseudo-labels).
        eps: L2 norm of each pixel's perturbation.
    Returns:
        delta [B,Cin,h,w] detached, dtype of ``decoder_input``; ||delta[b,:,i,j]|| = eps wherever the gradient
        is non-zero, 0 where it is zero or non-finite (a diverged flow never poisons the student).
    """
    with torch.enable_grad():
        x = decoder_input.detach().requires_grad_(True)
        feats = decode_features(x)
        _check_dim(flow.dim, feats.shape[1], "perturbed decoder features")
        flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        keep = mask.reshape(-1)
        if flat.device.type == "cpu":
            # The flow is per pixel: only the masked rows' NLL enters L, so only they go through the flow (their
            # count is free to read on a CPU; a GPU would sync on it, so there every row is evaluated and masked).
            nll = -flow.log_prob(flat[keep.nonzero().squeeze(1)]).sum()
        else:
            nll = -flow.log_prob(flat)
            # where, not multiply: a non-finite NLL outside the mask must not reach the gradient
            nll = torch.where(keep, nll, torch.zeros_like(nll)).sum()
        (grad,) = torch.autograd.grad(nll, x)
    direction = F.normalize(upcast(grad), p=2, dim=1, eps=1e-12)
    finite = torch.isfinite(direction).all(dim=1, keepdim=True)
    delta = torch.where(finite, direction * eps, torch.zeros_like(direction))
    return delta.to(decoder_input.dtype)


def sample_pixels(valid: torch.Tensor, num: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num`` distinct random positions among the True entries of ``valid [N] bool``, without a
    host sync: returns ``(index [k] long, keep [k] bool)`` with k = min(num, N); ``keep`` is False for the
    positions drawn beyond the number of valid entries."""
    k = min(int(num), valid.numel())
    scores = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    index = torch.topk(scores, k, largest=False, sorted=False).indices
    return index, valid[index]


def gather_pixels(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``feats [B,D,h,w]``, ``index [k]`` into the flattened ``B*h*w`` pixels -> ``[k, D]`` (no full copy)."""
    hw = feats.shape[2] * feats.shape[3]
    return feats.flatten(2)[index // hw, :, index % hw]


def flow_nll(flow: CouplingFlow, feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean NLL of the flow's training objective (fp32).

    feats: [N, D]; labels: [N] long, a class id (class-conditional density, labeled pixels) or -1
    (marginal = mixture density, unlabeled pixels); weight: [N] float (0 = not counted). Returns [].
    """
    lp = flow.class_log_prob(feats)
    marginal = torch.logsumexp(lp, dim=1) - math.log(flow.num_classes)
    conditional = lp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    ll = torch.where(labels >= 0, conditional, marginal)
    w = upcast(weight)
    ll = torch.where(w > 0, ll, torch.zeros_like(ll))
    return -(ll * w).sum() / w.sum().clamp_min(1.0)


@SEMI_LOSS_REGISTRY.register_term
class DDFPTerm(SemiLossTerm):
    """``ddfp``: CE of the student on density-descending perturbed decoder inputs of the strong views.

    Needs a head with ``decoder_input`` / ``decode`` (U2PLDeepLabV3PlusHead, DeepLabV3PlusFeatHead, DPTHead). Owns the flow, its Adam
    optimizer (``params_with_own_optimizer``) and, with ``perturbed_bn``, the BN set of the perturbed pass.
    Buffers: ``flow_skipped`` counts flow steps skipped for a non-finite loss/gradient, ``flow_nll`` the
    last flow loss (both logged as ``ddfp/*`` metrics).
    """

    name = "ddfp"
    # Flow training uses teacher features of the labeled images (reference: teacher on cat(labeled, weak)).
    needs_teacher_labeled = True

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        ignore_value: int = 255,
        weight: float = 0.5,
        threshold: float = 0.95,
        normalize: str = "kept",
        eps: float = 4.0,
        perturbed_bn: bool = True,
        norm: str = "BN",
        decoder_norms: int = 2,
        start_iter: int = 0,
        flow_start_iter: int = 0,
        flow_blocks: int = 2,
        flow_hidden: Sequence[int] = (256, 256),
        flow_clamp: float = 2.0,
        flow_seed: int = 0,
        flow_lr: float = 1e-3,
        flow_betas: Sequence[float] = (0.5, 0.9),
        flow_lr_end_factor: float = 0.01,
        flow_grad_clip: float = 50.0,
        flow_samples: int = 20480,
        flow_noise: float = 0.05,
        flow_unlabeled_target: str = "mixture",
    ):
        super().__init__()
        if flow_unlabeled_target not in _FLOW_TARGETS:
            raise ValueError(
                f"SEMI.DDFP.FLOW_UNLABELED_TARGET: unknown '{flow_unlabeled_target}'; known: {', '.join(_FLOW_TARGETS)}"
            )
        if normalize not in _NORMALIZE:
            raise ValueError(f"SEMI.DDFP.NORMALIZE: unknown '{normalize}'; known: {', '.join(_NORMALIZE)}")
        if len(flow_betas) != 2:
            raise ValueError(f"SEMI.DDFP.FLOW_BETAS: two values expected, got {list(flow_betas)}")
        self.ignore_value = ignore_value
        self.weight = weight
        self.threshold = threshold
        self.normalize = normalize
        self.eps = eps
        self.start_iter = start_iter
        self.flow_start_iter = flow_start_iter
        self.flow_lr = flow_lr
        self.flow_lr_end_factor = flow_lr_end_factor
        self.flow_grad_clip = flow_grad_clip
        self.flow_samples = flow_samples
        self.flow_noise = flow_noise
        self.flow_unlabeled_target = flow_unlabeled_target
        self.flow = CouplingFlow(
            dim=feature_dim, num_classes=num_classes, n_blocks=flow_blocks, hidden=tuple(flow_hidden),
            clamp=flow_clamp, seed=flow_seed,
        )
        # The reference's MixSyncBatchNorm "aux" statistics: perturbed features get their own BN in the
        # decoder blocks (one per norm of the head's decode); evaluation and the clean passes never see them.
        self.perturbed_norms = (
            nn.ModuleList([get_norm(norm, feature_dim) or nn.Identity() for _ in range(decoder_norms)])
            if perturbed_bn else None
        )
        self._flow_params = list(self.flow.parameters())
        self.flow_optimizer = torch.optim.Adam(self._flow_params, lr=flow_lr, betas=tuple(flow_betas))
        self.register_buffer("flow_skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("flow_nll", torch.zeros(()))

    @classmethod
    def from_config(cls, cfg):
        c = cfg.SEMI.DDFP
        head = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            num_classes=head.NUM_CLASSES,
            feature_dim=head.CONVS_DIM,
            ignore_value=head.IGNORE_VALUE,
            weight=c.WEIGHT,
            threshold=c.THRESHOLD,
            normalize=c.NORMALIZE,
            eps=c.EPS,
            perturbed_bn=c.PERTURBED_BN,
            norm=head.NORM,
            # the head's decode() norms (DeepLabV3+: 2 decoder convs, DPT: 1); the perturbed set mirrors them
            decoder_norms=getattr(SEM_SEG_HEADS_REGISTRY.get(head.NAME), "num_decoder_norms", 2),
            start_iter=c.START_ITER,
            flow_start_iter=c.FLOW_START_ITER,
            flow_blocks=c.FLOW_BLOCKS,
            flow_hidden=c.FLOW_HIDDEN,
            flow_clamp=c.FLOW_CLAMP,
            flow_seed=c.FLOW_SEED,
            flow_lr=c.FLOW_LR,
            flow_betas=c.FLOW_BETAS,
            flow_lr_end_factor=c.FLOW_LR_END_FACTOR,
            flow_grad_clip=c.FLOW_GRAD_CLIP,
            flow_samples=c.FLOW_SAMPLES,
            flow_noise=c.FLOW_NOISE,
            flow_unlabeled_target=c.FLOW_UNLABELED_TARGET,
        )

    def params_with_own_optimizer(self):
        return list(self._flow_params)

    # ------------------------------------------------------------------ loss
    def _decoder(self, step):
        dec_in = step.student_strong.get("decoder_input")
        if dec_in is None or step.student_decode is None:
            raise ValueError(
                "SEMI.LOSSES 'ddfp' perturbs the decoder input: it needs MODEL.SEM_SEG_HEAD.NAME "
                "'U2PLDeepLabV3PlusHead' (the reference's decoder), 'DeepLabV3PlusFeatHead' or 'DPTHead' (head "
                "outputs 'decoder_input' and a decode() method)"
            )
        head = getattr(step.student_decode, "__self__", None)
        if self.perturbed_norms is not None and head is not None:
            if len(head.decoder_norms) != len(self.perturbed_norms):
                raise ValueError(
                    f"SEMI.DDFP.PERTURBED_BN: the head has {len(head.decoder_norms)} decoder norms, the term "
                    f"{len(self.perturbed_norms)}"
                )
        return dec_in

    def forward(self, step):
        self.log_flow_state(step)
        t = step.teacher_strong
        logits = step.student_strong["logits"]
        if step.iteration < self.start_iter:
            return {"loss_ddfp": logits.new_zeros(())}
        dec_in = self._decoder(step)
        keep = threshold_keep_mask(t["confidence"], t["valid"], self.threshold)
        norms = self.perturbed_norms

        def decode_features(x):
            return step.student_decode(x, norms=norms)[0]

        delta = density_descending_perturbation(
            decode_features, self.flow, dec_in, resize_mask(keep, dec_in.shape[-2:]), self.eps
        )
        # The clean decoder input keeps its graph: the perturbed branch also trains the encoder (reference).
        _, logits_p = step.student_decode(dec_in + delta, norms=norms)
        loss = pseudo_label_cross_entropy(logits_p, t["pseudo_label"], keep, t["valid"], normalize=self.normalize)
        return {"loss_ddfp": loss * self.weight}

    def log_flow_state(self, step) -> None:
        step.log("ddfp/flow_nll", self.flow_nll)
        step.log("ddfp/flow_skipped", self.flow_skipped)

    # ------------------------------------------------------------------ flow training
    def flow_batch(self, step) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled teacher pixel features of labeled (class-conditional on GT) and weak unlabeled views
        (marginal, or class-conditional on confident pseudo-labels): ``(feats [k,D], labels [k], weight [k])``."""
        teacher_labeled = getattr(step, "teacher_labeled", None) or {}
        feats_l = teacher_labeled.get("features")
        if feats_l is None:
            # Until the engine provides teacher outputs on labeled images: the student's (detached) features.
            feats_l = step.student_labeled["features"]
        feats_u = step.teacher_weak["features"]
        feats_l, feats_u = feats_l.detach(), feats_u.detach()
        _check_dim(self.flow.dim, feats_l.shape[1], "labeled features")
        _check_dim(self.flow.dim, feats_u.shape[1], "unlabeled teacher features")

        labels_l = resize_mask(step.labeled_targets, feats_l.shape[-2:])
        valid_l = labels_l != self.ignore_value
        tw = step.teacher_weak
        if self.flow_unlabeled_target == "mixture":
            valid_u = resize_mask(tw["valid"], feats_u.shape[-2:])
            labels_u = torch.full_like(valid_u, -1, dtype=torch.long)
        else:
            keep = threshold_keep_mask(tw["confidence"], tw["valid"], self.threshold)
            valid_u = resize_mask(keep, feats_u.shape[-2:])
            labels_u = resize_mask(tw["pseudo_label"], feats_u.shape[-2:])
        labels = torch.cat([labels_l.flatten(), labels_u.flatten()])
        labels = torch.where(labels == self.ignore_value, torch.full_like(labels, -1), labels)
        valid = torch.cat([valid_l.flatten(), valid_u.flatten()])

        index, weight = sample_pixels(valid, self.flow_samples)
        n_l = valid_l.numel()
        from_l = index < n_l
        x_l = gather_pixels(feats_l, index.clamp_max(n_l - 1)) if n_l else None
        x_u = gather_pixels(feats_u, (index - n_l).clamp_min(0))
        x = x_u if x_l is None else torch.where(from_l[:, None], x_l, x_u)
        x = upcast(x)
        if self.flow_noise > 0:
            x = x + self.flow_noise * torch.randn_like(x)
        return x, labels[index], weight.float()

    def _all_reduce_grads(self, grads, loss):
        """Average flow gradients (and the loss) over ranks, in one flat buffer (DDP does not: the flow
        is trained outside the model's backward)."""
        world = comm.get_world_size()
        if world == 1:
            return grads, loss
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        dist.all_reduce(flat)
        flat /= world
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return out, flat[-1]

    def update(self, step) -> None:
        if step.iteration < self.flow_start_iter:
            return
        lr = self.flow_lr * self.flow_lr_end_factor ** step.progress
        for group in self.flow_optimizer.param_groups:
            group["lr"] = lr
        with torch.enable_grad(), torch.autocast(step.labeled_images.device.type, enabled=False):
            x, labels, weight = self.flow_batch(step)
            loss = flow_nll(self.flow, x, labels, weight)
            grads = torch.autograd.grad(loss, self._flow_params)
        grads, loss = self._all_reduce_grads(grads, loss.detach())
        for p, g in zip(self._flow_params, grads):
            p.grad = g
        if self.flow_grad_clip > 0:
            total = torch.nn.utils.clip_grad_norm_(self._flow_params, self.flow_grad_clip)
        else:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # The term's one host sync: a non-finite flow loss/gradient (e.g. log-det overflow) skips the flow
        # step instead of writing NaN into the flow (and, through the next perturbation, the student).
        # Identical on every rank (reduced values), so ranks stay in step.
        if not bool(torch.isfinite(total) & torch.isfinite(loss)):
            self.flow_skipped += 1
            log_every_n_seconds(
                logging.WARNING,
                f"SEMI.DDFP: non-finite flow loss/gradient at iteration {step.iteration}; flow step skipped "
                f"({int(self.flow_skipped)} skipped so far)",
                n=60,
                name=__name__,
            )
        else:
            self.flow_optimizer.step()
            self.flow_nll.copy_(loss)
        for p in self._flow_params:
            p.grad = None

    # ------------------------------------------------------------------ checkpointing of the Adam state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Fixed shapes whatever the optimizer has done (zeros before its first step), so detectron2's
        # shape-checking checkpointer and strict loading treat them like any buffer.
        for i, p in enumerate(self._flow_params):
            state = self.flow_optimizer.state.get(p, {})
            destination[f"{prefix}{_OPT_PREFIX}exp_avg.{i}"] = state.get("exp_avg", torch.zeros_like(p)).detach()
            destination[f"{prefix}{_OPT_PREFIX}exp_avg_sq.{i}"] = state.get(
                "exp_avg_sq", torch.zeros_like(p)
            ).detach()
            destination[f"{prefix}{_OPT_PREFIX}step.{i}"] = state.get("step", torch.zeros(())).detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        opt_prefix = prefix + _OPT_PREFIX
        rest = {k: v for k, v in state_dict.items() if not k.startswith(opt_prefix)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        new_state = {}
        for i, p in enumerate(self._flow_params):
            keys = {f: f"{opt_prefix}{f}.{i}" for f in _OPT_FIELDS}
            absent = [k for k in keys.values() if k not in state_dict]
            if absent:
                missing_keys.extend(absent)
                continue
            avg, avg_sq, step = (state_dict[keys[f]] for f in _OPT_FIELDS)
            if avg.shape != p.shape or avg_sq.shape != p.shape:
                error_msgs.append(
                    f"{keys['exp_avg']}: Adam state of shape {tuple(avg.shape)}, flow parameter {tuple(p.shape)}"
                )
                continue
            step = step.detach().to("cpu", torch.float32).clone().reshape(())
            if float(step) > 0:  # a never-stepped optimizer has an empty state
                new_state[p] = {
                    "step": step,
                    "exp_avg": avg.detach().to(p.device, p.dtype).clone(),
                    "exp_avg_sq": avg_sq.detach().to(p.device, p.dtype).clone(),
                }
        for k in state_dict:
            if k.startswith(opt_prefix):
                field_name, _, idx = k[len(opt_prefix):].rpartition(".")
                if field_name not in _OPT_FIELDS or not idx.isdigit() or int(idx) >= len(self._flow_params):
                    unexpected_keys.append(k)
        self.flow_optimizer.state.clear()
        self.flow_optimizer.state.update(new_state)
