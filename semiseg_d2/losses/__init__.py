"""Loss terms of the semi-supervised engine (registered in SEMI_LOSS_REGISTRY on import)."""
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm, build_loss_terms, known_loss_terms
from . import supervised, pseudo_label, dgcl, ddfp, memory_contrast, entropy, class_balance, unimatch, unimatch_v2  # noqa: F401  register the terms

__all__ = ["SEMI_LOSS_REGISTRY", "SemiLossTerm", "build_loss_terms", "known_loss_terms"]
