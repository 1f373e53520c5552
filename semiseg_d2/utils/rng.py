"""The process's random streams (Python ``random``, NumPy, torch CPU and CUDA) as one state: saved into checkpoints
for an exact ``--resume`` (engine/checkpoint.py), and put back after work that must not consume them
(:func:`rng_untouched`, e.g. building loss terms)."""
import random
from contextlib import contextmanager
from typing import Dict

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "rng_untouched"]


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


@contextmanager
def rng_untouched():
    """Run the body on the current random streams, then put them back as they were, as if nothing had drawn
    from them."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
