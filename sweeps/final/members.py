"""Final training's members: a candidate config at one seed, trained to the epoch its validation selects.

A member's epoch is the one with the best validation mean AUC (`selection_key`, the order in which Ray Tune ranks
checkpoints), read back from that epoch's checkpoint with its validation predictions (`read_checkpoint`). The data
a member trains on are blinded (sweeps/final/predict.py: `blind_test_labels`), so no selection sees a test label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trainable.checkpoint_files import PREDICTIONS_FILE, STATE_FILE
from trainable.config import TrialConfig
from trainable.data.nih import PreparedData
from trainable.metric_names import VAL_AUC_MEAN
from trainable.train import train

SELECTION_METRIC = VAL_AUC_MEAN


@dataclass(frozen=True)
class MemberSpec:
    """One model to train: a candidate config (`label` names it: arm, trial or file) at one seed."""
    label: str
    config: TrialConfig

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.config.seed}"


def member_specs(candidates: Sequence[tuple[str, TrialConfig]], seeds: int) -> list[MemberSpec]:
    """Each candidate at seeds config.seed, config.seed + 1, ... (`seeds` of them)."""
    return [MemberSpec(label, config.replace(seed=config.seed + offset))
            for label, config in candidates for offset in range(seeds)]


@dataclass
class TrainedMember:
    spec: MemberSpec
    selected_epoch: int
    selected_value: float            # SELECTION_METRIC at the selected epoch
    state_dict: dict
    val_images: np.ndarray
    val_probs: np.ndarray
    history: list[dict] = field(default_factory=list)


EpochCallback = Callable[[MemberSpec, dict], None]


def selection_key(metrics: dict) -> tuple[bool, float, int]:
    """How epochs are ranked for selection: by validation mean AUC, any number above NaN, the later epoch on a tie.

    This is the order in which Ray Tune ranks checkpoints (CheckpointConfig with checkpoint_score_attribute), so
    the checkpoint Tune keeps as a member's best (sweeps/final/fit.py) is the epoch selected here."""
    value = float(metrics[SELECTION_METRIC])
    finite = not math.isnan(value)
    return finite, value if finite else -math.inf, int(metrics["epoch"])


def select_epoch(history: Sequence[dict]) -> int:
    return int(max(history, key=selection_key)["epoch"])


def read_checkpoint(spec: MemberSpec, metrics: dict, checkpoint: str | Path, history: list[dict]) -> TrainedMember:
    """The member as selected: the weights and validation predictions saved in the checkpoint of the epoch whose
    `metrics` are given (checked against the epoch the checkpoint says it ends)."""
    state = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    if state["progress"]["next_epoch"] != int(metrics["epoch"]) + 1:
        raise RuntimeError(f"{checkpoint}: a checkpoint of epoch {state['progress']['next_epoch'] - 1}, not of the "
                           f"selected epoch {metrics['epoch']} of member {spec.name}")
    with np.load(Path(checkpoint) / PREDICTIONS_FILE, allow_pickle=False) as saved:
        images, probs = saved["images"].astype(str), saved["probs"]
    value = float(metrics[SELECTION_METRIC])
    return TrainedMember(spec=spec, selected_epoch=int(metrics["epoch"]),
                         selected_value=value if math.isfinite(value) else -math.inf, state_dict=state["model"],
                         val_images=images, val_probs=probs, history=history)


def train_member(spec: MemberSpec, data: PreparedData, *, cache_dir: str | Path | None = None,
                 on_epoch: EpochCallback | None = None) -> TrainedMember:
    """Train one member in this process; keep the checkpoint of the epoch `selection_key` ranks best."""
    kept: dict = {}
    history: list[dict] = []

    def report(metrics: dict, checkpoint: Path) -> None:
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(spec, metrics)
        if kept and not selection_key(metrics) > selection_key(kept["metrics"]):
            return
        # The folder is deleted when report returns: copy what is kept into memory now.
        kept.update(metrics=metrics, member=read_checkpoint(spec, metrics, checkpoint, history))

    train(spec.config, data, report, cache_dir=cache_dir)
    return kept["member"]
