"""The model's optimizer: SGD (DeepLab practice) or AdamW (ViT encoders, UniMatch V2), with separate backbone /
head learning-rate multipliers (``SOLVER.BACKBONE_LR_MULTIPLIER`` / ``HEAD_LR_MULTIPLIER``)."""
import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

OPTIMIZERS = ("SGD", "AdamW")


def lr_multiplier(cfg, param_name: str) -> float:
    """``SOLVER.BACKBONE_LR_MULTIPLIER`` for backbone parameters, ``HEAD_LR_MULTIPLIER`` for the rest."""
    is_backbone = param_name.startswith("backbone.") or ".backbone." in param_name
    return cfg.SOLVER.BACKBONE_LR_MULTIPLIER if is_backbone else cfg.SOLVER.HEAD_LR_MULTIPLIER


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` over the trainable parameters, excluding frozen ones (the EMA teacher, a frozen
    encoder) and those a loss term optimises itself (``model.params_with_own_optimizer()``, e.g. a normalizing
    flow). Weight decay: ``SOLVER.WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM`` for norm layers (detectron2's groups).
    Fused on CUDA (:func:`fused_or_foreach`); build it after the model has been moved to its device."""
    name = cfg.SOLVER.OPTIMIZER
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER: unknown {name!r}; known: {list(OPTIMIZERS)}")
    own = {id(p) for p in getattr(model, "params_with_own_optimizer", lambda: [])()}
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_factor_func=lambda name: lr_multiplier(cfg, name),
    )
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in own]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    impl = fused_or_foreach([p for g in groups for p in g["params"]])
    if name == "AdamW":
        betas = tuple(cfg.SOLVER.ADAMW_BETAS)
        if len(betas) != 2:
            raise ValueError(f"SOLVER.ADAMW_BETAS: two values expected, got {list(betas)}")
        adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return adamw(groups, lr=cfg.SOLVER.BASE_LR, betas=betas, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **impl)
    sgd = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return sgd(
        groups,
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        **impl,
    )


def fused_or_foreach(params) -> dict:
    """``fused=True`` (one kernel per dtype/device group, no per-tensor launches) when every parameter is a
    floating-point CUDA tensor; ``foreach=True`` otherwise (CPU: the multi-tensor path, numerics of the
    tests unchanged)."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


sgd_implementation = fused_or_foreach  # the name other modules and tests use
