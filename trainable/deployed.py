"""The classifier as shipped (what final training registers in MLflow): raw pixels in, probabilities out.

`DeployedClassifier(images, demographics)` takes grayscale uint8 images (B, 1, S, S) and, where a member was
trained with demographic inputs, a (B, 4) float matrix of `DEMOGRAPHIC_INPUTS` encoded as
trainable.data.demographics.FEATURES does ((age - 46.6) / 16.6 with an unknown age replaced by the training
split's mean, age_missing 1 / 0, sex M = +1 / F = -1, view PA = +1 / AP = -1).
Feed images as trainable.data.cache.decode_image(path, S) decodes them, S = the members' image_size: that is
the resampling the test metrics were measured with (other sizes are resized by the member's eval-mode
BatchAugment with torch's antialiased bilinear, close to but not the same pixels). Members of different
backbones or demographic settings can be averaged. Output: (B, 14) mean probability over members, columns in FINDINGS order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import TrialConfig
from .data.augment import BatchAugment
from .data.demographics import DEMOGRAPHICS, demographic_matrix
from .findings import FINDINGS
from .models import ChestXrayNet, input_stats

DEMOGRAPHICS_ALL = "age_sex_view"
DEMOGRAPHIC_INPUTS: tuple[str, ...] = DEMOGRAPHICS[DEMOGRAPHICS_ALL]   # the widest setting; members pick columns


def demographic_inputs(frame: pd.DataFrame, age_fill: float) -> np.ndarray:
    """(N, 4) float32 DEMOGRAPHIC_INPUTS of a metadata table (PreparedData.subset); `age_fill` replaces an
    unknown age (PreparedData.train_age_mean, as in training)."""
    return demographic_matrix(frame, DEMOGRAPHICS_ALL, age_fill=age_fill)


class MemberClassifier(nn.Module):
    """One trained network with its own input preparation: uint8 (B, 1, H, W) -> probabilities (B, 14)."""

    def __init__(self, cfg: TrialConfig, model: ChestXrayNet) -> None:
        super().__init__()
        mean, std = input_stats(model)
        self.prepare = BatchAugment(cfg, mean=mean, std=std)
        self.model = model
        self.demographic_columns = [DEMOGRAPHIC_INPUTS.index(name) for name in DEMOGRAPHICS[cfg.demographics]]
        self.config = cfg.to_dict()
        self.eval()

    def forward(self, images: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        if self.demographic_columns and demographics is None:
            raise ValueError(f"this model uses demographic inputs {', '.join(DEMOGRAPHIC_INPUTS)}; "
                             f"pass a (B, {len(DEMOGRAPHIC_INPUTS)}) float tensor")
        own = demographics[:, self.demographic_columns] if self.demographic_columns else None
        return torch.sigmoid(self.model(self.prepare(images), own).float())


class DeployedClassifier(nn.Module):
    """Mean probability of its members (seeds of one config, or the top configs of a sweep)."""

    findings: tuple[str, ...] = FINDINGS

    def __init__(self, members: Sequence[MemberClassifier]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a DeployedClassifier needs at least one member")
        self.members = nn.ModuleList(members)
        self.eval()

    def forward(self, images: torch.Tensor, demographics: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([member(images, demographics) for member in self.members]).mean(dim=0)
