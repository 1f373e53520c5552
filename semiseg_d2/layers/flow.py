"""Normalising flow density estimator of DDFP (Wang et al., CVPR 2024).

A GLOW-style affine coupling flow maps features x [N, D] to latents z; the prior over z is a Gaussian
mixture with one learnable mean per class and identity covariance, so

    log p(x | c) = log N(f(x); mu_c, I) + log|det df/dx|,
    log p(x)     = logsumexp_c log p(x | c) - log C    (uniform mixture weights).

Structure as in the official code (github.com/Gavinwxy/DDFP, model/flow/model.py: FrEIA 0.2
``GLOWCouplingBlock(clamp=2.0)`` + ``PermuteRandom(seed=k)`` after block k, subnets
Linear(D/2, 256)-ReLU-Linear(256, 256)-ReLU-Linear(256, D), params initialised N(0, 0.05^2), means N(0, I)),
written here in plain torch; tests/layers/test_flow.py checks one block and a whole flow against FrEIA 0.2 with copied
weights. Numerics are fp32 with autocast disabled.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..utils.dtype import upcast

# FrEIA 0.2's GLOW soft clamp (_BaseCouplingBlock, clamp_activation "ATAN"): s -> clamp * 0.636 * atan(s), i.e.
# |log-scale| < ~clamp (0.636 ~ 2/pi) with slope 0.636 * clamp at 0 (the raw subnet output is NOT divided by clamp).
_ATAN_GAIN = 0.636


def _soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    return clamp * _ATAN_GAIN * torch.atan(s)


def freia_permutation(dim: int, seed: int) -> torch.Tensor:
    """FrEIA's ``PermuteRandom(seed=seed)`` permutation of ``dim`` channels (numpy's legacy generator seeded with
    ``seed``), drawn from a private ``RandomState`` so numpy's global stream is left untouched."""
    return torch.from_numpy(np.random.RandomState(int(seed)).permutation(int(dim))).long()


def _subnet(c_in: int, c_out: int, hidden: Sequence[int]) -> nn.Sequential:
    layers, width = [], c_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, c_out))
    return nn.Sequential(*layers)


class GLOWCoupling(nn.Module):
    """One GLOW affine coupling block: both halves are transformed, each conditioned on the other.

    x = [x1 | x2] (len1 = round(D / 2) as FrEIA's split_len 0.5, len2 = D - len1)
        y1 = x1 * exp(s2(x2)) + t2(x2);    y2 = x2 * exp(s1(y1)) + t1(y1)
    with soft-clamped log-scales; log|det| = sum(s2) + sum(s1).
    """

    def __init__(self, dim: int, hidden: Sequence[int], clamp: float):
        super().__init__()
        self.len1 = round(dim * 0.5)  # FrEIA: round(channels * split_len) (round half to even)
        self.len2 = dim - self.len1
        self.clamp = float(clamp)
        self.net1 = _subnet(self.len1, 2 * self.len2, hidden)  # conditions x2's transform on y1
        self.net2 = _subnet(self.len2, 2 * self.len1, hidden)  # conditions x1's transform on x2

    def _st(self, net: nn.Module, cond: torch.Tensor, n: int):
        a = net(cond)
        return _soft_clamp(a[:, :n], self.clamp), a[:, n:]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, :self.len1], x[:, self.len1:]
        s2, t2 = self._st(self.net2, x2, self.len1)
        y1 = x1 * torch.exp(s2) + t2
        s1, t1 = self._st(self.net1, y1, self.len2)
        y2 = x2 * torch.exp(s1) + t1
        return torch.cat([y1, y2], dim=1), s2.sum(1) + s1.sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, :self.len1], y[:, self.len1:]
        s1, t1 = self._st(self.net1, y1, self.len2)
        x2 = (y2 - t1) * torch.exp(-s1)
        s2, t2 = self._st(self.net2, x2, self.len1)
        x1 = (y1 - t2) * torch.exp(-s2)
        return torch.cat([x1, x2], dim=1)


class CouplingFlow(nn.Module):
    """GLOW coupling flow with a class-conditional Gaussian-mixture prior (DDFP's density estimator).

    Args:
        dim: D, feature dimension (DDFP: 256, the decoder feature).
        num_classes: C, one prior mean per class.
        n_blocks: coupling blocks, each followed by a fixed random permutation (block k: FrEIA's
            ``PermuteRandom(seed=seed + k)``; the official code's seeds are k, i.e. seed = 0).
        hidden: hidden widths of every coupling subnet (DDFP: 256, 256 -> D/2 -> 256 -> 256 -> D).
        clamp: soft clamp of the log-scales (FrEIA 0.2's atan form, see ``_soft_clamp``); DDFP: 2.0.
        seed: seeds the permutations (block k uses seed + k) and the initialisation, so two flows built
            with the same arguments are identical (e.g. on every rank).
        init_std: std of the N(0, init_std^2) initialisation of every subnet parameter (official: 0.05).
        learnable_means: prior means are a Parameter (DDFP) or a fixed buffer.
    Buffers ``perm_k`` / ``inv_perm_k`` are checkpointed with the parameters.
    """

    def __init__(self, dim: int = 256, num_classes: int = 19, n_blocks: int = 2, hidden: Sequence[int] = (256, 256),
                 clamp: float = 2.0, seed: int = 0, init_std: float = 0.05, learnable_means: bool = True):
        super().__init__()
        if dim < 2 or num_classes < 1 or n_blocks < 1:
            raise ValueError(f"CouplingFlow: need dim >= 2, num_classes >= 1, n_blocks >= 1; got "
                             f"{dim}, {num_classes}, {n_blocks}")
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.blocks = nn.ModuleList([GLOWCoupling(dim, hidden, clamp) for _ in range(n_blocks)])
        gen = torch.Generator().manual_seed(int(seed))
        for k in range(n_blocks):
            perm = freia_permutation(dim, int(seed) + k)
            self.register_buffer(f"perm_{k}", perm)
            self.register_buffer(f"inv_perm_{k}", torch.argsort(perm))
        with torch.no_grad():
            for p in self.blocks.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        means = torch.randn(num_classes, dim, generator=gen)
        if learnable_means:
            self.means = nn.Parameter(means)
        else:
            self.register_buffer("means", means)

    def _fp32(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"CouplingFlow: expected [N, {self.dim}] features; got {tuple(x.shape)}")
        # fp32 regardless of the input / autocast dtype (a flow converted with .double() runs in fp64)
        return x.to(self.means.dtype if self.means.dtype == torch.float64 else torch.float32)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (z [N, D] fp32, log|det dz/dx| [N] fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self._fp32(x)
            log_det = z.new_zeros(z.shape[0])
            for k, block in enumerate(self.blocks):
                z, ld = block(z)
                log_det = log_det + ld
                z = z[:, getattr(self, f"perm_{k}")]
            return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, D] -> x [N, D] fp32 (exact inverse of forward)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._fp32(z)
            for k in reversed(range(len(self.blocks))):
                x = self.blocks[k].inverse(x[:, getattr(self, f"inv_perm_{k}")])
            return x

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, D] -> [N, C] log N(z; mu_c, I)."""
        # |z|^2 - 2 z.mu + |mu|^2 in one matmul (cdist's matmul path loses precision and misbehaves for N = 0)
        mu = self.means.to(z.dtype)
        sq = (z * z).sum(1, keepdim=True) - 2 * z @ mu.t() + (mu * mu).sum(1)[None]
        return -0.5 * (sq + self.dim * math.log(2 * math.pi))

    def class_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, C] log p(x | c) (fp32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            z, log_det = self.forward(x)
            return self.prior_log_prob(z) + log_det[:, None]

    def log_prob(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, D]; y: [N] long class ids or None. Returns [N] fp32:
        log p(x | y) when y is given, else the marginal logsumexp_c log p(x | c) - log C.
        The NLL loss of DDFP's flow is ``-log_prob(feats, labels).mean()`` (optionally / D for bits-per-dim).
        """
        lp = self.class_log_prob(x)
        if y is None:
            return torch.logsumexp(lp, dim=1) - math.log(self.num_classes)
        return lp.gather(1, y.reshape(-1, 1).long()).squeeze(1)


def nonfinite_log_det(log_det: torch.Tensor) -> torch.Tensor:
    """log_det: [N] -> [] bool tensor, True if any entry is NaN/inf (stays on device; the caller decides
    whether to sync and skip the flow update, e.g. ``if bool(nonfinite_log_det(ld)): skip``)."""
    return ~torch.isfinite(log_det).all()


def nll_gradient_direction(flow: CouplingFlow, feats: torch.Tensor, labels: Optional[torch.Tensor] = None,
                           normalize: bool = True) -> torch.Tensor:
    """Direction of steepest density DESCENT at each feature: d(-log p(x [| y]))/dx.

    Args:
        flow: a CouplingFlow (its parameters receive no gradient from this call).
        feats: [N, D]; labels: [N] long (class-conditional density) or None (marginal).
        normalize: return unit-L2 directions per row (zero rows stay zero).
    Returns:
        [N, D] fp32, detached. DDFP perturbs features along this direction (times a step size).
    """
    with torch.enable_grad():
        x = upcast(feats.detach()).requires_grad_(True)
        nll = -flow.log_prob(x, labels).sum()
        (grad,) = torch.autograd.grad(nll, x)
    if normalize:
        grad = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return grad.detach()
