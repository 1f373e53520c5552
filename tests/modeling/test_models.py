"""Backbone, heads and Segmentor on tiny configs: shapes, strides, losses, inference modes, errors."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from semiseg_d2.config import get_semiseg_cfg
from semiseg_d2.losses.segmentation import ohem_cross_entropy
from semiseg_d2.modeling.meta_arch.segmentor import window_starts
from tests.tiny import tiny_cfg

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
C = 11


def _model(head="DeepLabV3PlusFeatHead", output_stride=16, **overrides):
    cfg = tiny_cfg(head=head, num_classes=C, output_stride=output_stride)
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
         "sem_seg": torch.randint(0, C, (h, w), generator=g)}
        for h, w in sizes
    ]


def _cdiv(a, b):
    return -(-a // b)


V3P = ("DeepLabV3PlusFeatHead", "U2PLDeepLabV3PlusHead")


@pytest.mark.parametrize("head,os_", [("DeepLabV3PlusFeatHead", 16), ("U2PLDeepLabV3PlusHead", 16),
                                     ("DeepLabV2Head", 8)])
def test_heads_forward_backward_at_odd_sizes_and_batch_one(head, os_):
    model, _ = _model(head, os_)
    model.train()
    for size in [(64, 64), (65, 97), (96, 80)]:
        # U2PL's ASPP pooling branch has BN: batch >= 2 per process with plain BN (tests/modeling/test_u2pl_head.py)
        for bs in ((2,) if head == "U2PLDeepLabV3PlusHead" else (1, 2)):
            images = model.normalize(torch.stack([x["image"] for x in _batch([size] * bs)]))
            out = model.extract(images)
            H, W = size
            stride = 4 if head in V3P else os_
            assert out["logits"].shape == (bs, C, _cdiv(H, stride), _cdiv(W, stride))
            assert out["features"].shape[2:] == out["logits"].shape[2:]
            if head in V3P:
                assert out["features"].shape[1] == 32 == model.feature_dim  # CONVS_DIM
                assert out["decoder_input"].shape == (bs, 32 + 8, _cdiv(H, 4), _cdiv(W, 4))  # ASPP || proj
                feats, logits = model.sem_seg_head.decode(out["decoder_input"])
                assert logits.shape == out["logits"].shape and feats.shape == out["features"].shape
            else:
                assert out["features"].shape[1] == 256 == model.feature_dim  # res5 of the tiny ResNet
                assert "decoder_input" not in out
            assert "aux_logits" not in out
            model.zero_grad()
            losses = model(_batch([size] * bs, seed=1))
            assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
            losses["loss_sem_seg"].backward()
            assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0
            for p in model.sem_seg_head.parameters():
                assert p.grad is not None


def test_v2_head_sums_all_four_branches():
    model, _ = _model("DeepLabV2Head", 8)
    head = model.sem_seg_head.eval()
    assert [c.dilation for c in head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(1, 256, 9, 7)
    torch.testing.assert_close(head({"res5": x})["logits"], sum(conv(x) for conv in head.branches))
    assert head({"res5": x})["features"] is x


def test_inference_output_at_original_size():
    for head in ("DeepLabV3PlusFeatHead", "DeepLabV2Head"):
        model, _ = _model(head)
        model.eval()
        image = torch.rand(3, 65, 97) * 255
        out = model([{"image": image, "height": 65, "width": 97}, {"image": image, "height": 130, "width": 50}])
        assert out[0]["sem_seg"].shape == (C, 65, 97) and out[1]["sem_seg"].shape == (C, 130, 50)
        torch.testing.assert_close(out[0]["sem_seg"].sum(0), torch.ones(65, 97))


@pytest.mark.parametrize("head,os_,aux_stride", [("DeepLabV3PlusFeatHead", 16, 16), ("DeepLabV2Head", 8, 8)])
def test_aux_head_built_only_when_weighted(head, os_, aux_stride):
    model, _ = _model(head, os_)
    assert model.sem_seg_head.aux_head is None
    assert not any("aux" in n for n, _ in model.named_parameters())
    model, _ = _model(head, os_, **{"MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT": 0.4})
    assert model.sem_seg_head.aux_head is not None
    model.train()
    out = model.extract(model.normalize(_batch([(65, 97)])[0]["image"][None]))
    assert out["aux_logits"].shape == (1, C, _cdiv(65, aux_stride), _cdiv(97, aux_stride))
    losses = model(_batch([(64, 64)] * 2))
    assert set(losses) == {"loss_sem_seg", "loss_aux"}
    losses["loss_aux"].backward()
    assert model.sem_seg_head.aux_head.predictor.weight.grad.abs().sum() > 0
    model.eval()
    assert "aux_logits" not in model.extract(torch.zeros(1, 3, 64, 64))


def test_losses_follow_loss_type_and_weights():
    model, _ = _model(**{"MODEL.SEM_SEG_HEAD.LOSS_TYPE": "ohem", "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT": 0.5,
                         "MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT": 0.4, "MODEL.SEM_SEG_HEAD.OHEM_MIN_KEPT": 50})
    torch.manual_seed(0)
    outputs = {"logits": torch.randn(2, C, 16, 16), "aux_logits": torch.randn(2, C, 4, 4)}
    targets = torch.randint(0, C, (2, 64, 64))
    losses = model.losses(outputs, targets)
    torch.testing.assert_close(losses["loss_sem_seg"], 0.5 * ohem_cross_entropy(outputs["logits"], targets, 255,
                                                                                 0.7, 50))
    torch.testing.assert_close(losses["loss_aux"], 0.4 * ohem_cross_entropy(outputs["aux_logits"], targets, 255,
                                                                             0.7, 50))


def test_training_batch_of_different_sizes_pads_labels_with_ignore():
    model, _ = _model()
    model.train()
    batch = _batch([(64, 64), (48, 80)])
    batch[1]["sem_seg"][:] = 255  # an unlabeled image contributes nothing, the padded one neither
    losses = model(batch)
    assert torch.isfinite(losses["loss_sem_seg"])


def test_output_stride_sets_feature_strides_and_dilations():
    strides = {}
    for os_ in (8, 16):
        model, _ = _model(output_stride=os_, **{"MODEL.RESNETS.RES5_MULTI_GRID": [1, 2, 4]})
        shapes = model.backbone.output_shape()
        strides[os_] = {k: v.stride for k, v in shapes.items()}
        feats = model.backbone(torch.zeros(1, 3, 64, 96))
        for name, spec in shapes.items():
            assert feats[name].shape[-2:] == (64 // spec.stride, 96 // spec.stride)
        res5_dil = [blk.conv2.dilation[0] for blk in model.backbone.res5]
        assert res5_dil == ([4, 8, 16] if os_ == 8 else [2, 4, 8])
        assert model.backbone.res4[1].conv2.dilation[0] == (2 if os_ == 8 else 1)
    assert strides[8] == {"res2": 4, "res4": 8, "res5": 8}
    assert strides[16] == {"res2": 4, "res4": 16, "res5": 16}


def test_config_errors_name_key_value_and_options():
    with pytest.raises(ValueError, match=r"MODEL\.RESNETS\.OUTPUT_STRIDE = 32.*one of 8, 16"):
        _model(output_stride=32)
    with pytest.raises(KeyError, match=r"MODEL\.SEM_SEG_HEAD\.NAME.*'DeepLabV3PlusFeatHaed'.*DeepLabV2Head.*DeepLabV3PlusFeatHead"):
        _model(head="DeepLabV3PlusFeatHaed")
    with pytest.raises(KeyError, match=r"MODEL\.BACKBONE\.NAME.*'resnet'.*build_semiseg_resnet_backbone"):
        _model(**{"MODEL.BACKBONE.NAME": "resnet"})
    with pytest.raises(ValueError, match=r"MODEL\.RESNETS\.STEM_TYPE.*'deep'.*basic"):
        _model(**{"MODEL.RESNETS.STEM_TYPE": "deep"})
    with pytest.raises(ValueError, match=r"MODEL\.SEM_SEG_HEAD\.LOSS_TYPE.*'focal'.*ohem"):
        _model(**{"MODEL.SEM_SEG_HEAD.LOSS_TYPE": "focal"})
    with pytest.raises(ValueError, match=r"INPUT\.CROP\.SIZE.*\(24, 64\).*>= 32"):
        _model(**{"INPUT.CROP.SIZE": (24, 64)})
    with pytest.raises(ValueError, match=r"AUX_IN_FEATURE.*'res4'.*OUT_FEATURES"):
        _model(**{"MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT": 0.4, "MODEL.RESNETS.OUT_FEATURES": ["res2", "res5"]})


def test_smallest_allowed_crop_trains_with_batch_one():
    model, _ = _model(**{"INPUT.CROP.SIZE": (32, 32)})
    model.train()
    model(_batch([(32, 32)]))["loss_sem_seg"].backward()


def test_default_predictor_loads_checkpoint_and_matches_model(tmp_path):
    model, cfg = _model()
    model.eval()
    for m in model.modules():  # non-trivial BN statistics, so a failed load shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    rgb = np.random.RandomState(0).randint(0, 256, (50, 70, 3)).astype(np.uint8)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    image = torch.as_tensor(rgb.transpose(2, 0, 1).astype("float32"))
    for min_size in (0, 96):  # 0: no resize; 96: DefaultPredictor resizes, output still at 50x70
        cfg.INPUT.MIN_SIZE_TEST = min_size
        cfg.INPUT.MAX_SIZE_TEST = 1000
        pred = DefaultPredictor(cfg)(bgr)["sem_seg"]
        assert pred.shape == (C, 50, 70)
        if min_size == 0:
            with torch.no_grad():
                ref = model([{"image": image, "height": 50, "width": 70}])[0]["sem_seg"]
            torch.testing.assert_close(pred, ref, rtol=1e-5, atol=1e-6)


def test_window_starts_align_last_window_to_edge():
    assert window_starts(100, 40, 30) == [0, 30, 60]
    assert window_starts(100, 40, 25) == [0, 25, 50, 60]
    assert window_starts(40, 40, 25) == [0]
    assert window_starts(30, 40, 25) == [0]


class _PointwiseExtract(nn.Module):
    """A per-pixel 1x1 'model': padding and window placement cannot change its output, only bookkeeping can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, C, 1)

    def forward(self, images):
        return {"logits": self.conv(images) * 3}


def _with_sliding(model, size, stride, batch=4):
    model.sliding_window = (tuple(size), tuple(stride), batch)
    return model


def test_sliding_window_bookkeeping_with_pointwise_model():
    model, _ = _model()
    model.eval()
    stub = _PointwiseExtract()
    model.extract = lambda images: stub(images)  # instance attribute shadows Segmentor.extract
    g = torch.Generator().manual_seed(0)
    for (H, W), size, stride in [((64, 96), (32, 40), (20, 24)),  # overlaps + edge-aligned last windows
                                 ((70, 97), (33, 50), (33, 50)),  # no overlap, ragged edge
                                 ((50, 60), (64, 64), (32, 32)),  # image smaller than the window: pad + crop
                                 ((50, 90), (64, 64), (40, 40))]:  # smaller in h only
        x = torch.randn(2, 3, H, W, generator=g)
        model.sliding_window = None
        whole = model.predict_probs(x)
        _with_sliding(model, size, stride, batch=3)
        torch.testing.assert_close(model.predict_probs(x), whole, rtol=1e-5, atol=1e-6)


def test_sliding_window_on_real_model():
    model, _ = _model()
    model.eval()
    x = model.normalize((torch.rand(1, 3, 64, 96) * 255))
    whole = model.predict_probs(x)
    # a window exactly the image size is one whole-image pass
    torch.testing.assert_close(_with_sliding(model, (64, 96), (32, 32)).predict_probs(x), whole,
                               rtol=1e-5, atol=1e-5)
    # windows smaller / larger than the image: right shape, proper distributions (padding changes values)
    for size in [(40, 48), (80, 128)]:
        probs = _with_sliding(model, size, (24, 32)).predict_probs(x)
        assert probs.shape == (1, C, 64, 96)
        torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 96))


def test_multiscale_flip_averages_probabilities():
    model, _ = _model(**{"TEST.AUG.ENABLED": True, "TEST.AUG.SCALES": [0.5, 1.0], "TEST.AUG.FLIP": True})
    model.eval()
    x = model.normalize(torch.rand(1, 3, 64, 80) * 255)
    got = model.predict_probs(x)
    expected = 0
    for s in (0.5, 1.0):
        xs = torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for flip in (False, True):
            p = model.whole_image_probs(xs.flip(-1) if flip else xs)
            p = p.flip(-1) if flip else p
            expected = expected + torch.nn.functional.interpolate(p, size=(64, 80), mode="bilinear",
                                                                  align_corners=False) / 4
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model.whole_image_probs(x), atol=1e-4)


def test_channels_last_matches_and_freeze_bn_keeps_backbone_stats():
    model, _ = _model()
    cl_model, _ = _model(**{"MODEL.CHANNELS_LAST": True})
    cl_model.load_state_dict(model.state_dict())
    assert cl_model.backbone.res2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model.eval(), cl_model.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(cl_model.predict_probs(x), model.predict_probs(x), rtol=1e-4, atol=1e-5)

    model, _ = _model(**{"MODEL.FREEZE_BN": True})
    model.train()
    bb_bn = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    head_bn = [m for m in model.sem_seg_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bb_bn and head_bn and not any(m.training for m in bb_bn) and all(m.training for m in head_bn)
    before = bb_bn[0].running_mean.clone()
    model(_batch([(64, 64)] * 2))
    torch.testing.assert_close(bb_bn[0].running_mean, before)


@pytest.mark.parametrize("name", ["Base-DeepLabV3Plus.yaml", "Base-DeepLabV2.yaml"])
def test_base_configs_load_and_build(name):
    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    assert cfg.MODEL.BACKBONE.NAME == "build_semiseg_resnet_backbone"
    # tiny widths on top of the real file
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 16
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS = [8]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = C
    cfg.INPUT.CROP.SIZE = (64, 64)
    cfg.MODEL.DEVICE = "cpu"  # the Base files are GPU recipes (cuda + bf16 + channels_last)
    model = build_model(cfg)
    model.train()
    losses = model(_batch([(64, 64)]))
    assert math.isfinite(float(losses["loss_sem_seg"].detach()))
    os_ = 16 if "V3Plus" in name else 8
    assert model.backbone.output_shape()["res5"].stride == os_
