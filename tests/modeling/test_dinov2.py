"""DINOv2 backbone + DPT head + AdamW (modeling/backbone/dinov2.py, heads/dpt.py, engine/optimizer.py).

Tiny ViTs (depth 4, width 32) on the CPU; the official model code is the ``dinov2`` package (test-only dependency).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from semiseg_d2.engine.checkpoint import SemiSegCheckpointer
from semiseg_d2.engine.optimizer import build_optimizer
from semiseg_d2.modeling import Segmentor
from semiseg_d2.modeling.backbone.dinov2 import convert_official_dinov2, resample_patch_pos_embed
from tests.tiny import TINY_DGCL, apply_overrides, fake_batch, tiny_vit_cfg

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "xFormers not available": the official code falls back to plain attention
    from dinov2.models.vision_transformer import DinoVisionTransformer

TAPS = [0, 1, 2, 3]


def official_tiny_vit(seed=0):
    """The official ViT at random init: ViT-S/14 layout, depth 4, width 32, 2 heads, pre-training grid 37x37."""
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=1.0, block_chunks=0
    )
    with torch.no_grad():  # a non-trivial class token and layer scales (init: ~0 and 1)
        vit.cls_token.normal_()
        for blk in vit.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    return vit.eval()


def official_maps(vit, x, registers=None):
    """Official ``get_intermediate_layers(x, TAPS, norm=True)`` as ``[B, D, h, w]`` maps; with ``registers``
    ([1, R, D]) the token sequence of the official register model (dinov2 hub ``prepare_tokens_with_masks``:
    registers inserted after the class token, after the position embedding was added)."""
    B, _, H, W = x.shape
    if registers is None:
        outs = vit.get_intermediate_layers(x, TAPS, norm=True)
        skip = 0
    else:
        t = vit.prepare_tokens_with_masks(x)
        t = torch.cat([t[:, :1], registers.expand(B, -1, -1), t[:, 1:]], dim=1)
        outs = []
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i in TAPS:
                outs.append(vit.norm(t)[:, 1 + registers.shape[1]:])
        skip = 0
    return [o[:, skip:].transpose(1, 2).reshape(B, -1, H // 14, W // 14) for o in outs]


def _segmentor(**overrides):
    return Segmentor(tiny_vit_cfg(**overrides))


def _load_official(model, state_dict, tmp_path):
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(state_dict, path)
    SemiSegCheckpointer(model).load(str(path), checkpointables=[])


# ------------------------------------------------------------------ official parity and weights
@pytest.mark.parametrize("size", [(70, 84), (518, 518)])  # resampled position grid 5x6; the pre-training grid
def test_tapped_features_match_the_official_model(tmp_path, size):
    official = official_tiny_vit()
    model = _segmentor().eval()
    _load_official(model, official.state_dict(), tmp_path)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.backbone(x)
        ref = official_maps(official, x)
    assert list(ours) == ["layer1", "layer2", "layer3", "layer4"]
    for name, r in zip(ours, ref):
        assert ours[name].shape == r.shape == (2, 32, size[0] // 14, size[1] // 14)
        assert (ours[name] - r).abs().max() <= 1e-5, name


def test_registers_checkpoint_matches_the_official_register_layout(tmp_path):
    official = official_tiny_vit(seed=1)
    registers = torch.randn(1, 4, 32)
    sd = dict(official.state_dict(), register_tokens=registers)
    model = _segmentor(**{"MODEL.DINOV2.REGISTERS": True}).eval()
    _load_official(model, sd, tmp_path)
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        ours = list(model.backbone(x).values())
        ref = official_maps(official, x, registers=registers)
    for o, r in zip(ours, ref):
        assert (o - r).abs().max() <= 1e-5


def test_official_keys_convert_in_one_place():
    sd = official_tiny_vit().state_dict()
    out = convert_official_dinov2(sd, prefix="backbone.vit.")
    assert "backbone.vit.mask_token" not in out and len(out) == len(sd) - 1
    assert all(k.startswith("backbone.vit.") for k in out)
    reg = convert_official_dinov2(dict(sd, register_tokens=torch.zeros(1, 4, 32)))
    assert reg["pos_embed"].shape == (1, 37 * 37, 32) and reg["reg_token"].shape == (1, 4, 32)
    assert torch.equal(reg["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    glu = convert_official_dinov2({"blocks.3.mlp.w12.weight": torch.zeros(1), "blocks.3.mlp.w3.bias": torch.zeros(1)})
    assert set(glu) == {"blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias"}


def test_position_resampling_is_the_official_one_not_timms():
    official = official_tiny_vit()
    pos = official.pos_embed.detach()
    x = torch.zeros(1, 1 + 5 * 6, 32)
    ref = official.interpolate_pos_encoding(x, 70, 84)[:, 1:]
    ours = resample_patch_pos_embed(pos[:, 1:], (5, 6), offset=0.1)
    assert torch.allclose(ours, ref, atol=1e-6)
    from timm.layers import resample_abs_pos_embed

    timm_way = resample_abs_pos_embed(pos, new_size=(5, 6), old_size=(37, 37), num_prefix_tokens=1)[:, 1:]
    assert (timm_way - ref).abs().max() > 1e-3  # the two resamplings differ: ours must be the official one


# ------------------------------------------------------------------ padding, head, checkpointing, freezing
def test_inputs_are_padded_to_14_and_predictions_cropped_back():
    torch.manual_seed(0)
    model = _segmentor().eval()
    assert model.size_divisibility == 14
    image = torch.randint(0, 256, (3, 60, 75), dtype=torch.uint8)
    with torch.no_grad():
        probs = model([{"image": image}])[0]["sem_seg"]
        x = model.normalize(image[None])
        padded = F.pad(x, (0, 84 - 75, 0, 70 - 60))  # zeros of the normalised image: the mean colour
        logits = model.extract(padded)["logits"]
        ref = F.interpolate(logits, size=(70, 84), mode="bilinear", align_corners=False)[..., :60, :75].softmax(1)
    assert probs.shape == (11, 60, 75)
    assert torch.allclose(probs, ref[0], atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 14"):
        model.backbone(x)


def test_training_pads_labels_with_ignore():
    torch.manual_seed(0)
    model = _segmentor().train()
    image = torch.randint(0, 256, (3, 60, 75), dtype=torch.uint8)
    label = torch.randint(0, 11, (60, 75))
    loss = model([{"image": image, "sem_seg": label}])["loss_sem_seg"]
    x = F.pad(model.normalize(image[None]), (0, 9, 0, 10))
    target = F.pad(label[None], (0, 9, 0, 10), value=255)
    logits = F.interpolate(model.extract(x)["logits"], size=(70, 84), mode="bilinear", align_corners=False)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=255), atol=1e-6)


def test_crop_size_must_be_a_multiple_of_14():
    with pytest.raises(ValueError, match="INPUT.CROP.SIZE.*multiples of 14"):
        _segmentor(**{"INPUT.CROP.SIZE": (64, 64)})


def test_dpt_outputs_logits_features_and_decoder_input_at_8x_the_token_grid():
    torch.manual_seed(0)
    model = _segmentor().train()
    x = torch.randn(2, 3, 42, 70)  # token grid 3 x 5 (odd sides: the stride-2 conv rounds up)
    out = model.extract(x)
    head = model.sem_seg_head
    assert head.feature_dim == model.feature_dim == 16 and head.spec().num_decoder_norms == len(head.decoder_norms) == 1
    assert out["logits"].shape == (2, 11, 24, 40)
    assert out["features"].shape == out["decoder_input"].shape == (2, 16, 24, 40)
    feats, logits = head.decode(out["decoder_input"])
    assert torch.equal(feats, out["features"]) and torch.equal(logits, out["logits"])
    assert (out["features"] >= 0).all()  # ReLU'd: the feature that feeds the 1x1 classifier
    out["logits"].sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert unused == [], unused


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = _segmentor().train()
    ckpt = _segmentor(**{"MODEL.DINOV2.GRAD_CHECKPOINT": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    batch = [{"image": torch.randint(0, 256, (3, 56, 70), dtype=torch.uint8), "sem_seg": torch.randint(0, 11, (56, 70))}]
    losses = []
    for m in (plain, ckpt):
        loss = m(batch)["loss_sem_seg"]
        loss.backward()
        losses.append(loss.detach())
    assert ckpt.backbone.grad_checkpoint and not plain.backbone.grad_checkpoint
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_frozen_encoder_gets_no_gradient_and_no_optimizer_slot():
    cfg = tiny_vit_cfg(**{"MODEL.DINOV2.FREEZE": True})
    model = Segmentor(cfg)
    opt = build_optimizer(cfg, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.backbone.parameters())
    assert all(id(p) in in_opt for p in model.sem_seg_head.parameters())


# ------------------------------------------------------------------ optimizer
def test_adamw_groups_are_unimatch_v2s():
    """UniMatch V2 (unimatch_v2.py): AdamW([backbone: lr], [rest: lr * 40]), betas (0.9, 0.999), weight decay
    0.01 on every parameter (one weight_decay for both groups), poly 0.9 without warm-up."""
    from semiseg_d2.engine.trainer import SegTrainer

    cfg = tiny_vit_cfg(**{"SOLVER.BASE_LR": 5e-6, "SOLVER.WARMUP_ITERS": 0, "SOLVER.MAX_ITER": 100})
    model = Segmentor(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    lr_of, wd_of = {}, {}
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999)
        for p in g["params"]:
            lr_of[id(p)], wd_of[id(p)] = g["lr"], g["weight_decay"]
    official_backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    official_head = [p for n, p in model.named_parameters() if "backbone" not in n]
    assert len(lr_of) == len(official_backbone) + len(official_head)
    assert all(lr_of[id(p)] == pytest.approx(5e-6) for p in official_backbone)
    assert all(lr_of[id(p)] == pytest.approx(2e-4) for p in official_head)
    assert set(wd_of.values()) == {0.01}
    sched = SegTrainer.build_lr_scheduler(cfg, opt)
    for _ in range(30):
        opt.step()
        sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    factor = (1 - 30 / 100) ** 0.9
    assert lrs == [pytest.approx(5e-6 * factor), pytest.approx(2e-4 * factor)]


def test_optimizer_name_is_checked_and_sgd_stays_the_default():
    cfg = tiny_vit_cfg(**{"SOLVER.OPTIMIZER": "SGD"})
    model = Segmentor(cfg)
    assert isinstance(build_optimizer(cfg, model), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "Adam"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER: unknown 'Adam'"):
        build_optimizer(cfg, model)
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER = 'Adam': unknown value"):  # the start-up range check
        Segmentor(cfg)


# ------------------------------------------------------------------ the methods on ViT + DPT
def _semi_vit_cfg(**overrides):
    cfg = tiny_vit_cfg(crop=(56, 70))
    cfg.MODEL.META_ARCHITECTURE = "SemiSegmentor"
    cfg.SEMI.PSEUDO_LABEL.THRESHOLD = 0.0
    cfg.SOLVER.MAX_ITER = 10
    return apply_overrides(cfg, overrides)


def _backbone_grad(model):
    return sum(float(p.grad.abs().sum()) for p in model.student.backbone.parameters() if p.grad is not None)


def _steps(model, term_loss, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for it in range(steps):
        with EventStorage(it):  # the step's iteration (the trainer's storage)
            losses = model(fake_batch(h=56, w=70, seed=it))
        model.pop_metrics()
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        if it == steps - 1:
            assert float(losses[term_loss].detach()) > 0
            losses[term_loss].backward()  # the term alone reaches the encoder
            assert _backbone_grad(model) > 0
            return losses
        sum(losses.values()).backward()
        opt.step()
        model.after_optimizer_step()


def test_dgcl_trains_on_the_vit_dpt_student():
    torch.manual_seed(0)
    model = build_model(_semi_vit_cfg(**TINY_DGCL)).train()
    assert model.terms["dgcl"].feature_dim == model.student.feature_dim == 16
    _steps(model, "loss_dgcl", 4)


def test_ddfp_trains_on_the_vit_dpt_student():
    torch.manual_seed(0)
    cfg = _semi_vit_cfg(**{
        "SEMI.LOSSES": ["supervised", "pseudo_label", "ddfp"], "SEMI.DDFP.THRESHOLD": 0.0,
        "SEMI.DDFP.FLOW_HIDDEN": [32, 32], "SEMI.DDFP.FLOW_SAMPLES": 256,
    })
    model = build_model(cfg).train()
    assert len(model.terms["ddfp"].perturbed_norms) == 1  # as many as the DPT decode() takes
    _steps(model, "loss_ddfp", 2)


def test_exact_resume_of_a_tiny_vit_semi_run(tmp_path):
    from detectron2.utils.env import seed_all_rng

    from semiseg_d2.engine.trainer import SemiSegTrainer

    def cfg_for(out, max_iter):
        cfg = _semi_vit_cfg(**{
            "DATASETS.TRAIN_LABELED": ("camvid_mini_train_5_labeled",),
            "DATASETS.TRAIN_UNLABELED": ("camvid_mini_train_5_unlabeled",),
            "DATASETS.TEST": (), "INPUT.SCALE_RANGE": [0.2, 0.3], "SOLVER.CHECKPOINT_PERIOD": 2,
            "SEMI.BURN_IN_ITERS": 1, "SEMI.MIX.PROB": 1.0, "TEST.EVAL_PERIOD": 0, "SEED": 3,
            "OUTPUT_DIR": str(out),
        })
        cfg.SOLVER.MAX_ITER = max_iter
        return cfg

    def train(cfg, resume):
        seed_all_rng(cfg.SEED)  # what tools/train_net.py's default_setup does: the same initial weights
        trainer = SemiSegTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        return trainer

    ref = train(cfg_for(tmp_path / "ref", 4), resume=False)
    run_dir = tmp_path / "run"
    train(cfg_for(run_dir, 4), resume=False)
    # keep only the checkpoint after iteration 1, as if the run had been killed there
    (run_dir / "model_final.pth").unlink()
    (run_dir / "model_0000003.pth").unlink()
    (run_dir / "last_checkpoint").write_text("model_0000001.pth")
    resumed = train(cfg_for(run_dir, 4), resume=True)
    assert resumed.start_iter == 2
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("teacher.backbone.vit.") for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    sa, sb = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], atol=1e-9) for i in sa)


# ------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("name", [
    "voc/unimatch_v2_dinov2_b_92.yaml", "cityscapes/unimatch_v2_dinov2_s_1-16.yaml", "voc/dgcl_dinov2_b_92.yaml",
    "cityscapes/ddfp_dinov2_b_186.yaml", "voc/supervised_dinov2_b_92.yaml",
])
def test_dinov2_configs_build_with_a_tiny_vit(name):
    import os

    from semiseg_d2.config import get_semiseg_cfg

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", name))
    assert cfg.SOLVER.OPTIMIZER == "AdamW" and cfg.SOLVER.BASE_LR == 5e-6 and cfg.SOLVER.HEAD_LR_MULTIPLIER == 40
    assert all(s % 14 == 0 for s in cfg.INPUT.CROP.SIZE)
    if "unimatch_v2" in name:
        assert (cfg.SEMI.EMA.MOMENTUM, cfg.SEMI.EMA.SCHEDULE) == (0.996, "warm_start")
    apply_overrides(cfg, {"MODEL.DEVICE": "cpu", "MODEL.DINOV2.EMBED_DIM": 32, "MODEL.DINOV2.DEPTH": 12,
                          "MODEL.DINOV2.NUM_HEADS": 2, "SOLVER.AMP.ENABLED": False})
    model = build_model(cfg)
    student = getattr(model, "student", model)
    assert student.size_divisibility == 14 and student.feature_dim == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    assert student.backbone.taps == (2, 5, 8, 11)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_benchmark_runs_a_dinov2_config_and_reports_peak_memory(tmp_path, grad_checkpoint):
    """tools/benchmark.py --synthetic on the CPU, one fresh process per setting (max RSS only grows in a process)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = _semi_vit_cfg(**{"SEMI.LOSSES": ["supervised", "unimatch_v2"], "SEMI.UNIMATCH_V2.THRESHOLD": 0.0})
    path = tmp_path / "tiny_unimatch_v2.yaml"
    path.write_text(cfg.dump())
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(root, "tools", "benchmark.py"), "--config-file", str(path), "--synthetic",
           "--device", "cpu", "--iters", "1", "--warmup", "0", "--json", str(out),
           "MODEL.DINOV2.GRAD_CHECKPOINT", str(grad_checkpoint)]
    run = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["status"] == "ok" and report["losses"] == ["supervised", "unimatch_v2"]
    assert report["overrides"] == ["MODEL.DINOV2.GRAD_CHECKPOINT", str(grad_checkpoint)]
    assert report["peak_memory_kind"] == "cpu_max_rss" and report["peak_memory_bytes"] > 0
    assert "forward/loss:unimatch_v2" in report["breakdown"]
