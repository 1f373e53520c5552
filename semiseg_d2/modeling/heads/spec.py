"""HeadSpec: what a built segmentation head tells the loss terms that read its outputs.

detectron2 builds a head from the ``ShapeSpec`` of its input (``from_config(cfg, input_shape)``); the engine builds a
loss term from the spec of the head whose outputs it reads (``from_config(cfg, spec)``), taken from the built student,
so a term never recomputes a width from other config keys (a ViT + DPT head is not ResNet arithmetic).
"""
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["HeadSpec"]


@dataclass(frozen=True)
class HeadSpec:
    """The student head's outputs, as loss terms see them.

    Attributes:
        name: the head's class name (error messages name it).
        num_classes: C of ``"logits" [B, C, h, w]``.
        feature_dim: D of ``"features" [B, D, h, w]`` (DGCL / memory-contrast projections, DDFP's flow).
        decoder_input_dim: channels of ``"decoder_input"``; 0 when the head has no re-runnable decoder.
        decode: the student head's ``decode(decoder_input, norms=None) -> (features, logits)`` (None without one).
        num_decoder_norms: how many norm modules ``decode`` runs (``norms`` replaces them, DDFP's perturbed BN).
    """

    name: str
    num_classes: int
    feature_dim: int
    decoder_input_dim: int = 0
    decode: Optional[Callable] = None
    num_decoder_norms: int = 0
