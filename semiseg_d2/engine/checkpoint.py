"""Checkpoints that never corrupt the last good one, carry RNG streams and refuse foreign configs."""
import logging
import os
import re
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode

from ..modeling.backbone.dinov2 import D2DinoV2, convert_official_dinov2, is_official_dinov2
from ..utils.rng import capture_rng_state

logger = logging.getLogger(__name__)

# Keys that may differ between the run that wrote a checkpoint and the run resuming it: they do not
# change what training computes (where things are written, how often, how many loader workers —
# the data stream does not depend on them —, evaluation, device).
RESUME_FREE_KEYS = (
    "OUTPUT_DIR",
    "MODEL.WEIGHTS",
    "MODEL.DEVICE",
    "SOLVER.CHECKPOINT_PERIOD",
    "DATALOADER.NUM_WORKERS",
    "TEST.",
    "SEMI.VIS_PERIOD",
    "VIS_PERIOD",
    "CUDNN_BENCHMARK",
)


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def _flatten(cfg, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _as_tuple(v)
    return out


def config_differences(saved: CfgNode, current: CfgNode, free: Iterable[str] = RESUME_FREE_KEYS) -> List[str]:
    """Keys (dotted) whose values differ, ignoring ``free`` keys/prefixes; ``KEY: saved -> current``."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in free):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_torch_save(obj, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


# Where tools/convert_pretrained.py records what it converted (layout, stem_type, stem_out_channels, depth).
CONVERTER_INFO_KEY = "semiseg_d2_converter"


def _is_required(key: str, required_prefixes: Sequence[str], new_keys: Sequence[str]) -> bool:
    return key.startswith(tuple(required_prefixes)) and not any(re.match(p, key) for p in new_keys)


def pretrained_mismatches(
    incompatible, required_prefixes: Sequence[str], new_keys: Sequence[str] = ()
) -> Tuple[List[str], List[Tuple[str, tuple, tuple]]]:
    """``(missing, mis_shaped)`` required model keys of a non-strict load (fvcore ``_IncompatibleKeys``).

    A key is required when it starts with one of ``required_prefixes`` and matches none of the ``new_keys``
    regexes; ``mis_shaped`` holds ``(key, checkpoint shape, model shape)`` and is not repeated in ``missing``.
    """
    shaped = [s for s in incompatible.incorrect_shapes if _is_required(s[0], required_prefixes, new_keys)]
    skipped = {s[0] for s in incompatible.incorrect_shapes}
    missing = [
        k for k in incompatible.missing_keys if k not in skipped and _is_required(k, required_prefixes, new_keys)
    ]
    return missing, shaped


def _listing(items: Sequence[str], n: int = 8) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def pretrained_mismatch_message(
    path: str, missing: Sequence[str], mis_shaped: Sequence[Tuple[str, tuple, tuple]], checkpoint_keys: Sequence[str],
    converter_info: Optional[Dict] = None, config_stem_type: Optional[str] = None,
) -> str:
    """The error for weights that do not fit the model's required (backbone) keys, with the likely fix."""
    lines = [f"MODEL.WEIGHTS {path} does not fit the model (MODEL.WEIGHTS_REQUIRED_PREFIXES):"]
    if mis_shaped:
        shapes = [f"{k}: {tuple(a)} -> {tuple(b)}" for k, a, b in mis_shaped]
        lines.append(f"  {len(mis_shaped)} tensors of another shape (checkpoint -> model): {_listing(shapes)}")
    if missing:
        lines.append(f"  {len(missing)} tensors missing from the file: {_listing(list(missing))}")
    bad = [k for k in missing] + [k for k, _, _ in mis_shaped]
    if any(re.search(r"(^|\.)stem\.", k) for k in bad):
        recorded = (converter_info or {}).get("stem_type")
        have = f"the file's ResNet stem is '{recorded}' (tools/convert_pretrained.py recorded it)" if recorded else (
            "the file's ResNet stem is not the config's")
        lines.append(
            f"  The stem differs: {have}, the config has MODEL.RESNETS.STEM_TYPE {config_stem_type!r}. Fix: add "
            "`MODEL.RESNETS.STEM_TYPE basic MODEL.RESNETS.STEM_OUT_CHANNELS 64` for a torchvision (7x7 stem) file, or "
            "use a deep-stem checkpoint (timm resnet*c, PSPNet deep_base, mmseg v1c) converted with "
            "tools/convert_pretrained.py, which prints the STEM_TYPE its output needs."
        )
    if any(k.startswith(("student.", "teacher.")) for k in checkpoint_keys):
        lines.append(
            "  The file is a SemiSegmentor trainer checkpoint (student.* / teacher.* keys): continue its run with "
            "--resume, or write one network with tools/export_model.py and use that file."
        )
    lines.append(
        "  Layers a config adds on purpose, which no pretrained file holds, are declared in MODEL.WEIGHTS_NEW_KEYS."
    )
    return "\n".join(lines)


class SemiSegCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and carry the config and RNG states.

    ``load(..., strict=True)`` (used when resuming) raises on any missing, unexpected or mis-shaped key
    instead of detectron2's warning and partial load. :meth:`load_pretrained` (training from MODEL.WEIGHTS)
    raises when a required key (MODEL.WEIGHTS_REQUIRED_PREFIXES, i.e. the backbone, less MODEL.WEIGHTS_NEW_KEYS)
    is missing or mis-shaped; other keys (heads, loss terms) may be absent.
    """

    def __init__(self, model, save_dir: str = "", *, cfg: CfgNode = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.cfg = cfg
        self._strict = False
        self._pretrained = None  # (path, required_prefixes, new_keys, config stem type) during load_pretrained
        self.loaded_tensors = None  # model keys the last load filled, set by _load_model

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data["rng"] = capture_rng_state()
        if self.cfg is not None:
            data["cfg"] = self.cfg.dump()
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(os.path.basename(save_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def check_config(self, path: str, current: CfgNode) -> None:
        """Raise if the checkpoint at ``path`` was written with a config that differs from ``current``."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if "cfg" not in ckpt:
            return
        saved = CfgNode.load_cfg(ckpt["cfg"])
        diffs = config_differences(saved, current)
        if diffs:
            raise ValueError(
                f"cannot resume from {path}: it was written with a different config; "
                f"mismatching keys (checkpoint -> now):\n  " + "\n  ".join(diffs)
            )

    def _load_file(self, filename: str):
        """detectron2's loading, plus official DINOv2 ``*_pretrain.pth`` files (plain ViT state dicts) whose keys
        are converted (``convert_official_dinov2``) to the model's DINOv2 backbone."""
        loaded = super()._load_file(filename)
        state = loaded.get("model")
        if isinstance(state, dict) and is_official_dinov2(state):
            prefix = dinov2_prefix(self.model, filename)
            loaded = {"model": convert_official_dinov2(state, prefix), "matching_heuristics": False}
            logger.info("%s: official DINOv2 weights, loaded into %s*", filename, prefix)
        return loaded

    def load(self, path: str, checkpointables=None, strict: bool = False):
        self._strict = strict
        try:
            return super().load(path, checkpointables)
        finally:
            self._strict = False

    def load_pretrained(self, path: str, cfg: CfgNode):
        """Load initial weights (MODEL.WEIGHTS) under ``cfg``'s MODEL.WEIGHTS_REQUIRED_PREFIXES / NEW_KEYS."""
        resnets = cfg.MODEL.get("RESNETS", None)
        self._pretrained = (
            path, tuple(cfg.MODEL.WEIGHTS_REQUIRED_PREFIXES), tuple(cfg.MODEL.WEIGHTS_NEW_KEYS),
            resnets.get("STEM_TYPE", None) if resnets is not None else None,
        )
        try:
            ret = self.load(path, checkpointables=[])
        finally:
            self._pretrained = None
        required = [k for k in self.loaded_tensors if k.startswith(tuple(cfg.MODEL.WEIGHTS_REQUIRED_PREFIXES))]
        logger.info("MODEL.WEIGHTS %s: loaded %d tensors, every required one (%d under %s)", path,
                    len(self.loaded_tensors), len(required), list(cfg.MODEL.WEIGHTS_REQUIRED_PREFIXES))
        return ret

    def _load_model(self, checkpoint):
        checkpoint_keys = list(checkpoint.get("model", {}))
        converter_info = checkpoint.get(CONVERTER_INFO_KEY)
        incompatible = super()._load_model(checkpoint)
        skipped = set(incompatible.missing_keys) | {s[0] for s in incompatible.incorrect_shapes}
        self.loaded_tensors = [k for k in self.model.state_dict() if k not in skipped]
        if self._pretrained is not None:
            path, required, new, stem_type = self._pretrained
            missing, mis_shaped = pretrained_mismatches(incompatible, required, new)
            if missing or mis_shaped:
                raise ValueError(pretrained_mismatch_message(
                    path, missing, mis_shaped, checkpoint_keys, converter_info, stem_type
                ))
        if self._strict:
            problems = []
            if incompatible.missing_keys:
                problems.append(f"{len(incompatible.missing_keys)} missing keys: {_listing(incompatible.missing_keys)}")
            if incompatible.unexpected_keys:
                problems.append(f"{len(incompatible.unexpected_keys)} unexpected keys: "
                                f"{_listing(incompatible.unexpected_keys)}")
            if incompatible.incorrect_shapes:
                shapes = [f"{k}: {tuple(a)} -> {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
                problems.append(f"{len(shapes)} shape mismatches (checkpoint -> model): {_listing(shapes)}")
            if problems:
                if incompatible.missing_keys and all(
                    k.startswith(("student.", "teacher.", "terms.")) for k in incompatible.missing_keys
                ):
                    problems.append("the model is a SemiSegmentor and the file holds one network (an exported or "
                                    "supervised Segmentor checkpoint): load it with MODEL.META_ARCHITECTURE Segmentor")
                raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
        return incompatible


def dinov2_prefix(model: torch.nn.Module, filename: str) -> str:
    """State-dict prefix of the timm ViT inside ``model``'s (single) DINOv2 backbone, e.g. ``"backbone.vit."``."""
    names = [n for n, m in model.named_modules() if isinstance(m, D2DinoV2)]
    if len(names) != 1:
        raise ValueError(
            f"MODEL.WEIGHTS: {filename} holds official DINOv2 weights but the model has {len(names)} DINOv2 "
            "backbones (MODEL.BACKBONE.NAME 'D2DinoV2' expected)"
        )
    return f"{names[0]}.vit." if names[0] else "vit."
