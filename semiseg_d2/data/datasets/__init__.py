"""Dataset registrations (one ``register_<name>.py`` each); :mod:`.builtin` registers them at import."""
from . import builtin  # noqa: F401
from .builtin import BUILTIN_DATASETS, datasets_root  # noqa: F401
from .common import unregister  # noqa: F401
from .register_folder import register_folder_dataset, register_folder_datasets_from_cfg  # noqa: F401
