from . import segmentor  # noqa: F401  registers Segmentor
from . import semi  # noqa: F401  registers SemiSegmentor
from .segmentor import Segmentor
from .semi import SemiSegmentor

__all__ = ["Segmentor", "SemiSegmentor"]
