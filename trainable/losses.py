"""Loss registry: `LOSSES[cfg.loss](cfg, stats)` builds a multi-label criterion `(logits, targets) -> scalar`.

Library losses are used where they exist (torch BCE, torchvision's focal loss, timm's multi-label losses, LibAUC's
multi-label AUC-margin loss); only the batch-ratio weighted BCE of Fisher 2025 is written here. `create_loss` wraps every entry so it
runs in float32 outside autocast: the log/exp terms of these losses underflow in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import create_classification_loss
from torch import nn
from torchvision.ops import sigmoid_focal_loss

# Caps negatives/positives for classes that are (almost) never positive in the training split. High enough
# to leave every real NIH class alone (Hernia, the rarest, is ~490), low enough to keep gradients finite.
MAX_POS_WEIGHT = 1000.0


@dataclass
class LabelStats:
    """Training-split label counts, the only data statistics a loss may use."""
    positives: np.ndarray  # (K,) positive count per class
    num_samples: int

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> "LabelStats":
        labels = np.asarray(labels)
        return cls(positives=(labels > 0.5).sum(axis=0).astype(np.float64), num_samples=int(labels.shape[0]))

    @property
    def negatives(self) -> np.ndarray:
        return self.num_samples - self.positives


def positive_weights(stats: LabelStats, max_weight: float = MAX_POS_WEIGHT) -> torch.Tensor:
    """negatives / positives per class, capped at max_weight (also for classes with no positives)."""
    ratio = np.divide(stats.negatives, stats.positives,
                      out=np.full_like(stats.positives, max_weight, dtype=np.float64), where=stats.positives > 0)
    return torch.as_tensor(np.minimum(ratio, max_weight), dtype=torch.float32)


class FocalLoss(nn.Module):
    """torchvision's sigmoid focal loss, averaged over batch and classes."""

    def __init__(self, gamma: float, alpha: float) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="mean")


class DynamicWeightedBCE(nn.Module):
    """Batch-ratio weighted BCE (Fisher 2025), re-balancing every class within each batch.

    For class k with positive ratio r_k in the batch and smoothing s:
        r'_k = (1 - s) * r_k + s * 0.5
        w_ik = (1 - r'_k) if y_ik = 1 else r'_k
        loss = mean over i, k of  w_ik * BCE(logit_ik, y_ik)
    With s = 0 the total weight of a class's positives, r(1 - r), equals that of its negatives, so rare and
    common findings pull equally; s pulls the weights back toward plain BCE (at r' = 0.5 the loss is BCE / 2).
    A class without positives in the batch has r' = s/2: its negatives keep a small weight (none at s = 0),
    so the loss stays finite and the class is not pushed hard toward "always negative".
    """

    def __init__(self, smoothing: float) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ratio = targets.mean(dim=0, keepdim=True)
        ratio = (1.0 - self.smoothing) * ratio + self.smoothing * 0.5
        weights = targets * (1.0 - ratio) + (1.0 - targets) * ratio
        return F.binary_cross_entropy_with_logits(logits, targets, weight=weights.detach(), reduction="mean")


class AucMarginLoss(nn.Module):
    """LibAUC's MultiLabelAUCMLoss (Yuan et al. 2021, the CheXpert-competition AUC-margin loss), one task per finding.

    As LibAUC documents it, the loss takes sigmoid scores, not logits; the positive ratios are the training
    split's (imratio, not each batch's: `auto=False`). Its min-max variables a, b (minimised) and alpha
    (maximised) are held here as parameters, so they move with `.to(device)` and are saved in checkpoints;
    LibAUC's PESG (the optimizer entry `pesg`, built with this loss) updates all three.
    """

    def __init__(self, stats: LabelStats, margin: float = 1.0) -> None:
        super().__init__()
        from libauc.losses import MultiLabelAUCMLoss
        ratio = (stats.positives / max(stats.num_samples, 1)).tolist()
        # Not a submodule: its variables are registered once, here.
        object.__setattr__(self, "libauc_loss", MultiLabelAUCMLoss(
            margin=margin, num_labels=len(ratio), imratio=ratio, device=torch.device("cpu")))
        for name in ("a", "b", "alpha"):
            setattr(self, name, nn.Parameter(getattr(self.libauc_loss, name).detach().clone()))
        self._link()

    def _link(self) -> None:
        for name in ("a", "b", "alpha"):
            object.__setattr__(self.libauc_loss, name, getattr(self, name))

    def _apply(self, fn, recurse=True):
        moved = super()._apply(fn, recurse)
        self._link()                      # .to(device) may have replaced the parameter objects
        return moved

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.libauc_loss(torch.sigmoid(logits), targets, auto=False)


class Float32Loss(nn.Module):
    """Runs the wrapped loss on float32 logits and targets, with autocast disabled."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.loss(logits.float(), targets.float())


def _timm_loss(loss_type: str, options: Callable[[Any, LabelStats], dict] = lambda cfg, stats: {}):
    """A builder for one of timm's multi-label losses."""
    def build(cfg: Any, stats: LabelStats) -> nn.Module:
        return create_classification_loss(loss_type, multi_label=True, **options(cfg, stats))
    return build


LOSSES: dict[str, Callable[[Any, LabelStats], nn.Module]] = {
    "bce": lambda cfg, stats: nn.BCEWithLogitsLoss(),
    "weighted_bce": lambda cfg, stats: nn.BCEWithLogitsLoss(pos_weight=positive_weights(stats)),
    "focal": lambda cfg, stats: FocalLoss(gamma=cfg.focal_gamma, alpha=cfg.focal_alpha),
    "dynamic_weighted_bce": lambda cfg, stats: DynamicWeightedBCE(smoothing=cfg.dwbce_smoothing),
    # 'mean' (over batch and classes) instead of ASL's sum over classes keeps its scale, and so the useful
    # learning rates, comparable with the BCE family in an ablation.
    "asl": _timm_loss("asl", lambda cfg, stats: dict(
        asl_gamma_neg=cfg.asl_gamma_neg, asl_gamma_pos=cfg.asl_gamma_pos, asl_reduction="mean")),
    "poly": _timm_loss("poly"),
    "twoway": _timm_loss("twoway"),
    "zlpr": _timm_loss("zlpr"),
    "db": _timm_loss("db", lambda cfg, stats: dict(
        class_counts=torch.as_tensor(stats.positives, dtype=torch.float32), num_samples=stats.num_samples)),
    "aucm": lambda cfg, stats: AucMarginLoss(stats),
}


def create_loss(cfg: Any, stats: LabelStats) -> nn.Module:
    """The criterion for cfg.loss; move it to the training device with `.to(device)` (some hold buffers)."""
    return Float32Loss(LOSSES[cfg.loss](cfg, stats))
