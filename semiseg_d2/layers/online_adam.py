"""Adam for parameters that a loss term trains itself, outside the model's backward pass and optimizer (DDFP's
flow, stepped in the term's ``update`` after every model step): the learning rate decays exponentially with the
training progress, gradients are averaged over the ranks (DDP never sees these parameters), clipped, and a
non-finite loss or gradient skips the step. The Adam state is written into the state dict of the module that
holds it, so any checkpoint of the model carries it.
"""
from typing import Iterable, Sequence, Tuple

import torch
from torch import nn

from .distributed import mean_over_ranks

__all__ = ["OnlineAdam"]

_FIELDS = ("exp_avg", "exp_avg_sq", "step")


class OnlineAdam(nn.Module):
    """Adam over ``params`` (held, not registered: their owner registers them) with ``lr * lr_end_factor ** progress``.

    :meth:`step` ``(loss [] with a graph to params, progress in [0, 1]) -> (loss averaged over ranks [], stepped)``.
    ``grad_clip > 0`` clips the L2 norm of all gradients (after the rank average). State dict: ``exp_avg.<i>``,
    ``exp_avg_sq.<i>``, ``step.<i>`` for parameter ``i`` of ``params``, fixed shapes whatever the optimizer has done
    (zeros before its first step), so detectron2's shape-checking checkpointer and strict loading treat them like
    any buffer; missing ones are reported as missing keys.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: Sequence[float] = (0.9, 0.999),
                 lr_end_factor: float = 1.0, grad_clip: float = 0.0):
        super().__init__()
        self.params = list(params)
        self.lr = lr
        self.lr_end_factor = lr_end_factor
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=tuple(betas))

    def step(self, loss: torch.Tensor, progress: float) -> Tuple[torch.Tensor, bool]:
        lr = self.lr * self.lr_end_factor ** progress
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, self.params)
        *grads, loss = mean_over_ranks([*grads, loss.detach().reshape(1)])
        loss = loss.reshape(())
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.grad_clip > 0:
            total = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # One host sync: a non-finite loss/gradient (e.g. a flow's log-det overflow) skips the step instead of
        # writing NaN into the parameters. Identical on every rank (reduced values), so ranks stay in step.
        stepped = bool(torch.isfinite(total) & torch.isfinite(loss))
        if stepped:
            self.optimizer.step()
        for p in self.params:
            p.grad = None
        return loss, stepped

    # ------------------------------------------------------------------ checkpointing of the Adam state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p, {})
            destination[f"{prefix}exp_avg.{i}"] = state.get("exp_avg", torch.zeros_like(p)).detach()
            destination[f"{prefix}exp_avg_sq.{i}"] = state.get("exp_avg_sq", torch.zeros_like(p)).detach()
            destination[f"{prefix}step.{i}"] = state.get("step", torch.zeros(())).detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        new_state = {}
        for i, p in enumerate(self.params):
            keys = {f: f"{prefix}{f}.{i}" for f in _FIELDS}
            absent = [k for k in keys.values() if k not in state_dict]
            if absent:
                missing_keys.extend(absent)
                continue
            avg, avg_sq, step = (state_dict[keys[f]] for f in _FIELDS)
            if avg.shape != p.shape or avg_sq.shape != p.shape:
                error_msgs.append(
                    f"{keys['exp_avg']}: Adam state of shape {tuple(avg.shape)}, parameter {tuple(p.shape)}"
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
            if k.startswith(prefix):
                field_name, _, idx = k[len(prefix):].rpartition(".")
                if field_name not in _FIELDS or not idx.isdigit() or int(idx) >= len(self.params):
                    unexpected_keys.append(k)
        self.optimizer.state.clear()
        self.optimizer.state.update(new_state)
