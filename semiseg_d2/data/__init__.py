"""Data: dataset registrations, label reading, split lists, mappers, loaders and mixing masks."""
from .datasets import builtin  # noqa: F401  registers every dataset (import side effect)
from .label_io import load_sem_seg  # noqa: F401
