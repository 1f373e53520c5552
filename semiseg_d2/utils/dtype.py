"""Precision helpers shared by the loss terms."""
import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor of at least float32: bool / integer and autocast's half / bfloat16 tensors
    become float32, float32 and float64 stay.

    Losses are computed in float32 or better; unlike ``x.float()`` this never rounds a float64 run (the numerics
    guard of tests/test_numerics.py runs in float64 so that its fixture does not depend on the CPU model).
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
