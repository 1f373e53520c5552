"""DDFP (Wang et al., CVPR 2024): density-descending feature perturbation with an online normalizing flow.

Paper -> code map and deviations: docs/methods/ddfp.md. Pieces:
  - :func:`density_descending_perturbation` (pure): one normalised gradient-ascent step on the flow's
    marginal NLL of the decoder features, taken w.r.t. the 304-d decoder input (eq. "delta = eps * g / |g|").
  - :func:`flow_nll` / :func:`sample_pixels` / :func:`gather_pixels` (pure): the flow's training objective
    on a random subset of teacher pixel features.
  - :class:`DDFPTerm` (``ddfp``): the loss term. ``forward`` perturbs the strong (mixed) views' decoder input,
    re-decodes it with a separate BN set and returns the CE against the teacher's pseudo-labels;
    ``update`` (after the model's optimizer step) trains the flow with its own Adam optimizer
    (layers/online_adam.py, whose state is part of the term's state dict).
"""
import logging
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.utils.logger import log_every_n_seconds
from torch import nn

from ..config import Range, POSITIVE, NON_NEGATIVE, AT_LEAST_1, UNIT, ITERATION, declare
from ..layers.flow import CouplingFlow
from ..layers.label_ops import resize_labels, threshold_keep_mask
from ..layers.online_adam import OnlineAdam
from ..utils.dtype import upcast
from .pseudo_label import pseudo_label_cross_entropy
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm

logger = logging.getLogger(__name__)

_FLOW_TARGETS = ("mixture", "pseudo_label")
_NORMALIZE = ("all", "kept")
_NEEDS_DECODER = (
    "SEMI.LOSSES 'ddfp' perturbs the decoder input: it needs MODEL.SEM_SEG_HEAD.NAME 'U2PLDeepLabV3PlusHead' (the "
    "reference's decoder), 'DeepLabV3PlusFeatHead' or 'DPTHead' (head outputs 'decoder_input' and a decode() method)"
)


def _check_dim(flow_dim: int, feat_dim: int, where: str) -> None:
    if feat_dim != flow_dim:
        raise ValueError(
            f"SEMI.DDFP: {where} are {feat_dim}-d but the flow models {flow_dim}-d features "
            f"(the flow is built with the 'features' width of the head's spec)"
        )


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


def add_ddfp_config(cfg) -> None:
    """Declare ``SEMI.DDFP.*``, the keys of the ``ddfp`` term (``add_semiseg_config`` calls this)."""
    # ddfp term (Wang et al., CVPR 2024): CE of the student's decoder on density-descending perturbed
    # decoder inputs of the strong (mixed) views; a normalizing flow (layers/flow.py) trained online on teacher features
    cfg.SEMI.DDFP = CN()
    declare(cfg, "SEMI.DDFP.WEIGHT", 0.5, NON_NEGATIVE)  # lambda_p of the perturbed-feature CE
    declare(cfg, "SEMI.DDFP.THRESHOLD", 0.95, UNIT)  # teacher confidence to keep a pixel (loss and perturbation mask)
    cfg.SEMI.DDFP.NORMALIZE = "kept"  # CE normalisation as SEMI.PSEUDO_LABEL.NORMALIZE (reference: "kept")
    declare(cfg, "SEMI.DDFP.EPS", 4.0, POSITIVE)  # L2 norm of the perturbation of each pixel's decoder input
    cfg.SEMI.DDFP.PERTURBED_BN = True  # separate BN set for the perturbed decoder pass (reference MixSyncBN)
    # no perturbation loss before this iteration (reference: burn-in + 1 epoch)
    declare(cfg, "SEMI.DDFP.START_ITER", 0, ITERATION)
    # the flow trains from this iteration on (reference: end of burn-in)
    declare(cfg, "SEMI.DDFP.FLOW_START_ITER", 0, ITERATION)
    declare(cfg, "SEMI.DDFP.FLOW_BLOCKS", 2, AT_LEAST_1)  # GLOW coupling blocks
    declare(cfg, "SEMI.DDFP.FLOW_HIDDEN", [256, 256], AT_LEAST_1)  # hidden widths of every coupling subnet
    declare(cfg, "SEMI.DDFP.FLOW_CLAMP", 2.0, POSITIVE)  # soft clamp of the coupling log-scales
    # seeds the flow's permutations and initialisation (identical on every rank)
    declare(cfg, "SEMI.DDFP.FLOW_SEED", 0, NON_NEGATIVE)
    declare(cfg, "SEMI.DDFP.FLOW_LR", 1e-3, POSITIVE)  # Adam learning rate of the flow (own optimizer, not SOLVER.*)
    declare(cfg, "SEMI.DDFP.FLOW_BETAS", [0.5, 0.9], Range(0, 1, hi_open=True, length=2))  # Adam betas of the flow
    # flow lr decays geometrically to FLOW_LR * this at MAX_ITER
    declare(cfg, "SEMI.DDFP.FLOW_LR_END_FACTOR", 0.01, Range(0, 1, lo_open=True))
    declare(cfg, "SEMI.DDFP.FLOW_GRAD_CLIP", 50.0, NON_NEGATIVE)  # max global grad norm of a flow step (0 = off)
    declare(cfg, "SEMI.DDFP.FLOW_SAMPLES", 20480, AT_LEAST_1)  # teacher pixel features per flow step (per rank)
    declare(cfg, "SEMI.DDFP.FLOW_NOISE", 0.05, NON_NEGATIVE)  # std of the Gaussian noise added to those features
    # unlabeled pixels in the flow's NLL: "mixture" (every valid pixel, marginal density; reference code) or
    # "pseudo_label" (confident pixels, class-conditional on the teacher's pseudo-label, THRESHOLD)
    cfg.SEMI.DDFP.FLOW_UNLABELED_TARGET = "mixture"


@SEMI_LOSS_REGISTRY.register_term
class DDFPTerm(SemiLossTerm):
    """``ddfp``: CE of the student on density-descending perturbed decoder inputs of the strong views.

    Needs a head with ``decoder_input`` / ``decode`` (U2PLDeepLabV3PlusHead, DeepLabV3PlusFeatHead, DPTHead): built
    from its spec (``decode``, its norm count, the feature width). Owns the flow, its Adam optimizer
    (``params_with_own_optimizer``) and, with ``perturbed_bn``, the BN set of the perturbed pass.
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
        decode: Optional[Callable] = None,
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
        # the student head's decode(decoder_input, norms=None) -> (features, logits); only forward needs it
        self.decode = decode
        self.ignore_value = ignore_value
        self.weight = weight
        self.threshold = threshold
        self.normalize = normalize
        self.eps = eps
        self.start_iter = start_iter
        self.flow_start_iter = flow_start_iter
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
        self.flow_optimizer = OnlineAdam(
            self.flow.parameters(), lr=flow_lr, betas=flow_betas, lr_end_factor=flow_lr_end_factor,
            grad_clip=flow_grad_clip,
        )
        self.register_buffer("flow_skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("flow_nll", torch.zeros(()))

    @classmethod
    def from_config(cls, cfg, spec):
        if spec.decode is None or spec.decoder_input_dim <= 0:
            raise ValueError(_NEEDS_DECODER + f"; the head '{spec.name}' has none")
        c = cfg.SEMI.DDFP
        head = cfg.MODEL.SEM_SEG_HEAD
        return dict(
            num_classes=spec.num_classes,
            feature_dim=spec.feature_dim,
            decode=spec.decode,
            ignore_value=head.IGNORE_VALUE,
            weight=c.WEIGHT,
            threshold=c.THRESHOLD,
            normalize=c.NORMALIZE,
            eps=c.EPS,
            perturbed_bn=c.PERTURBED_BN,
            norm=head.NORM,
            # the head's decode() norms (DeepLabV3+: 2 decoder convs, DPT: 1); the perturbed set mirrors them
            decoder_norms=spec.num_decoder_norms,
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
        return list(self.flow_optimizer.params)

    # ------------------------------------------------------------------ loss
    def _decoder_input(self, step):
        dec_in = step.student_strong.get("decoder_input")
        if dec_in is None or self.decode is None:
            raise ValueError(_NEEDS_DECODER)
        return dec_in

    def forward(self, step):
        self.log_flow_state(step)
        t = step.teacher_strong
        logits = step.student_strong["logits"]
        if step.iteration < self.start_iter:
            return {"loss_ddfp": logits.new_zeros(())}
        dec_in = self._decoder_input(step)
        keep = threshold_keep_mask(t["confidence"], t["valid"], self.threshold)
        norms = self.perturbed_norms

        def decode_features(x):
            return self.decode(x, norms=norms)[0]

        delta = density_descending_perturbation(
            decode_features, self.flow, dec_in, resize_labels(keep, dec_in.shape[-2:]), self.eps
        )
        # The clean decoder input keeps its graph: the perturbed branch also trains the encoder (reference).
        _, logits_p = self.decode(dec_in + delta, norms=norms)
        loss = pseudo_label_cross_entropy(logits_p, t["pseudo_label"], keep, t["valid"], normalize=self.normalize)
        return {"loss_ddfp": loss * self.weight}

    def log_flow_state(self, step) -> None:
        step.log("ddfp/flow_nll", self.flow_nll)
        step.log("ddfp/flow_skipped", self.flow_skipped)

    # ------------------------------------------------------------------ flow training
    def flow_batch(self, step) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled teacher pixel features of labeled (class-conditional on GT) and weak unlabeled views
        (marginal, or class-conditional on confident pseudo-labels): ``(feats [k,D], labels [k], weight [k])``."""
        feats_l = step.teacher_labeled.get("features")
        if feats_l is None:
            raise RuntimeError(
                "ddfp trains its flow on SemiStep.teacher_labeled['features'] (teacher features of the labeled "
                "images); the engine provides it for terms with needs_teacher_labeled = True"
            )
        feats_u = step.teacher_weak["features"]
        feats_l, feats_u = feats_l.detach(), feats_u.detach()
        _check_dim(self.flow.dim, feats_l.shape[1], "labeled features")
        _check_dim(self.flow.dim, feats_u.shape[1], "unlabeled teacher features")

        labels_l = resize_labels(step.labeled_targets, feats_l.shape[-2:])
        valid_l = labels_l != self.ignore_value
        tw = step.teacher_weak
        if self.flow_unlabeled_target == "mixture":
            valid_u = resize_labels(tw["valid"], feats_u.shape[-2:])
            labels_u = torch.full_like(valid_u, -1, dtype=torch.long)
        else:
            keep = threshold_keep_mask(tw["confidence"], tw["valid"], self.threshold)
            valid_u = resize_labels(keep, feats_u.shape[-2:])
            labels_u = resize_labels(tw["pseudo_label"], feats_u.shape[-2:])
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

    def update(self, step) -> None:
        if step.iteration < self.flow_start_iter:
            return
        with torch.enable_grad(), torch.autocast(step.labeled_images.device.type, enabled=False):
            x, labels, weight = self.flow_batch(step)
            loss = flow_nll(self.flow, x, labels, weight)
        loss, stepped = self.flow_optimizer.step(loss, step.progress)
        if not stepped:
            self.flow_skipped += 1
            log_every_n_seconds(
                logging.WARNING,
                f"SEMI.DDFP: non-finite flow loss/gradient at iteration {step.iteration}; flow step skipped "
                f"({int(self.flow_skipped)} skipped so far)",
                n=60,
                name=__name__,
            )
        else:
            self.flow_nll.copy_(loss)
