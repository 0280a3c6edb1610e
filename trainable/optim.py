"""Optimizers (any timm optimizer name, plus `OPTIMIZERS`) and the per-epoch learning-rate schedule registry
`SCHEDULERS`."""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim import lr_scheduler

from .errors import ConfigError


def _pesg(cfg: Any, model: nn.Module, criterion: nn.Module | None) -> torch.optim.Optimizer:
    """LibAUC's PESG (SGD mode, its default) for the `aucm` loss: it also descends the loss's a, b and ascends
    its alpha. momentum and weight_decay are cfg's; epoch_decay (the pull toward a reference model) is LibAUC's
    default 2e-3. The learning rate follows cfg.scheduler like any optimizer's; LibAUC's stage-wise
    `update_regularizer` (lr / 10 and a new reference model at chosen epochs) is not called."""
    from libauc.optimizers import PESG

    from .losses import AucMarginLoss
    loss = next((m for m in (criterion.modules() if criterion is not None else ()) if isinstance(m, AucMarginLoss)),
                None)
    if loss is None:
        raise ConfigError("optimizer='pesg' optimises LibAUC's AUC-margin loss: set loss=aucm")
    device = next(model.parameters()).device
    return PESG(model.parameters(), loss_fn=loss.libauc_loss, lr=cfg.lr, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay, verbose=False, device=device)


# Optimizers timm does not have: name -> builder(cfg, model, criterion).
OPTIMIZERS: dict[str, Callable[[Any, nn.Module, nn.Module | None], torch.optim.Optimizer]] = {
    "pesg": _pesg,
}


def create_optimizer(cfg: Any, model: nn.Module, criterion: nn.Module | None = None) -> torch.optim.Optimizer:
    """An `OPTIMIZERS` entry, else timm's optimizer factory: biases and norm weights get no weight decay; momentum
    reaches only the optimizers that take it (timm drops it for Adam and friends). `criterion` is for optimizers
    that also update the loss's own variables (pesg)."""
    if cfg.optimizer in OPTIMIZERS:
        return OPTIMIZERS[cfg.optimizer](cfg, model, criterion)
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
