"""The study's methods and protocols, and the KEY VALUE overrides that turn a method's config into one run."""
import os
import shlex
from collections import OrderedDict
from typing import List, Optional, Sequence

from . import ROOT

# name -> (config under configs/camvid, label in the report)
METHODS = OrderedDict(
    [
        ("supervised_46", ("study_supervised_46.yaml", "Supervised, 46 labels")),
        ("supervised_367", ("study_supervised_367.yaml", "Supervised, 367 labels (upper bound)")),
        ("mean_teacher", ("study_mean_teacher.yaml", "Mean Teacher / FixMatch")),
        ("memory_contrast", ("study_memory_contrast.yaml", "Memory bank (Alonso et al.)")),
        ("dgcl", ("study_dgcl.yaml", "DGCL")),
        ("ddfp", ("study_ddfp.yaml", "DDFP")),
        ("dgcl_ddfp", ("study_dgcl_ddfp.yaml", "DGCL + DDFP")),
        ("unimatch", ("study_unimatch.yaml", "UniMatch")),
    ]
)
CONFIG_DIR = os.path.join("configs", "camvid")
DEFAULT_SEEDS = (0, 1)
BASELINE = "supervised_46"
DEFAULT_OUTPUT = os.path.join("output", "camvid_study")
DEFAULT_DOC = os.path.join("docs", "results", "camvid.md")
# --protocol: the file merged (as KEY VALUE overrides) on top of every method's config, where runs train, where
# their metrics files are kept (None: only in the run folders) and the report
PROTOCOLS = {
    "gpu": {"file": None, "output": DEFAULT_OUTPUT, "results": None, "doc": DEFAULT_DOC, "seeds": DEFAULT_SEEDS},
    "cpu": {
        "file": os.path.join(CONFIG_DIR, "protocol_cpu.yaml"),
        "output": os.path.join("output", "camvid_cpu"),
        "results": os.path.join("docs", "results", "camvid_cpu"),
        "doc": os.path.join("docs", "results", "camvid_cpu.md"),
        "figures": os.path.join("docs", "results", "camvid_cpu"),
        "controls": os.path.join("docs", "results", "camvid_cpu_controls"),
        "seeds": (0, 1, 2),
    },
}
# --data mini: the bundled camvid_mini frames stand in for the full dataset (CPU smoke runs, tests)
MINI_DATASETS = {
    "camvid_train_46_labeled": "camvid_mini_train_5_labeled",
    "camvid_train_46_unlabeled": "camvid_mini_train_5_unlabeled",
    "camvid_train": "camvid_mini_train",
    "camvid_val": "camvid_mini_val",
}


def run_name(method: str, seed: int) -> str:
    return f"{method}/seed{seed}"


def run_dir(root: str, method: str, seed: int) -> str:
    return os.path.join(root, method, f"seed{seed}")


def method_config(method: str) -> str:
    return os.path.join(CONFIG_DIR, METHODS[method][0])


def load_cfg(config_file: str, overrides: Sequence[str]):
    from semiseg_d2.config import get_semiseg_cfg

    cfg = get_semiseg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config_file) if not os.path.isabs(config_file) else config_file)
    cfg.merge_from_list(list(overrides))
    return cfg


def schedule_overrides(cfg, scale: float) -> List[str]:
    """KEY VALUE pairs multiplying every iteration count of the schedule by ``scale`` (rounded, >= 1 where > 0):
    SOLVER.MAX_ITER / WARMUP_ITERS / CHECKPOINT_PERIOD, TEST.EVAL_PERIOD and, for semi-supervised configs, the iteration counts the
    config and its terms declare (``semiseg_d2.config.schedule_keys``: burn-in, term and bank starts)."""
    from semiseg_d2.config import schedule_keys
    from semiseg_d2.modeling import is_semi_supervised

    if scale == 1.0:
        return []
    # the checkpoint period too: a resumed run of a shortened schedule continues from as recent a point
    keys = ["SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD"]
    if is_semi_supervised(cfg):
        keys += schedule_keys(cfg)
    out = []
    for key in sorted(keys):
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node > 0:
            out += [key, str(max(1, int(round(node * scale))))]
    return out


# The protocol file's own settings, under its top-level STUDY key (not config keys): name -> default
STUDY_SETTINGS = {"SCHEDULE_SCALE": 1.0}


def _protocol_tree(protocol_file: str) -> dict:
    import yaml

    path = os.path.join(ROOT, protocol_file)
    with open(path) as f:
        tree = yaml.safe_load(f)
    if not isinstance(tree, dict) or "_BASE_" in tree:
        raise ValueError(f"{protocol_file}: a protocol is a mapping of config keys (no _BASE_)")
    return tree


def protocol_settings(protocol_file: Optional[str]) -> dict:
    """The protocol's STUDY settings (``STUDY.SCHEDULE_SCALE``: the factor ``schedule_overrides`` applies to every
    run's schedule unless ``--schedule-scale`` is given), defaults filled in; a wrong key or value names the file."""
    settings = dict(STUDY_SETTINGS)
    if protocol_file is None:
        return settings
    study = _protocol_tree(protocol_file).get("STUDY", {})
    if not isinstance(study, dict):
        raise ValueError(f"{protocol_file}: STUDY must be a mapping of {sorted(STUDY_SETTINGS)}, got {study!r}")
    unknown = sorted(set(study) - set(STUDY_SETTINGS))
    if unknown:
        raise ValueError(f"{protocol_file}: unknown STUDY keys {unknown}; known: {sorted(STUDY_SETTINGS)}")
    settings.update(study)
    scale = settings["SCHEDULE_SCALE"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"{protocol_file}: STUDY.SCHEDULE_SCALE must be a number > 0, got {scale!r}")
    settings["SCHEDULE_SCALE"] = float(scale)
    return settings


def protocol_overrides(protocol_file: Optional[str]) -> List[str]:
    """The protocol YAML's config keys as KEY VALUE pairs (``MODEL.DEVICE cpu ...``), in file order, without its
    STUDY settings; [] without a file."""
    if protocol_file is None:
        return []
    tree = {k: v for k, v in _protocol_tree(protocol_file).items() if k != "STUDY"}
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                out.extend([prefix + key, value if isinstance(value, str) else str(value)])

    walk(tree, "")
    return out


def data_overrides(cfg, data: str) -> List[str]:
    """KEY VALUE pairs renaming the full-CamVid datasets to the bundled mini ones (``--data mini``)."""
    if data == "full":
        return []
    out = []
    keys = [("DATASETS." + k, cfg.DATASETS[k]) for k in ("TRAIN", "TRAIN_LABELED", "TRAIN_UNLABELED", "TEST")]
    for key, names in keys + [("SEMI.DIAGNOSTICS.GT_DATASETS", cfg.SEMI.DIAGNOSTICS.GT_DATASETS)]:
        names = list(names)
        if not names:
            continue
        missing = [n for n in names if n not in MINI_DATASETS]
        if missing:
            raise ValueError(f"--data mini: {key} names {missing}, which have no camvid_mini equivalent")
        out += [key, "(" + "".join(f'"{MINI_DATASETS[n]}", ' for n in names).rstrip(" ") + ")"]
    return out


def run_overrides(method: str, seed: int, out_dir: str, args) -> List[str]:
    """Every KEY VALUE pair that turns the method's config into this run (recorded in the run's command): the
    protocol's keys first, so the schedule scale multiplies the protocol's schedule."""
    protocol = protocol_overrides(PROTOCOLS[args.protocol]["file"])
    cfg = load_cfg(method_config(method), protocol)
    return (
        ["SEED", str(seed), "OUTPUT_DIR", out_dir]
        + protocol
        + data_overrides(cfg, args.data)
        + schedule_overrides(cfg, args.schedule_scale)
        + list(args.opts)
    )


def train_net_command(config_file: str, overrides: Sequence[str]) -> str:
    return " ".join(["python tools/train_net.py --config-file", shlex.quote(config_file)] + [shlex.quote(o) for o in overrides])
