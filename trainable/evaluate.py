"""Predict a split with a trained state dict, through the very batches and evaluation step the training loop uses.

No labels are needed to predict: the loader is fed zeros, so a caller can pass data whose labels it must not see
(final training predicts the test split this way before any test label is read).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import TrialConfig
from .data.augment import BatchAugment
from .data.loader import BatchLoader
from .data.nih import PreparedData
from .models import ChestXrayNet, create_model, input_stats
from .runtime import default_cache_dir, pick_device
from .train import SplitArrays, eval_batch_size, predict_probs  # the training loop's own eval step (one code path)


def build_model(cfg: TrialConfig, state_dict: dict) -> ChestXrayNet:
    """The trial's network with trained weights, in eval mode (pretrained weights are not fetched: they are
    overwritten anyway; timm's input statistics do not depend on them)."""
    model = create_model(cfg.replace(pretrained="none"))
    model.load_state_dict(state_dict)
    return model.eval()


def predict(cfg: TrialConfig, state_dict: dict, data: PreparedData, split: str,
            cache_dir: str | Path | None = None, *, device: torch.device | None = None) -> np.ndarray:
    """(N, 14) float32 probabilities for `split`, rows in the split's image order (PreparedData.subset)."""
    device = device or pick_device()
    arrays = SplitArrays.load(data, split, cfg, Path(cache_dir) if cache_dir else default_cache_dir())
    model = build_model(cfg, state_dict).to(device)
    mean, std = input_stats(model)
    augment = BatchAugment(cfg, mean=mean, std=std).to(device)
    unlabeled = np.zeros_like(arrays.labels)
    loader = BatchLoader(arrays.images, unlabeled, arrays.demographics, batch_size=eval_batch_size(cfg),
                         shuffle=False, seed=cfg.seed, pin_memory=device.type == "cuda")
    return predict_probs(model, augment, loader, cfg, device)[1]
