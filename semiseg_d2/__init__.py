"""semiseg_d2: semi-supervised semantic segmentation on Detectron2.

Importing the package registers its datasets, backbones, heads, meta-architectures and loss terms.
"""
from .utils.run_logging import filter_known_warnings

filter_known_warnings()  # before detectron2 is imported (by .config): its import-time warnings say nothing here

from .config import add_semiseg_config, check_semiseg_config, get_semiseg_cfg  # noqa: E402
from . import data  # noqa: F401,E402  registers datasets
from . import modeling  # noqa: F401,E402  registers backbones, heads, meta-architectures
from . import losses  # noqa: F401,E402  registers loss terms

__all__ = ["add_semiseg_config", "check_semiseg_config", "get_semiseg_cfg"]
__version__ = "0.1.0"
