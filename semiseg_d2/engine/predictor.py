"""A ``DefaultPredictor`` for every kind of semiseg_d2 checkpoint.

Trainer checkpoints of a ``SemiSegmentor`` hold a student and an EMA teacher (``student.*``, ``teacher.*``,
plus loss-term state ``terms.*``); exported and supervised checkpoints hold one ``Segmentor``. Inference
always runs a plain ``Segmentor`` built from the same config, loaded with the selected network's weights:
``tools/demo.py`` and ``tools/export_model.py`` share :func:`network_state_dict`.
"""
import logging
import os
from typing import Dict, Optional, Tuple

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..config import check_semiseg_config
from ..data.mapper import test_resize_from_config
from .checkpoint import SemiSegCheckpointer

__all__ = ["NETWORKS", "network_state_dict", "check_weights_file", "SegmentorCheckpointer", "SemiSegPredictor"]

logger = logging.getLogger(__name__)

NETWORKS = ("teacher", "student")
_SEGMENTATION_ARCHS = ("Segmentor", "SemiSegmentor")


def network_state_dict(state: Dict, network: Optional[str] = None, default: str = "teacher") -> Tuple[Dict, str]:
    """The ``Segmentor`` state dict inside a checkpoint's ``"model"`` state.

    Args:
        state: state dict of a ``SemiSegmentor`` (``teacher.*``, ``student.*``, ``terms.*``) or a ``Segmentor``.
        network: "teacher" / "student" picks that network of a ``SemiSegmentor`` checkpoint and is an error on
            a ``Segmentor`` checkpoint (it has neither); None takes ``default`` from a ``SemiSegmentor``
            checkpoint and a ``Segmentor`` checkpoint as it is.
    Returns:
        ``(segmentor_state, which)``, ``which`` in ("teacher", "student", "segmentor").
    """
    for name, value in (("network", network), ("default", default)):
        if value is not None and value not in NETWORKS:
            raise ValueError(f"{name} must be one of {NETWORKS}, got {value!r}")
    held = [n for n in NETWORKS if any(k.startswith(n + ".") for k in state)]
    if not held:
        if network is not None:
            raise ValueError(
                f"network={network!r} selects a network of a SemiSegmentor trainer checkpoint, but this is a plain "
                "Segmentor checkpoint (no 'teacher.*'/'student.*' weights): leave the network unset"
            )
        return dict(state), "segmentor"
    which = network or default
    if which not in held:
        raise KeyError(f"the checkpoint has no '{which}' weights (it holds: {', '.join(held)})")
    prefix = which + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, which


def check_weights_file(path: str, key: str = "MODEL.WEIGHTS") -> None:
    """Raise before any model work when a local weights file is not given or does not exist."""
    if not path:
        raise ValueError(f"{key} is empty: give the checkpoint to run (e.g. {key} output/run/model_final.pth)")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no such file: {path}")


class SegmentorCheckpointer(SemiSegCheckpointer):
    """Loads the weights of one network of any semiseg_d2 checkpoint into a ``Segmentor``.

    ``network`` / ``default_network`` as in :func:`network_state_dict`; after :meth:`load`,
    ``loaded_network`` says which one was read ("teacher", "student" or "segmentor").
    """

    def __init__(self, model, *, network: Optional[str] = None, default_network: str = "teacher"):
        super().__init__(model)
        self.network = network
        self.default_network = default_network
        self.loaded_network = None

    def _load_file(self, filename: str) -> Dict:
        checkpoint = super()._load_file(filename)
        state, self.loaded_network = network_state_dict(checkpoint["model"], self.network, self.default_network)
        kept = {k: checkpoint[k] for k in ("__author__", "matching_heuristics") if k in checkpoint}
        return {"model": state, **kept}


class SemiSegPredictor(DefaultPredictor):
    """``DefaultPredictor`` that runs the ``Segmentor`` of ``cfg`` with the weights of ``cfg.MODEL.WEIGHTS``.

    The weights may be a ``SemiSegmentor`` trainer checkpoint (``network`` picks the teacher or the student;
    default ``cfg.SEMI.WEIGHTS_FOR_EXPORT``), an exported or supervised ``Segmentor`` checkpoint; ``cfg``'s
    ``MODEL.META_ARCHITECTURE`` may be either. Loading is strict: a missing, unexpected or mis-shaped key is an
    error, never a partly random model. ``predictor(bgr_image)["sem_seg"]`` is ``float[C, H, W]`` softmax
    probabilities at the image's size; ``predictor.network`` says which weights were loaded.
    """

    def __init__(self, cfg, network: Optional[str] = None):
        check_semiseg_config(cfg)
        arch = cfg.MODEL.META_ARCHITECTURE
        if arch not in _SEGMENTATION_ARCHS:
            raise ValueError(
                f"MODEL.META_ARCHITECTURE: {arch!r} is not a semiseg_d2 segmentation model; "
                f"expected one of {_SEGMENTATION_ARCHS}"
            )
        if network is not None and network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS} or None, got {network!r}")
        default = cfg.SEMI.WEIGHTS_FOR_EXPORT
        if default not in NETWORKS:
            raise ValueError(f"SEMI.WEIGHTS_FOR_EXPORT must be one of {NETWORKS}, got {default!r}")
        weights = cfg.MODEL.WEIGHTS
        check_weights_file(weights)

        self.cfg = cfg.clone()
        self.cfg.defrost()
        self.cfg.MODEL.META_ARCHITECTURE = "Segmentor"  # a SemiSegmentor's student/teacher is this model
        self.cfg.freeze()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(self.cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(self.cfg.DATASETS.TEST[0])
        checkpointer = SegmentorCheckpointer(self.model, network=network, default_network=default)
        checkpointer.load(weights, strict=True)
        self.network = checkpointer.loaded_network
        logger.info("loaded the %s weights of %s", self.network, weights)
        self.aug = test_resize_from_config(self.cfg)  # the evaluation loader's resize too
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")
