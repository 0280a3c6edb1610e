"""Where a trial runs: device, numeric precision, per-epoch seeding and the node-local cache folder."""
from __future__ import annotations

import contextlib
import os
import platform
import random

import numpy as np
import torch

from .data.cache import CACHE_ENV, default_cache_dir  # noqa: F401 - defined beside the cache (torch-free)
from .errors import DeviceUnavailable


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gpu_device(gpus: float, node: str) -> torch.device:
    """The CUDA device of a trial given `gpus` GPUs; on a node where torch sees none, a one-line error naming it
    (training on the CPU instead would be silently slow)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as err:  # noqa: BLE001 - whatever CUDA says is the reason to show
        reason = " ".join(str(err).split())[:200] or type(err).__name__
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise DeviceUnavailable(f"node {node}: this trial was given {gpus:g} GPU(s) but torch {torch.__version__} "
                            f"(CUDA build {torch.version.cuda or 'none'}) sees no usable CUDA device ({reason}; "
                            f"CUDA_VISIBLE_DEVICES={visible}); fix the node's NVIDIA driver or run with "
                            f"--gpus-per-trial 0")


def where_it_runs(device: torch.device, node: str) -> dict[str, str]:
    """Device, node and library versions of a run: recorded with every trial's results (MLflow tags)."""
    import timm
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "node": node, "torch_version": torch.__version__, "timm_version": timm.__version__,
            "cuda_version": torch.version.cuda or "none", "python_version": platform.python_version()}


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
