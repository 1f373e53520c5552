"""U2PLDeepLabV3PlusHead against an independent transcription of U2PL's ``dec_deeplabv3_plus`` (the decoder of
DGCL and DDFP): same parameter shapes, same outputs on copied weights (eval and train mode), and the feature the
DGCL / DDFP terms read has dropout applied in training mode only."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec

from semiseg_d2.modeling.heads import U2PLDeepLabV3PlusHead
from tests.tiny import tiny_cfg


# ---- transcription of Haochen-Wang409/U2PL u2pl/models/base.py ASPP and u2pl/models/decoder.py
# dec_deeplabv3_plus (= Gavinwxy/DGCL dgcl/models/{base,decoder}.py, rep_head off), nn.BatchNorm2d, literal widths.
class OfficialASPP(nn.Module):
    def __init__(self, in_planes, inner_planes=256, dilations=(12, 24, 36)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)),
                                   nn.Conv2d(in_planes, inner_planes, kernel_size=1, padding=0, dilation=1, bias=False),
                                   nn.BatchNorm2d(inner_planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(in_planes, inner_planes, kernel_size=1, padding=0, dilation=1, bias=False),
                                   nn.BatchNorm2d(inner_planes), nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(in_planes, inner_planes, kernel_size=3, padding=dilations[0],
                                             dilation=dilations[0], bias=False),
                                   nn.BatchNorm2d(inner_planes), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(nn.Conv2d(in_planes, inner_planes, kernel_size=3, padding=dilations[1],
                                             dilation=dilations[1], bias=False),
                                   nn.BatchNorm2d(inner_planes), nn.ReLU(inplace=True))
        self.conv5 = nn.Sequential(nn.Conv2d(in_planes, inner_planes, kernel_size=3, padding=dilations[2],
                                             dilation=dilations[2], bias=False),
                                   nn.BatchNorm2d(inner_planes), nn.ReLU(inplace=True))
        self.out_planes = (len(dilations) + 2) * inner_planes

    def forward(self, x):
        _, _, h, w = x.size()
        feat1 = F.interpolate(self.conv1(x), size=(h, w), mode="bilinear", align_corners=True)
        return torch.cat((feat1, self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)), 1)


class OfficialDecV3Plus(nn.Module):
    def __init__(self, in_planes, num_classes=19, inner_planes=256, dilations=(12, 24, 36)):
        super().__init__()
        self.low_conv = nn.Sequential(nn.Conv2d(256, 48, kernel_size=1), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.aspp = OfficialASPP(in_planes, inner_planes=inner_planes, dilations=dilations)
        self.head = nn.Sequential(
            nn.Conv2d(self.aspp.out_planes, 256, kernel_size=3, padding=1, dilation=1, bias=False),
            nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.Dropout2d(0.1))
        self.classifier = nn.Sequential(
            nn.Conv2d(256 + 48, 256, kernel_size=3, stride=1, padding=1, bias=True), nn.BatchNorm2d(256),
            nn.ReLU(inplace=True), nn.Dropout2d(0.1),
            nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True), nn.BatchNorm2d(256),
            nn.ReLU(inplace=True), nn.Dropout2d(0.1))
        self.final = nn.Conv2d(256, num_classes, kernel_size=1, stride=1, padding=0, bias=True)

    def forward(self, x):
        x1, x2, x3, x4 = x
        aspp_out = self.aspp(x4)
        low_feat = self.low_conv(x1)
        aspp_out = self.head(aspp_out)
        h, w = low_feat.size()[-2:]
        aspp_out = F.interpolate(aspp_out, size=(h, w), mode="bilinear", align_corners=True)
        aspp_out = torch.cat((low_feat, aspp_out), dim=1)
        fts = self.classifier(aspp_out)
        return {"fts": fts, "pred": self.final(fts.clone())}


# official module prefix -> ours
NAME_MAP = {
    "low_conv.0": "project.0", "low_conv.1": "project.1",
    "aspp.conv1.1": "aspp.pool.0", "aspp.conv1.2": "aspp.pool.1",
    "aspp.conv2.0": "aspp.branches.0.0", "aspp.conv2.1": "aspp.branches.0.1",
    "aspp.conv3.0": "aspp.branches.1.0", "aspp.conv3.1": "aspp.branches.1.1",
    "aspp.conv4.0": "aspp.branches.2.0", "aspp.conv4.1": "aspp.branches.2.1",
    "aspp.conv5.0": "aspp.branches.3.0", "aspp.conv5.1": "aspp.branches.3.1",
    "head.0": "aspp_head.0", "head.1": "aspp_head.1",
    "classifier.0": "decoder_convs.0", "classifier.1": "decoder_norms.0",
    "classifier.4": "decoder_convs.1", "classifier.5": "decoder_norms.1",
    "final": "predictor",
}
IN_PLANES, NUM_CLASSES, DILATIONS = 64, 5, (1, 2, 3)


def _ours_name(official: str) -> str:
    prefix, leaf = official.rsplit(".", 1)
    return f"{NAME_MAP[prefix]}.{leaf}"


def _pair():
    torch.manual_seed(0)
    official = OfficialDecV3Plus(IN_PLANES, NUM_CLASSES, dilations=DILATIONS)
    ours = U2PLDeepLabV3PlusHead(
        {"res2": ShapeSpec(channels=256, stride=4), "res5": ShapeSpec(channels=IN_PLANES, stride=16)},
        num_classes=NUM_CLASSES, aspp_dilations=DILATIONS, norm="BN",
    )
    return official, ours


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 256, 16, 20, generator=g), torch.randn(2, IN_PLANES, 4, 5, generator=g)


def test_parameter_and_buffer_shapes_match_the_official_module_one_to_one():
    official, ours = _pair()
    ref = official.state_dict()
    got = ours.state_dict()
    mapped = {_ours_name(k): v.shape for k, v in ref.items()}
    assert set(mapped) == set(got)
    assert {k: tuple(s) for k, s in mapped.items()} == {k: tuple(v.shape) for k, v in got.items()}


@pytest.mark.parametrize("train", [False, True])
def test_forward_on_copied_weights_equals_the_official_module(train):
    official, ours = _pair()
    ours.load_state_dict({_ours_name(k): v for k, v in official.state_dict().items()})
    low, high = _inputs()
    official.train(train)
    ours.train(train)
    torch.manual_seed(7)  # the three Dropout2d draw in the same order in both modules
    ref = official([low, None, None, high])
    torch.manual_seed(7)
    got = ours({"res2": low, "res5": high})
    torch.testing.assert_close(got["features"], ref["fts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits"], ref["pred"], rtol=1e-5, atol=1e-5)
    # the DDFP entry point re-decodes the returned decoder input to the same tensors
    torch.manual_seed(8)
    feats, logits = ours.decode(got["decoder_input"])
    if not train:
        torch.testing.assert_close(feats, got["features"])
        torch.testing.assert_close(logits, got["logits"])


def _zero_channels(x: torch.Tensor) -> int:
    return int((x.abs().amax(dim=(2, 3)) == 0).sum())


def _extract(model, images, train: bool, dropout: float):
    for m in model.sem_seg_head.modules():
        if isinstance(m, nn.Dropout2d):
            m.p = dropout
    model.train(train)
    torch.manual_seed(0)
    with torch.set_grad_enabled(train):
        return model.extract(images)  # what SemiSegmentor slices into step.student_* (DGCL / DDFP read "features")


def test_features_the_terms_read_have_dropout_in_train_mode_only():
    from detectron2.modeling import build_model

    cfg = tiny_cfg(head="U2PLDeepLabV3PlusHead")
    model = build_model(cfg)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dropped = _extract(model, images, train=True, dropout=0.5)
    kept = _extract(model, images, train=True, dropout=0.0)
    assert dropped["features"].shape[1] == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == model.feature_dim
    # Dropout2d(0.5) on the last block over 2 x 32 channels: about half of them entirely zero, beyond the ReLU's
    extra_zeros = _zero_channels(dropped["features"]) - _zero_channels(kept["features"])
    assert 16 <= extra_zeros <= 48
    # logits are the classifier applied to exactly these (dropped) features
    torch.testing.assert_close(dropped["logits"], model.sem_seg_head.predictor(dropped["features"]))
    # eval mode: no dropout anywhere (same result as with every dropout rate at 0)
    torch.testing.assert_close(_extract(model, images, train=False, dropout=0.5)["features"],
                               _extract(model, images, train=False, dropout=0.0)["features"])


def test_plain_bn_training_with_one_image_names_the_cause():
    _, ours = _pair()
    low, high = _inputs()
    with pytest.raises(ValueError, match="image-pooling branch has BN"):
        ours({"res2": low[:1], "res5": high[:1]})
