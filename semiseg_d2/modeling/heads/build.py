"""Head building with an error that lists the registered head names."""
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..backbone.build import check_registered

__all__ = ["build_sem_seg_head_checked"]


def build_sem_seg_head_checked(cfg, input_shape):
    name = cfg.MODEL.SEM_SEG_HEAD.NAME
    check_registered(SEM_SEG_HEADS_REGISTRY, name, "MODEL.SEM_SEG_HEAD.NAME")
    return SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
