"""Data: dataset registrations, label reading, split lists, mappers, loaders and the per-sample strong augmentation."""
from .datasets import builtin  # noqa: F401  registers every dataset (import side effect)
from .build import build_sem_seg_test_loader, build_sem_seg_train_loader, build_semi_train_loader  # noqa: F401
from .label_io import load_sem_seg  # noqa: F401
from .mapper import SemSegDatasetMapper, UnlabeledDatasetMapper  # noqa: F401
from .transforms import StrongPhotometricAug  # noqa: F401
