"""Where a trial runs: device, numeric precision, per-epoch seeding and the node-local cache folder."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .data.cache import CACHE_ENV, default_cache_dir  # noqa: F401 - defined beside the cache (torch-free)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked for; fp32 runs without autocast."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(dropout seed, augmentation seed) of one epoch: two independent streams derived from (seed, epoch) alone.

    A run resumed at epoch k then draws exactly what an uninterrupted run draws there, with no RNG state to
    carry across processes or devices.
    """
    dropout, augmentation = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(dropout), int(augmentation)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
