"""The semi loader refuses labeled/unlabeled sets with different label spaces, naming the difference."""
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from semiseg_d2.data.build import build_semi_train_loader
from tests.tiny import semi_cfg


@pytest.fixture
def two_label_spaces():
    names = {"test_ls_a": ["road", "car"], "test_ls_b": ["road", "car", "bus"]}
    for name, classes in names.items():
        DatasetCatalog.register(name, lambda: [{"file_name": "x.png", "sem_seg_file_name": "x.png"}])
        MetadataCatalog.get(name).set(stuff_classes=classes, ignore_label=255)
    yield list(names)
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_different_classes_between_labeled_and_unlabeled_is_an_error(two_label_spaces):
    a, b = two_label_spaces
    cfg = semi_cfg(**{"DATASETS.TRAIN_LABELED": (a,), "DATASETS.TRAIN_UNLABELED": (b,)})
    with pytest.raises(ValueError) as e:
        build_semi_train_loader(cfg)
    msg = str(e.value)
    assert "stuff_classes" in msg and a in msg and b in msg and "bus" in msg
