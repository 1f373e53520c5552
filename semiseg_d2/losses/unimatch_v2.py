"""UniMatch V2 (Yang et al., TPAMI 2025): EMA teacher on the weak view, two strong views whose encoder features get
complementary channel dropout. Paper -> code map and deviations: docs/methods/unimatch_v2.md.

Official total loss (LiheYoung/UniMatch-V2 ``unimatch_v2.py``): ``(L_x + (L_s1 + L_s2) / 2) / 2`` with
``L_s = sum(CE * [conf >= 0.95] * valid) / sum(valid)`` per stream. Here ``L_x`` is the ``supervised`` term
(``SEMI.SUPERVISED.WEIGHT`` 0.5 in the configs) and this term returns ``loss_unimatch_v2_s1`` / ``_s2``, each
``L_s * WEIGHT_S * LOSS_SCALE`` (0.5 * 0.5). The dropout itself (``layers.perturbation.complementary_channel_masks``)
is applied by the engine to the student's backbone features of the two strong streams
(``Segmentor.extract(channel_scale=...)``).
"""
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..config import NON_NEGATIVE, UNIT, declare
from .registry import SEMI_LOSS_REGISTRY, SemiLossTerm
from .unimatch import unimatch_stream_loss

__all__ = ["UniMatchV2Term"]


def add_unimatch_v2_config(cfg) -> None:
    """Declare ``SEMI.UNIMATCH_V2.*``, the keys of the ``unimatch_v2`` term (``add_semiseg_config`` calls this)."""
    # unimatch_v2 term (losses/unimatch_v2.py, docs/methods/unimatch_v2.md): UniMatch V2's two strong streams with
    # complementary channel dropout on the student's encoder features; L = (L_x + (L_s1 + L_s2) / 2) / 2 with
    # SEMI.SUPERVISED.WEIGHT 0.5 and an EMA teacher (SEMI.EMA: "warm_start", 0.996)
    cfg.SEMI.UNIMATCH_V2 = CN()
    declare(cfg, "SEMI.UNIMATCH_V2.THRESHOLD", 0.95, UNIT)  # conf_thresh (official: every dataset)
    declare(cfg, "SEMI.UNIMATCH_V2.WEIGHT_S1", 0.5, NON_NEGATIVE)  # the "(L_s1 + L_s2) / 2" ...
    declare(cfg, "SEMI.UNIMATCH_V2.WEIGHT_S2", 0.5, NON_NEGATIVE)
    declare(cfg, "SEMI.UNIMATCH_V2.LOSS_SCALE", 0.5, NON_NEGATIVE)  # ... and the outer "/ 2" of the official loss
    cfg.SEMI.UNIMATCH_V2.COMPLEMENTARY_DROPOUT = True  # masks m and 2 - m on the two streams' encoder channels
    # share of image pairs left unperturbed (official 1 - 0.5)
    declare(cfg, "SEMI.UNIMATCH_V2.UNPERTURBED_FRACTION", 0.5, UNIT)


@SEMI_LOSS_REGISTRY.register_term
class UniMatchV2Term(SemiLossTerm):
    """``unimatch_v2``: the two strong streams (complementary channel dropout on their encoder features) against
    the EMA teacher's mixed maps, each normalised by the stream's non-ignored pixels."""

    name = "unimatch_v2"
    needs_second_strong = True

    @configurable
    def __init__(self, *, threshold: float = 0.95, weight_s1: float = 0.5, weight_s2: float = 0.5,
                 loss_scale: float = 0.5, unperturbed_fraction: float = 0.5, complementary_dropout: bool = True):
        super().__init__()
        if not 0.0 <= unperturbed_fraction <= 1.0:
            raise ValueError(f"SEMI.UNIMATCH_V2.UNPERTURBED_FRACTION must lie in [0, 1], got {unperturbed_fraction}")
        self.threshold = threshold
        self.weights = {"s1": weight_s1 * loss_scale, "s2": weight_s2 * loss_scale}
        self.unperturbed_fraction = unperturbed_fraction
        # read by the engine: None = no complementary dropout on the strong streams
        self.complementary_dropout = unperturbed_fraction if complementary_dropout else None

    @classmethod
    def from_config(cls, cfg, spec):
        c = cfg.SEMI.UNIMATCH_V2
        return dict(
            threshold=c.THRESHOLD,
            weight_s1=c.WEIGHT_S1,
            weight_s2=c.WEIGHT_S2,
            loss_scale=c.LOSS_SCALE,
            unperturbed_fraction=c.UNPERTURBED_FRACTION,
            complementary_dropout=c.COMPLEMENTARY_DROPOUT,
        )

    def forward(self, step):
        if not step.student_strong2:
            raise ValueError("SEMI.LOSSES 'unimatch_v2' needs the second strong stream (SemiStep.student_strong2)")
        s1, keep = unimatch_stream_loss(step.student_strong["logits"], step.teacher_strong, self.threshold)
        s2, _ = unimatch_stream_loss(step.student_strong2["logits"], step.teacher_strong2, self.threshold)
        step.keep_masks[self.name] = keep
        w = step.teacher_weak
        # the official "mask ratio": confident share of the weak view's non-ignored pixels
        conf = (w["confidence"] >= self.threshold) & w["valid"]
        step.log("unimatch_v2/mask_ratio", conf.sum() / w["valid"].sum().clamp_min(1))
        return {"loss_unimatch_v2_s1": s1 * self.weights["s1"], "loss_unimatch_v2_s2": s2 * self.weights["s2"]}
