"""Where and how a run computes: the device, bf16 autocast where it is native, and the seeds."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return device


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device does it natively; None means plain fp32."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == "cuda" and not bf16_ok:
            raise ValueError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16; use fp32")
        return torch.bfloat16
    if precision == "auto" and bf16_ok:
        return torch.bfloat16
    return None
