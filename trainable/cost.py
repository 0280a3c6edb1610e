"""What a trial costs: parameters and FLOPs per image of its model, and the peak memory of its device.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one forward at batch 1 and the trial's image
size (matrix multiplies and convolutions, 2 FLOPs per multiply-add; element-wise work is not counted). Training
compute is estimated as 3x that per image trained (backward costs about twice the forward): an estimate that does
not depend on the machine, unlike the wall time beside it.
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .metric_names import FLOPS_PER_IMAGE, PARAM_COUNT, PEAK_GPU_MEMORY_MB, PEAK_RSS_MB

TRAIN_FLOPS_PER_FORWARD = 3.0
MIB = 1024 ** 2


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_flops(model: nn.Module, image_size: int, num_demographic: int, device: torch.device) -> int:
    """FLOPs of one forward of one grayscale image (1, 1, S, S) with its demographic inputs, in eval mode (the
    model's mode is restored; no random numbers are drawn)."""
    was_training = model.training
    model.eval()
    try:
        images = torch.zeros((1, 1, image_size, image_size), device=device)
        demographics = torch.zeros((1, num_demographic), device=device)
        with FlopCounterMode(display=False) as counter:
            model(images, demographics)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def model_cost(model: nn.Module, image_size: int, num_demographic: int, device: torch.device) -> dict[str, float]:
    return {PARAM_COUNT: float(parameter_count(model)),
            FLOPS_PER_IMAGE: float(forward_flops(model, image_size, num_demographic, device))}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """{PEAK_GPU_MEMORY_MB: ...} on a GPU; on the CPU {PEAK_RSS_MB: ...}: the process's peak resident set (which
    includes the interpreter, libraries and data, not only the model), under its own name so no reader takes one
    for the other."""
    if device.type == "cuda":
        return {PEAK_GPU_MEMORY_MB: torch.cuda.max_memory_allocated(device) / MIB}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux, bytes on macOS
    return {PEAK_RSS_MB: peak / (MIB if sys.platform == "darwin" else 1024)}
