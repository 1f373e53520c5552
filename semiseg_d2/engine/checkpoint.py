"""Checkpoints that never corrupt the last good one, carry RNG streams and refuse foreign configs."""
import logging
import os
import random
import tempfile
from typing import Dict, Iterable, List

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode

from ..modeling.backbone.dinov2 import D2DinoV2, convert_official_dinov2, is_official_dinov2

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


def capture_rng_state() -> Dict:
    """States of the python, numpy, torch CPU and CUDA generators of this process, as tensors and plain
    Python values only, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class SemiSegCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and carry the config and RNG states.

    ``load(..., strict=True)`` (used when resuming) raises on any missing, unexpected or mis-shaped key
    instead of detectron2's warning and partial load.
    """

    def __init__(self, model, save_dir: str = "", *, cfg: CfgNode = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.cfg = cfg
        self._strict = False

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

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self._strict:
            problems = []
            if incompatible.missing_keys:
                problems.append(f"missing keys: {incompatible.missing_keys}")
            if incompatible.unexpected_keys:
                problems.append(f"unexpected keys: {incompatible.unexpected_keys}")
            if incompatible.incorrect_shapes:
                problems.append(f"shape mismatches (key, checkpoint, model): {incompatible.incorrect_shapes}")
            if problems:
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
