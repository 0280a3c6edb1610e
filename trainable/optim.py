"""Optimizer (any timm optimizer name) and the per-epoch learning-rate schedule registry `SCHEDULERS`."""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim import lr_scheduler

from .errors import ConfigError


def create_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory: biases and norm weights get no weight decay; momentum reaches only the
    optimizers that take it (timm drops it for Adam and friends)."""
    try:
        return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    except ValueError as err:  # e.g. sgd (Nesterov) with momentum=0
        raise ConfigError(f"optimizer={cfg.optimizer!r} with lr={cfg.lr:g}, weight_decay={cfg.weight_decay:g}, "
                          f"momentum={cfg.momentum:g}: {err}") from None


class EpochScheduler:
    """A torch LR scheduler stepped once per epoch, after validation; state_dict round-trips for exact resume."""

    def __init__(self, scheduler: lr_scheduler.LRScheduler, *, uses_val_loss: bool = False) -> None:
        self.scheduler = scheduler
        self.uses_val_loss = uses_val_loss

    def step(self, val_loss: float) -> None:
        if self.uses_val_loss:
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group, for logging."""
        return float(self.scheduler.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _plateau(cfg: Any, optimizer: torch.optim.Optimizer) -> EpochScheduler:
    """CheXNet: divide the lr by 1/factor when val loss has not improved for `patience` epochs."""
    scheduler = lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    return EpochScheduler(scheduler, uses_val_loss=True)


def _cosine(cfg: Any, optimizer: torch.optim.Optimizer) -> EpochScheduler:
    """Linear warmup over cfg.warmup_epochs (lr * 1/(W+1), 2/(W+1), ...), then cosine from lr to 0 over the
    remaining epochs: the last epoch trains just above 0, and the lr after the final step is 0. Warmup is
    capped at epochs - 1 so at least one epoch runs at the full rate."""
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1)
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - warmup), eta_min=0.0)
    if warmup == 0:
        return EpochScheduler(cosine)
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return EpochScheduler(lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup]))


def _constant(cfg: Any, optimizer: torch.optim.Optimizer) -> EpochScheduler:
    return EpochScheduler(lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0))


SCHEDULERS: dict[str, Callable[[Any, torch.optim.Optimizer], EpochScheduler]] = {
    "plateau": _plateau,
    "cosine": _cosine,
    "none": _constant,
}


def create_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> EpochScheduler:
    return SCHEDULERS[cfg.scheduler](cfg, optimizer)
