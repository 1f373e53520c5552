"""Every shipped config loads with semiseg_d2's keys, names registered datasets of the right class count,
and builds its model (with tiny widths)."""
import glob
import os
import re

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from semiseg_d2.config import get_semiseg_cfg
from semiseg_d2.data.datasets import register_folder_datasets_from_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-") and "_base" not in os.path.basename(p).lower()
    and not os.path.basename(p).startswith("protocol_")  # study protocols: key overrides merged on a config
)


def test_there_are_configs_for_every_method():
    names = " ".join(os.path.basename(p) for p in CONFIGS)
    for method in ("supervised", "mean_teacher", "dgcl", "ddfp", "memory_contrast", "unimatch"):
        assert method in names, method
    assert os.path.exists(os.path.join(ROOT, "configs", "dgcl_city.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads_and_names_registered_datasets(path):
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(path)
    register_folder_datasets_from_cfg(cfg)  # DATASETS.FOLDERS (lazy: no folder is read)
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TRAIN_LABELED) + list(cfg.DATASETS.TRAIN_UNLABELED)
    names += list(cfg.DATASETS.TEST)
    assert names, path
    for name in names:
        assert name in DatasetCatalog, f"{path}: dataset {name} is not registered"
        classes = MetadataCatalog.get(name).stuff_classes
        assert len(classes) == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, (path, name)
    if cfg.MODEL.META_ARCHITECTURE == "SemiSegmentor":
        assert cfg.DATASETS.TRAIN_UNLABELED, path


@pytest.mark.parametrize("path", [p for p in CONFIGS if "cityscapes/dgcl_186" in p or "voc/mean_teacher_92" in p
                                  or "camvid/mean_teacher" in p or "gta5_city/memory_contrast_R101_dlv2_1-30" in p
                                  or "voc/unimatch_dgcl_92" in p])
def test_config_builds_a_model_with_tiny_widths(path):
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(path)
    register_folder_datasets_from_cfg(cfg)  # DATASETS.FOLDERS (lazy: no folder is read)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.SEMI.MEMORY_CONTRAST.FEATURE_DIM = 0  # narrow widths change the head's feature size: take it from the head
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_gpu_recipe_on_a_machine_without_gpu_says_how_to_run_on_cpu():
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "dgcl_city.yaml"))
    assert cfg.MODEL.DEVICE == "cuda" and cfg.SOLVER.AMP.ENABLED and cfg.MODEL.CHANNELS_LAST
    with pytest.raises(RuntimeError, match="MODEL.DEVICE cpu"):
        build_model(cfg)


PUBLISHED = [p for p in CONFIGS if re.search(r"/(dgcl|ddfp)_\d+\.yaml$", p) or p.endswith("dgcl_city.yaml")]
_SWITCH = re.compile(r"\b((?:SEMI|TEST)\.[A-Z0-9_.]*[A-Z0-9_]) (\S+)")


def _header_switches(path):
    """KEY VALUE pairs named in the config's leading comment block (trailing punctuation stripped)."""
    header = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line[1:])
    return [(k, v.rstrip(".,;)")) for k, v in _SWITCH.findall(" ".join(header))]


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: os.path.relpath(p, ROOT))
def test_published_config_header_names_the_official_behaviour(path):
    """Each published-number config trains our fixes and its header names the switches of the official run."""
    from semiseg_d2.config import check_teacher_mode

    switches = _header_switches(path)
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(path)
    assert cfg.SEMI.TEACHER_TRAIN_MODE is False and cfg.SEMI.TEACHER_MODE == "ema" and not cfg.SEMI.TEACHER_AUTOCAST
    assert ("SEMI.TEACHER_TRAIN_MODE", "True") in switches, path
    cfg.merge_from_list([x for kv in switches for x in kv])
    if "dgcl" in os.path.basename(path):
        assert cfg.SEMI.DGCL.OFFICIAL_WORLD_SIZE == cfg.SOLVER.REFERENCE_WORLD_SIZE  # the official run's GPUs
        assert cfg.SEMI.DGCL.START == "all_classes" and list(cfg.SEMI.DGCL.SKIP_CLASSES) == [0]
    else:
        assert cfg.SEMI.TEACHER_MODE == "student"
        check_teacher_mode(cfg)  # the named switches form a valid config
