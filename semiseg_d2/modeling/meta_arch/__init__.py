from . import segmentor  # noqa: F401  registers Segmentor
from .segmentor import Segmentor

__all__ = ["Segmentor"]
