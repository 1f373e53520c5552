"""semiseg_d2.engine.precise_bn: BN statistics of one network recomputed on the run's labeled training stream with
the weights fixed; and tools/eval_checkpoints.py --precise-bn, which applies it to every evaluated network."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from detectron2.data import DatasetCatalog

from semiseg_d2.engine.precise_bn import labeled_batches, recompute_bn_stats
from semiseg_d2.engine.trainer import SemiSegTrainer
from tests.engine.test_train_e2e import camvid_semi_cfg
from tests.tools.test_eval_checkpoints import _load_tool


def _bn_layers(network):
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_labeled_batches_are_the_labeled_sets_training_stream(tmp_path):
    cfg = camvid_semi_cfg(tmp_path)
    labeled = {d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TRAIN_LABELED[0])}
    batches = iter(labeled_batches(cfg))
    seen = set()
    for _ in range(4):
        batch = next(batches)
        assert len(batch) == cfg.SOLVER.IMS_PER_BATCH
        for d in batch:
            assert "sem_seg" in d and tuple(d["image"].shape[-2:]) == tuple(cfg.INPUT.CROP.SIZE)
            seen.add(d["file_name"])
    assert seen <= labeled and len(seen) > 1  # never an unlabeled frame


def test_recompute_sets_the_population_statistics_of_fixed_weights(tmp_path):
    cfg = camvid_semi_cfg(tmp_path)
    model = SemiSegTrainer.build_model(cfg)
    student, teacher = model.student, model.teacher
    for bn in _bn_layers(student):  # statistics that belong to nothing: every one must be replaced
        bn.running_mean.fill_(7.0)
        bn.running_var.fill_(50.0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    weights_before = {k: v.clone() for k, v in student.named_parameters()}
    first = _bn_layers(student)[0]
    inputs = []
    handle = first.register_forward_pre_hook(lambda m, x: inputs.append(x[0].detach().clone()))
    student.eval()

    n = recompute_bn_stats(student, labeled_batches(cfg), 3)
    handle.remove()

    assert n == len(_bn_layers(student)) and not student.training  # mode restored
    assert len(inputs) == 3
    # equal batch shapes: the population mean is the mean of the three batch means (fvcore's estimator)
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    torch.testing.assert_close(first.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    pooled = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs], dim=1)
    torch.testing.assert_close(first.running_var, pooled.var(dim=1), rtol=2e-3, atol=1e-4)
    for bn in _bn_layers(student):
        assert not torch.any(bn.running_mean == 7.0) and not torch.any(bn.running_var == 50.0)
    for k, v in student.named_parameters():
        assert torch.equal(v, weights_before[k])
    # a function of weights and batches only: the head's dropout draws from a generator seeded for the call,
    # which leaves torch's own generator as it was
    recomputed = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in _bn_layers(student)]
    for bn in _bn_layers(student):
        bn.running_mean.add_(1.0)
        bn.running_var.mul_(3.0)
    rng = torch.get_rng_state()
    recompute_bn_stats(student, labeled_batches(cfg), 3)
    assert torch.equal(torch.get_rng_state(), rng)
    for bn, (mean, var) in zip(_bn_layers(student), recomputed):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    for k, v in teacher.state_dict().items():  # another network is not touched
        assert torch.equal(v, teacher_before[k])
    with pytest.raises(ValueError, match="num_iters"):
        recompute_bn_stats(student, labeled_batches(cfg), 0)


def test_eval_checkpoints_precise_bn_replaces_each_networks_stored_statistics(tmp_path):
    run = tmp_path / "run"
    cfg = camvid_semi_cfg(run, 4, **{"SOLVER.BASE_LR": 0.05})
    _train(cfg)  # seeded: an unseeded tiny run can collapse to one class, where no statistic changes a prediction
    (run / "config.yaml").write_text(cfg.dump())
    # a second run folder: the same checkpoint with both networks' BN statistics overwritten
    spoilt = tmp_path / "spoilt"
    spoilt.mkdir()
    (spoilt / "config.yaml").write_text(cfg.dump())
    ckpt = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    n_spoilt = 0
    for key, value in ckpt["model"].items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            value.mul_(3.0).add_(1.0)
            n_spoilt += 1
    assert n_spoilt > 0
    torch.save(ckpt, spoilt / "model_final.pth")

    tool = _load_tool()

    def evaluate(folder, *extra):
        out = tmp_path / f"{folder.name}{'_'.join(extra)}.json"
        assert tool.main([str(folder), "--from-iter", "4", "--out", str(out), *extra]) == 0
        record = json.loads(out.read_text())
        assert [r["iteration"] for r in record["checkpoints"]] == [4]
        return record

    plain, spoilt_plain = evaluate(run), evaluate(spoilt)
    precise, spoilt_precise = evaluate(run, "--precise-bn", "2"), evaluate(spoilt, "--precise-bn", "2")
    assert precise["precise_bn"] == 2 and plain["precise_bn"] == 0
    assert precise["dataset"] == cfg.DATASETS.TEST[0]
    m = lambda rec: rec["checkpoints"][0]["mIoU"]  # noqa: E731
    assert set(m(precise)) == {"student", "teacher"}
    assert m(spoilt_plain) != m(plain)  # the stored statistics matter without --precise-bn ...
    assert m(spoilt_precise) == pytest.approx(m(precise))  # ... and are replaced, for both networks, with it
    assert m(precise) != m(plain)


def test_eval_checkpoints_names_a_bad_dataset_or_count(tmp_path, capsys):
    cfg = camvid_semi_cfg(tmp_path, 4)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    tool = _load_tool()
    assert tool.main([str(tmp_path), "--dataset", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert tool.main([str(tmp_path), "--precise-bn", "-1"]) == 2
    assert "--precise-bn" in capsys.readouterr().err


def _train(cfg):
    torch.manual_seed(cfg.SEED)  # what default_setup does before the trainer builds the model
    trainer = SemiSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def test_test_precise_bn_recomputes_student_and_teacher_after_training_and_changes_nothing_else(tmp_path):
    from detectron2.engine import hooks as d2_hooks

    from semiseg_d2.engine.hooks import EMAHook, PreciseBNHook

    extra = {"SOLVER.BASE_LR": 0.05}
    plain = _train(camvid_semi_cfg(tmp_path / "plain", 4, **extra))
    cfg = camvid_semi_cfg(tmp_path / "pbn", 4, **extra, **{"TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 2})
    precise = _train(cfg)

    kinds = [type(h) for h in precise._hooks]
    assert PreciseBNHook in kinds and d2_hooks.PreciseBN not in kinds
    assert kinds.index(EMAHook) < kinds.index(PreciseBNHook) < kinds.index(d2_hooks.PeriodicCheckpointer)
    assert PreciseBNHook not in [type(h) for h in plain._hooks]

    stats = ("running_mean", "running_var")
    a, b = plain.model.state_dict(), precise.model.state_dict()
    for key in a:  # the hook runs after the last step: weights (and every other state) are those of the plain run
        if not key.endswith(stats):
            assert torch.equal(a[key], b[key]), key
    # the plain run's networks, recomputed by hand on the labeled stream, have the precise run's statistics
    expected = copy.deepcopy(plain.model)
    for network in (expected.student, expected.teacher):
        recompute_bn_stats(network, labeled_batches(cfg), 2)
    e = expected.state_dict()
    changed = 0
    for key in b:
        if key.endswith(stats):
            torch.testing.assert_close(b[key], e[key], rtol=1e-5, atol=1e-6, msg=key)
            changed += not torch.equal(a[key], b[key])
    assert changed > 0 and any(k.startswith("teacher.") and k.endswith(stats) and not torch.equal(a[k], b[k]) for k in b)
    # the saved final model is the recomputed one
    saved = torch.load(tmp_path / "pbn" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for key in b:
        assert torch.equal(saved[key], b[key]), key
