"""Torch backend settings of a trial: cuDNN autotuning or deterministic kernels, and torch.compile without
recompiles.

Which guarantee holds when (README, "Exact resume and repeatability"):
  * deterministic=false (default): cuDNN autotunes its convolution algorithms (`cudnn.benchmark`, a few to
    ~15% faster for the fixed shapes of a trial) and may pick non-deterministic kernels: on a GPU two runs with
    the same seed, and a resumed run vs an uninterrupted one, agree only to floating-point noise. On the CPU
    they agree exactly.
  * deterministic=true: `torch.use_deterministic_algorithms(True)` (an op without a deterministic kernel
    raises, naming itself, instead of silently breaking the guarantee), cuDNN deterministic and not autotuned,
    and cuBLAS with a fixed workspace (`CUBLAS_WORKSPACE_CONFIG`): runs repeat bit for bit on the same GPU
    model and software versions, and resume is exact there too.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the CLI reads the constants before torch loads.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
# cuBLAS is deterministic only with a fixed workspace; torch's documented setting (":16:8" saves memory).
DETERMINISTIC_CUBLAS_WORKSPACE = ":4096:8"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
INDUCTOR_CACHE_FOLDER = "torchinductor"   # inside the node's image-cache folder: shared by the node's trials
COMPILE_BACKEND = "inductor"


def configure_backends(deterministic: bool) -> None:
    """Set every flag both ways: a Ray actor reused for the next trial keeps the previous trial's settings."""
    import torch

    if deterministic:
        _fix_cublas_workspace()
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def _fix_cublas_workspace() -> None:
    import torch

    if os.environ.get(CUBLAS_WORKSPACE_ENV) in (":4096:8", ":16:8"):
        return
    os.environ[CUBLAS_WORKSPACE_ENV] = DETERMINISTIC_CUBLAS_WORKSPACE
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # torch sizes cuBLAS's workspace once per process, at its first cuBLAS call.
        warnings.warn(f"deterministic=true: CUDA was initialised in this process before {CUBLAS_WORKSPACE_ENV} "
                      f"was set; if cuBLAS already ran, its workspace is not fixed. Start the process with "
                      f"{CUBLAS_WORKSPACE_ENV}={DETERMINISTIC_CUBLAS_WORKSPACE}", RuntimeWarning, stacklevel=2)


def compile_model(model: torch.nn.Module, cache_dir: str | Path) -> torch.nn.Module:
    """torch.compile with static shapes and inductor's on-disk caches in the node's cache folder.

    dynamic=False: the training loop feeds one training and one evaluation shape (it drops the last partial
    training batch and pads the last evaluation batch when compiling), so each is compiled once, to a
    static-shape graph, instead of a recompile for the odd batch and a dynamic-shape graph after it. The FX
    graph and autograd caches under TORCHINDUCTOR_CACHE_DIR (default: CACHE_DIR/torchinductor; an existing
    setting wins) survive the process, so a node's later trials of the same model load the compiled kernels
    instead of compiling again.
    """
    import torch
    import torch._functorch.config
    import torch._inductor.config

    os.environ.setdefault(INDUCTOR_CACHE_ENV, str(Path(cache_dir) / INDUCTOR_CACHE_FOLDER))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return torch.compile(model, dynamic=False, backend=COMPILE_BACKEND)
