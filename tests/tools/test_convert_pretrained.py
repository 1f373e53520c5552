"""tools/convert_pretrained.py: torchvision weights reproduce torchvision's ResNet; deep-stem layouts map fully;
training-time loading of the result is strict about the backbone."""
import importlib.util
import os
import pickle
import types

import pytest
import torch
import torchvision
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.projects.deeplab import build_resnet_deeplab_backbone

from semiseg_d2.engine.checkpoint import CONVERTER_INFO_KEY
from semiseg_d2.engine.trainer import SegTrainer, SemiSegTrainer
from semiseg_d2.modeling.backbone import build_semiseg_resnet_backbone
from tests.tiny import tiny_cfg

_TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_pretrained.py")
_spec = importlib.util.spec_from_file_location("convert_pretrained", _TOOL)
convert_pretrained = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_pretrained)


class _Holder(nn.Module):
    """Just a ``.backbone`` attribute, so names match the converter's ``backbone.`` prefix."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def _r50_cfg(stem="basic", stem_out=64, output_stride=None):
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    cfg.MODEL.RESNETS.STEM_TYPE = stem
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = stem_out
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 1, 1]
    if output_stride is not None:
        cfg.MODEL.RESNETS.OUTPUT_STRIDE = output_stride
    return cfg


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _write_pkl(tmp_path, state_dict):
    src = tmp_path / "src.pth"
    torch.save(state_dict, src)
    out = tmp_path / "out.pkl"
    info = convert_pretrained.main([str(src), str(out)])
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["matching_heuristics"] is False and "__author__" in data
    return str(out), info


def _load(backbone, path):
    """Load with DetectionCheckpointer; assert nothing missing, unexpected or of the wrong shape."""
    holder = _Holder(backbone)
    checkpointer = DetectionCheckpointer(holder)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    return holder


def test_torchvision_resnet50_matches_after_conversion(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    _randomise_bn(tv)
    path, info = _write_pkl(tmp_path, tv.state_dict())
    assert info == {"layout": "torchvision", "stem_type": "basic", "stem_out_channels": 64, "depth": 50}

    # Dilation-free detectron2 DeepLab ResNet (output stride 32) computes exactly what torchvision does.
    cfg = _r50_cfg()
    cfg.MODEL.RESNETS.RES4_DILATION, cfg.MODEL.RESNETS.RES5_DILATION = 1, 1
    holder = _load(build_resnet_deeplab_backbone(cfg, ShapeSpec(channels=3)), path)
    holder.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = nn.Sequential(*list(tv.children())[:-2])(x)
        ours = holder.backbone(x)["res5"]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    # The same file loads completely into our OS16 / OS8 backbones (dilations do not change names/shapes).
    for os_ in (8, 16):
        _load(build_semiseg_resnet_backbone(_r50_cfg(output_stride=os_), ShapeSpec(channels=3)), path)


def _deep_stem_state_dict(stem_width):
    """A torchvision ResNet-50 state dict re-laid out as timm's deep-stem ('c') model."""
    sd = torchvision.models.resnet50(weights=None).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("conv1.", "bn1."))}
    half = stem_width // 2

    def bn(prefix, n):
        return {
            f"{prefix}.weight": torch.rand(n), f"{prefix}.bias": torch.randn(n),
            f"{prefix}.running_mean": torch.randn(n), f"{prefix}.running_var": torch.rand(n) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(0),
        }

    sd.update({"conv1.0.weight": torch.randn(half, 3, 3, 3), **bn("conv1.1", half),
               "conv1.3.weight": torch.randn(half, half, 3, 3), **bn("conv1.4", half),
               "conv1.6.weight": torch.randn(stem_width, half, 3, 3), **bn("bn1", stem_width)})
    return sd


def test_timm_deep_stem_maps_every_key(tmp_path):
    # timm resnet50c/d stems are 32-32-64; layer1 then takes 64 channels as in torchvision.
    sd = _deep_stem_state_dict(64)
    path, info = _write_pkl(tmp_path, sd)
    assert info["layout"] == "timm_deep" and info["stem_type"] == "deeplab" and info["stem_out_channels"] == 64
    backbone = build_semiseg_resnet_backbone(_r50_cfg(stem="deeplab", stem_out=64), ShapeSpec(channels=3))
    holder = _load(backbone, path)
    torch.testing.assert_close(holder.state_dict()["backbone.stem.conv3.weight"], sd["conv1.6.weight"])
    torch.testing.assert_close(holder.state_dict()["backbone.stem.conv3.norm.running_var"], sd["bn1.running_var"])
    torch.testing.assert_close(holder.state_dict()["backbone.stem.conv2.norm.bias"], sd["conv1.4.bias"])


def test_pspnet_deep_base_layout(tmp_path):
    # PSPNet / U2PL / DGCL "deep_base" ResNet: conv1..3 + bn1..3, 64-64-128 stem.
    timm = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2", "conv1.6": "conv3",
            "bn1": "bn3"}
    sd = {}
    for k, v in _deep_stem_state_dict(128).items():
        module, param = k.rsplit(".", 1)
        sd[f"{timm.get(module, module)}.{param}"] = v
    sd["layer1.0.conv1.weight"] = torch.randn(64, 128, 1, 1)
    sd["layer1.0.downsample.0.weight"] = torch.randn(256, 128, 1, 1)
    path, info = _write_pkl(tmp_path, {"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert info["layout"] == "pspnet_deep" and info["stem_out_channels"] == 128 and info["depth"] == 50
    holder = _load(build_semiseg_resnet_backbone(_r50_cfg(stem="deeplab", stem_out=128), ShapeSpec(channels=3)), path)
    torch.testing.assert_close(holder.state_dict()["backbone.stem.conv3.norm.running_mean"], sd["bn3.running_mean"])
    torch.testing.assert_close(holder.state_dict()["backbone.stem.conv1.weight"], sd["conv1.weight"])


def test_unmapped_keys_and_avg_down_are_errors():
    sd = torchvision.models.resnet50(weights=None).state_dict()
    sd["layer1.0.se.fc1.weight"] = torch.zeros(1)
    sd["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 source keys have no mapping.*extra.*layer1\.0\.se\.fc1\.weight"):
        convert_pretrained.convert_resnet_state_dict(sd)
    sd = _deep_stem_state_dict(64)
    sd["layer2.0.downsample.2.weight"] = sd.pop("layer2.0.downsample.1.weight")
    with pytest.raises(ValueError, match="average-pool shortcut"):
        convert_pretrained.convert_resnet_state_dict(sd)


# ---- training-time loading (SegTrainer / SemiSegTrainer.load_initial_weights): the backbone loads completely or
# training stops naming the keys; heads and terms (not in an ImageNet file) start from their initialisation.

def _model_cfg(stem, stem_out):
    cfg = _r50_cfg(stem=stem, stem_out=stem_out)
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res4", "res5"]  # what the DeepLabv3+ head reads
    return cfg


def _trainer_stub(cfg):
    """What load_initial_weights reads of a trainer: its (unwrapped) model and its config."""
    return types.SimpleNamespace(model=build_model(cfg), cfg=cfg)


@pytest.fixture(scope="module")
def torchvision_pkl(tmp_path_factory):
    """(path, converted tensors) of a torchvision ResNet-50 through tools/convert_pretrained.py."""
    torch.manual_seed(0)
    path, info = _write_pkl(tmp_path_factory.mktemp("tv"), torchvision.models.resnet50(weights=None).state_dict())
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data[CONVERTER_INFO_KEY] == info  # the converter records the stem it wrote
    return path, data["model"]


def test_torchvision_checkpoint_into_deep_stem_config_stops_naming_the_stem(torchvision_pkl):
    path, _ = torchvision_pkl
    stub = _trainer_stub(_model_cfg("deeplab", 128))
    with pytest.raises(ValueError) as e:
        SegTrainer.load_initial_weights(stub, path)
    msg = str(e.value)
    # 7x7 vs 3x3 conv1, a stem conv2/conv3 the file lacks, res2.0 fed 128 instead of 64 channels
    assert "backbone.stem.conv1.weight: (64, 3, 7, 7) -> (64, 3, 3, 3)" in msg
    assert "backbone.stem.conv2.weight" in msg and "backbone.stem.conv3.norm.weight" in msg
    assert "backbone.res2.0.conv1.weight: (64, 64, 1, 1) -> (64, 128, 1, 1)" in msg
    assert "the file's ResNet stem is 'basic'" in msg and "MODEL.RESNETS.STEM_TYPE 'deeplab'" in msg
    assert "MODEL.RESNETS.STEM_TYPE basic" in msg and path in msg


def test_torchvision_checkpoint_into_basic_stem_config_loads_every_backbone_tensor(torchvision_pkl):
    path, weights = torchvision_pkl
    cfg = _model_cfg("basic", 64)
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    stub = _trainer_stub(cfg)
    head_before = {k: v.clone() for k, v in stub.model.student.state_dict().items() if not k.startswith("backbone.")}
    SemiSegTrainer.load_initial_weights(stub, path)
    for network in (stub.model.student, stub.model.teacher):  # the teacher starts as the student's copy
        state = network.state_dict()
        backbone = sorted(k for k in state if k.startswith("backbone."))
        assert len(backbone) == len(weights) == 318  # every ResNet-50 tensor of the file (all but fc.*)
        assert sorted(weights) == backbone
        for k in backbone:
            torch.testing.assert_close(state[k], torch.as_tensor(weights[k]), rtol=0, atol=0)
        for k, v in head_before.items():  # heads are not in the file: their initialisation stays
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_declared_new_keys_may_be_absent(torchvision_pkl, tmp_path):
    path, weights = torchvision_pkl
    weights = dict(weights)
    cfg = _model_cfg("deeplab", 128)
    # A config that adds a new stem (and so a new first block) on purpose declares it; the rest must still load.
    cfg.MODEL.WEIGHTS_NEW_KEYS = [r"backbone\.stem\.", r"backbone\.res2\.0\."]
    stub = _trainer_stub(cfg)
    SegTrainer.load_initial_weights(stub, path)
    state = stub.model.state_dict()
    torch.testing.assert_close(state["backbone.res5.2.conv3.weight"], torch.as_tensor(weights["backbone.res5.2.conv3.weight"]))
    # ... but only those: a missing res5 tensor is still an error naming it
    del weights["backbone.res5.2.conv3.weight"]
    path = str(tmp_path / "partial.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test", "matching_heuristics": False}, f)
    with pytest.raises(ValueError, match=r"1 tensors missing from the file: backbone\.res5\.2\.conv3\.weight"):
        SegTrainer.load_initial_weights(_trainer_stub(cfg), path)


def test_trainer_checkpoint_as_initial_weights_says_so(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"student." + k: v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r"SemiSegmentor trainer checkpoint.*tools/export_model\.py"):
        SegTrainer.load_initial_weights(_trainer_stub(cfg), str(path))
