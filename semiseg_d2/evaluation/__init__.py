"""Evaluators: detectron2's SemSegEvaluator with labels read through semiseg_d2's label_io."""
from .sem_seg import build_sem_seg_evaluator  # noqa: F401
