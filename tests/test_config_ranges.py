"""The config schema (semiseg_d2/config.py ``declare``): every declared key refuses a value outside its range at
start-up, naming the key, the value and the allowed range; every numeric SEMI key is declared."""
import pytest

import semiseg_d2  # noqa: F401  registers the loss terms (their keys are checked only when the term runs)
from semiseg_d2.config import SCHEMA, OneOf, Range, check_semiseg_config, declare, get_semiseg_cfg, lookup
from semiseg_d2.engine.trainer import SemiSegTrainer
from semiseg_d2.losses.registry import SEMI_LOSS_REGISTRY

from tests.tiny import apply_overrides, semi_cfg

TERMS = [name for name, _ in SEMI_LOSS_REGISTRY]
get_semiseg_cfg()  # add_semiseg_config's declare() calls fill SCHEMA
DECLARED = sorted(SCHEMA)


def _cfg_reading(key):
    """A default config in which ``key`` is read: its loss term (if it belongs to one) is in SEMI.LOSSES."""
    cfg = get_semiseg_cfg()
    parts = key.split(".")
    if parts[0] == "SEMI" and len(parts) == 3 and parts[1].lower() in TERMS:
        cfg.SEMI.LOSSES = ["supervised", parts[1].lower()] if parts[1].lower() != "supervised" else ["supervised"]
    return cfg


def test_defaults_and_every_shipped_value_pass():
    check_semiseg_config(get_semiseg_cfg())


def test_the_schema_covers_the_methods_keys():
    assert len(DECLARED) >= 90 and {"SEMI.DGCL.TEMPERATURE", "SEMI.PSEUDO_LABEL.THRESHOLD"} <= set(DECLARED)


@pytest.mark.parametrize("key", DECLARED)
def test_every_declared_key_refuses_a_value_outside_its_range(key):
    cfg = _cfg_reading(key)
    check_semiseg_config(cfg)
    bad = SCHEMA[key].outside(cfg, lookup(cfg, key))
    apply_overrides(cfg, {key: bad})
    with pytest.raises(ValueError) as e:
        check_semiseg_config(cfg)
    line = next((ln for ln in str(e.value).splitlines() if ln.strip().startswith(key + " =")), None)
    assert line is not None, str(e.value)
    assert f"{key} = {bad!r}" in line and f"allowed: {SCHEMA[key].describe(cfg)}" in line


def _numeric(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, (int, float))


def _leaves(node, prefix):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_numeric_semi_key_is_declared():
    """A new SEMI key holding a number (or a list of numbers) needs its range declared beside its default."""
    undeclared = [k for k, v in _leaves(get_semiseg_cfg().SEMI, "SEMI.") if _numeric(v) and k not in SCHEMA]
    assert not undeclared, f"declare these keys with a range (semiseg_d2/config.py declare): {undeclared}"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"SEMI.PSEUDO_LABEL.THRESHOLD": 1.5}, "SEMI.PSEUDO_LABEL.THRESHOLD = 1.5: out of range; allowed: [0, 1]"),
        ({"SEMI.LOSSES": ["supervised", "dgcl"], "SEMI.DGCL.TEMPERATURE": -0.5},
         "SEMI.DGCL.TEMPERATURE = -0.5: out of range; allowed: (0, inf)"),
        ({"SEMI.LOSSES": ["supervised", "dgcl"], "SEMI.DGCL.MIN_FILL": 41, "SEMI.DGCL.MEMORY_SIZE": 40},
         "SEMI.DGCL.MIN_FILL = 41: out of range; allowed: [0, SEMI.DGCL.MEMORY_SIZE = 40]"),
        ({"SOLVER.MAX_ITER": 100, "SEMI.PSEUDO_LABEL.START_ITER": 101},
         "SEMI.PSEUDO_LABEL.START_ITER = 101: out of range; allowed: [0, SOLVER.MAX_ITER = 100]"),
        ({"SOLVER.MAX_ITER": 100, "SEMI.BURN_IN_ITERS": 200},
         "SEMI.BURN_IN_ITERS = 200: out of range; allowed: [0, SOLVER.MAX_ITER = 100]"),
        ({"INPUT.SCALE_RANGE": [2.0, 0.5]},
         "INPUT.SCALE_RANGE = [2.0, 0.5]: not in non-decreasing order; allowed: (0, inf), 2 values, non-decreasing"),
        ({"SEMI.MIX.CUTMIX_AREA": [0.1]}, "SEMI.MIX.CUTMIX_AREA = [0.1]: 1 value(s) where 2 are needed"),
        ({"SEMI.EMA.MOMENTUM": float("nan")}, "SEMI.EMA.MOMENTUM = nan: out of range; allowed: [0, 1]"),
        ({"MODEL.RESNETS.OUTPUT_STRIDE": 32}, "MODEL.RESNETS.OUTPUT_STRIDE = 32: unknown value; allowed: one of 8, 16"),
    ],
    ids=["threshold", "temperature", "min_fill", "start_iter", "burn_in", "scale_order", "length", "nan", "choice"],
)
def test_issue_cases_name_key_value_and_range(overrides, expected):
    cfg = apply_overrides(get_semiseg_cfg(), overrides)
    with pytest.raises(ValueError) as e:
        check_semiseg_config(cfg)
    assert expected in str(e.value)


def test_all_violations_are_listed_at_once():
    cfg = apply_overrides(get_semiseg_cfg(), {"SEMI.PSEUDO_LABEL.THRESHOLD": 1.5, "SEMI.MIX.PROB": -0.1})
    with pytest.raises(ValueError) as e:
        check_semiseg_config(cfg)
    assert "SEMI.PSEUDO_LABEL.THRESHOLD = 1.5" in str(e.value) and "SEMI.MIX.PROB = -0.1" in str(e.value)


def test_keys_of_a_term_that_does_not_run_are_not_checked():
    """A DGCL recipe of 1000 iterations does not fail on memory_contrast's START_ITER 2000: no term reads it."""
    cfg = apply_overrides(get_semiseg_cfg(), {"SOLVER.MAX_ITER": 1000, "SEMI.LOSSES": ["supervised", "dgcl"]})
    assert cfg.SEMI.MEMORY_CONTRAST.START_ITER == 2000
    check_semiseg_config(cfg)
    cfg.SEMI.LOSSES = ["supervised", "memory_contrast"]
    with pytest.raises(ValueError, match=r"SEMI.MEMORY_CONTRAST.START_ITER = 2000: out of range; allowed: \[0, "
                                         r"SOLVER.MAX_ITER = 1000\]"):
        check_semiseg_config(cfg)


def test_the_trainer_refuses_before_building_anything():
    with pytest.raises(ValueError, match=r"SEMI.PSEUDO_LABEL.THRESHOLD = 1.5: out of range; allowed: \[0, 1\]"):
        SemiSegTrainer(semi_cfg(**{"SEMI.PSEUDO_LABEL.THRESHOLD": 1.5, "DATASETS.TRAIN_LABELED": ("nowhere",)}))


def test_declare_sets_the_default_and_refuses_one_outside_its_range():
    cfg = get_semiseg_cfg()
    before = dict(SCHEMA)
    try:
        declare(cfg, "SEMI.EXAMPLE_KEY", 0.5, Range(0, 1, hi_open=True))
        assert cfg.SEMI.EXAMPLE_KEY == 0.5 and "SEMI.EXAMPLE_KEY" in SCHEMA
        with pytest.raises(ValueError, match=r"declare: the default 1.0 of SEMI.OTHER_KEY is not in \[0, 1\)"):
            declare(cfg, "SEMI.OTHER_KEY", 1.0, Range(0, 1, hi_open=True))
        with pytest.raises(ValueError, match="declare: the default 'c' of SEMI.CHOICE_KEY is not in one of 'a', 'b'"):
            declare(cfg, "SEMI.CHOICE_KEY", "c", OneOf("a", "b"))
    finally:
        SCHEMA.clear()
        SCHEMA.update(before)


def test_a_process_that_never_built_a_config_still_checks(monkeypatch):
    """DDP spawn hands workers a pickled config: add_semiseg_config's declare()s never ran there."""
    import semiseg_d2.config as config

    cfg = apply_overrides(get_semiseg_cfg(), {"SEMI.PSEUDO_LABEL.THRESHOLD": 1.5})
    monkeypatch.setattr(config, "SCHEMA", {})
    monkeypatch.setattr(config, "_DECLARED_HERE", False)
    with pytest.raises(ValueError, match=r"SEMI.PSEUDO_LABEL.THRESHOLD = 1.5: out of range"):
        config.check_semiseg_config(cfg)
