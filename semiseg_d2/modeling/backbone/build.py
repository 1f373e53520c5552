"""Backbone building with an error that lists the registered names (fvcore's registry does not)."""
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

__all__ = ["build_backbone_checked", "check_registered"]


def check_registered(registry, name: str, key: str) -> None:
    """Raise ``KeyError`` naming the config ``key``, the bad ``name`` and the registered names."""
    if name not in registry:
        known = sorted(registry._obj_map)
        raise KeyError(f"{key}: unknown name {name!r}; known: {known}")


def build_backbone_checked(cfg, input_shape=None):
    check_registered(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")
    return build_backbone(cfg, input_shape)
