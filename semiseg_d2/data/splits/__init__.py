"""Shipped labeled/unlabeled split lists (``pascal/``, ``cityscapes/``, ``camvid/``, ``camvid_mini/``) and
:mod:`.splits` to read, convert and make them."""
from .splits import (  # noqa: F401
    FORMATS,
    convert_list,
    partition_dataset,
    SHIPPED_SPLITS_DIR,
    entry_id,
    format_record,
    make_partition,
    parse_entry,
    read_list,
    write_list,
)
