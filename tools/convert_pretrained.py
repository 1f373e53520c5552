#!/usr/bin/env python
"""Convert an ImageNet ResNet state dict (torchvision, timm, PSPNet/U2PL "deep_base", mmseg "v1c") into a
detectron2 ``.pkl`` that ``cfg.MODEL.WEIGHTS`` loads into semiseg_d2's backbone without name heuristics.

    python tools/convert_pretrained.py resnet101.pth R-101.pkl

Stems: torchvision 7x7 (``conv1``/``bn1``) -> ``MODEL.RESNETS.STEM_TYPE basic``; the deep 3x(3x3) stems
(timm ``conv1.0/1/3/4/6`` + ``bn1``, PSPNet ``conv1..3``/``bn1..3``, mmseg ``stem.0/1/3/4/6/7``) ->
``STEM_TYPE deeplab``; the script prints the ``KEY VALUE`` overrides (STEM_TYPE, STEM_OUT_CHANNELS, DEPTH) the
weights need and records them in the .pkl (``semiseg_d2_converter``), so a training run that does not fit names
the stem the file has. Every source key must map (only the ImageNet classifier ``fc.*`` is dropped); ResNet-D
average-pool shortcuts (timm ``*d`` models) are rejected because detectron2's ResNet shortcut is a strided 1x1 conv.
"""
import argparse
import os
import pickle
import re
import sys
from typing import Dict, Mapping, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from semiseg_d2.engine.checkpoint import CONVERTER_INFO_KEY  # noqa: E402  (the training-time check reads it)

__all__ = ["convert_resnet_state_dict", "load_source_state_dict", "main"]

_DROPPED = re.compile(r"^fc\.")  # ImageNet classifier
_BN_PARAMS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# (source pattern, target template) per stem layout; the first matching layout wins (see _detect_stem).
_STEM_RULES = {
    "torchvision": [
        (r"^conv1\.weight$", "stem.conv1.weight"),
        (rf"^bn1\.{_BN_PARAMS}$", r"stem.conv1.norm.\1"),
    ],
    "timm_deep": [
        (r"^conv1\.0\.weight$", "stem.conv1.weight"),
        (rf"^conv1\.1\.{_BN_PARAMS}$", r"stem.conv1.norm.\1"),
        (r"^conv1\.3\.weight$", "stem.conv2.weight"),
        (rf"^conv1\.4\.{_BN_PARAMS}$", r"stem.conv2.norm.\1"),
        (r"^conv1\.6\.weight$", "stem.conv3.weight"),
        (rf"^bn1\.{_BN_PARAMS}$", r"stem.conv3.norm.\1"),
    ],
    "pspnet_deep": [
        (r"^conv([123])\.weight$", r"stem.conv\1.weight"),
        (rf"^bn([123])\.{_BN_PARAMS}$", r"stem.conv\1.norm.\2"),
    ],
    "mmseg_v1c": [
        (r"^stem\.0\.weight$", "stem.conv1.weight"),
        (rf"^stem\.1\.{_BN_PARAMS}$", r"stem.conv1.norm.\1"),
        (r"^stem\.3\.weight$", "stem.conv2.weight"),
        (rf"^stem\.4\.{_BN_PARAMS}$", r"stem.conv2.norm.\1"),
        (r"^stem\.6\.weight$", "stem.conv3.weight"),
        (rf"^stem\.7\.{_BN_PARAMS}$", r"stem.conv3.norm.\1"),
    ],
}
_STAGE_RULES = [
    (r"^layer([1-4])\.(\d+)\.conv([123])\.weight$", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (
        rf"^layer([1-4])\.(\d+)\.bn([123])\.{_BN_PARAMS}$",
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (
        rf"^layer([1-4])\.(\d+)\.downsample\.1\.{_BN_PARAMS}$",
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
]
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def _detect_stem(keys) -> str:
    if "conv1.0.weight" in keys:
        return "timm_deep"
    if "stem.0.weight" in keys:
        return "mmseg_v1c"
    if "conv2.weight" in keys and "conv3.weight" in keys:
        return "pspnet_deep"
    if "conv1.weight" in keys:
        return "torchvision"
    raise ValueError("unknown ResNet layout: no stem key (conv1.weight, conv1.0.weight, stem.0.weight) found")


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def convert_resnet_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone."
) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    """Rename a ResNet state dict to detectron2's ResNet names (``prefix`` + ``stem.conv1.weight``, ...).

    Returns ``(weights: {name: np.ndarray}, info: {"layout", "stem_type", "stem_out_channels", "depth"})``.
    Raises ``ValueError`` listing every source key that has no mapping.
    """
    sd = _strip_prefixes(state_dict)
    avg_down = sorted(k for k in sd if re.match(r"^layer[1-4]\.\d+\.downsample\.2\.", k))
    if avg_down:
        raise ValueError(
            "ResNet-D average-pool shortcut (downsample.1 conv + downsample.2 norm, e.g. timm resnet50d) is not "
            f"supported by detectron2's ResNet; use a 'c' (deep stem, conv shortcut) model. Keys: {avg_down[:4]}"
        )
    layout = _detect_stem(sd)
    rules = [(re.compile(p), t) for p, t in _STEM_RULES[layout]]
    out, unmapped = {}, []
    for k, v in sd.items():
        if _DROPPED.match(k):
            continue
        new = None
        for pattern, template in rules:
            if pattern.match(k):
                new = pattern.sub(template, k)
                break
        if new is None:
            for pattern, fn in _STAGE_RULES:
                m = re.match(pattern, k)
                if m:
                    new = fn(m)
                    break
        if new is None:
            unmapped.append(k)
            continue
        out[prefix + new] = v.detach().cpu().numpy()
    if unmapped:
        raise ValueError(f"{len(unmapped)} source keys have no mapping ({layout} layout): {sorted(unmapped)}")
    blocks = tuple(
        len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    stem_out = out[prefix + ("stem.conv1.weight" if layout == "torchvision" else "stem.conv3.weight")].shape[0]
    info = {
        "layout": layout,
        "stem_type": "basic" if layout == "torchvision" else "deeplab",
        "stem_out_channels": int(stem_out),
        "depth": _DEPTHS.get(blocks),
    }
    return out, info


def load_source_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A plain state dict from a ``.pth``; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="torchvision / timm / PSPNet / mmseg ResNet .pth")
    parser.add_argument("output", help="detectron2 .pkl to write")
    parser.add_argument("--prefix", default="backbone.", help="name prefix of the backbone in the model")
    args = parser.parse_args(argv)
    weights, info = convert_resnet_state_dict(load_source_state_dict(args.source), prefix=args.prefix)
    with open(args.output, "wb") as f:
        pickle.dump(
            {"model": weights, "__author__": f"semiseg_d2 convert_pretrained ({info['layout']})",
             "matching_heuristics": False, CONVERTER_INFO_KEY: info},
            f,
        )
    print(f"wrote {len(weights)} tensors to {args.output}\n{config_hint(args.output, info)}", file=sys.stderr)
    return info


def config_hint(output: str, info: Dict[str, object]) -> str:
    """The ``KEY VALUE`` overrides a config needs for the converted weights (training checks them)."""
    pairs = (f"MODEL.WEIGHTS {output} MODEL.RESNETS.STEM_TYPE {info['stem_type']} "
             f"MODEL.RESNETS.STEM_OUT_CHANNELS {info['stem_out_channels']}")
    if info["depth"] is not None:
        pairs += f" MODEL.RESNETS.DEPTH {info['depth']}"
    note = ""
    if info["stem_type"] == "basic":
        note = ("\n(a torchvision 7x7 stem: the shipped configs use the deep stem, STEM_TYPE deeplab with 128 channels, "
                "so training needs these overrides; without them it stops naming the backbone.stem.* keys)")
    return f"train with these overrides: {pairs} MODEL.RESNETS.STRIDE_IN_1X1 False{note}"


if __name__ == "__main__":
    main()
