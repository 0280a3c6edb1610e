"""Final training: train the chosen config(s) over seeds, select and calibrate on validation, predict the test split.

The order is what keeps the test split honest, and it is structural: everything up to the test predictions
works on `blind_test_labels(data)`, a copy of the data whose test labels are zeroed, so neither model selection
(each member's epoch with the best validation mean AUC) nor the F1 thresholds (chosen on the validation
predictions of the selected checkpoints) can depend on a test label. Test labels are read only afterwards, by
the evaluation (dashboards/final_report.py), once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trainable.checkpoint_files import PREDICTIONS_FILE, STATE_FILE
from trainable.config import TrialConfig
from trainable.data.nih import PreparedData
from trainable.deployed import DeployedClassifier, MemberClassifier
from trainable.evaluate import build_model, predict
from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds
from trainable.train import train

SELECTION_METRIC = "val_auc_mean"


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


def blind_test_labels(data: PreparedData) -> PreparedData:
    """The same data with every test label zeroed: what training, selection and thresholds get to see.

    The fingerprint (which keys the image cache) is kept: pixels and paths are unchanged."""
    frame = data.frame.copy()
    frame.loc[frame["split"] == "test", list(FINDINGS)] = 0
    return dataclasses.replace(data, frame=frame)


def selection_key(metrics: dict) -> tuple[bool, float, int]:
    """How epochs are ranked for selection: by validation mean AUC, any number above NaN, the later epoch on a tie.

    This is the order in which Ray Tune ranks checkpoints (CheckpointConfig with checkpoint_score_attribute), so
    the checkpoint Tune keeps as a member's best (sweeps/final_tune.py) is the epoch selected here."""
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


@dataclass
class ValidationDecision:
    """Everything decided on validation: the ensemble's validation probabilities and the F1 thresholds."""
    images: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    thresholds: np.ndarray


def decide_on_validation(members: Sequence[TrainedMember], val_labels: np.ndarray) -> ValidationDecision:
    """Average the members' validation probabilities and choose each finding's F1 threshold on them.

    Takes validation labels only; the test split does not exist here."""
    images = members[0].val_images
    for member in members[1:]:
        if not np.array_equal(member.val_images, images):
            raise ValueError(f"member {member.spec.name} was validated on other images than {members[0].spec.name}")
    probs = np.mean([member.val_probs for member in members], axis=0).astype(np.float32)
    return ValidationDecision(images=images, labels=val_labels, probs=probs,
                              thresholds=choose_thresholds(val_labels, probs))


@dataclass
class FinalModel:
    members: list[TrainedMember]
    validation: ValidationDecision
    test_images: np.ndarray
    test_probs_by_member: list[np.ndarray]

    @property
    def test_probs(self) -> np.ndarray:
        return np.mean(self.test_probs_by_member, axis=0).astype(np.float32)

    def deployable(self) -> DeployedClassifier:
        return DeployedClassifier([MemberClassifier(m.spec.config, build_model(m.spec.config, m.state_dict))
                                   for m in self.members])


def fit_final(specs: Sequence[MemberSpec], data: PreparedData, *, cache_dir: str | Path | None = None,
              on_epoch: EpochCallback | None = None,
              on_member: Callable[[TrainedMember], None] | None = None) -> FinalModel:
    """Train every member here, one after another (sweeps/final_tune.py trains them as Ray Tune trials), decide on
    validation, then predict the test split (without its labels)."""
    blinded = blind_test_labels(data)
    members = []
    for spec in specs:
        member = train_member(spec, blinded, cache_dir=cache_dir, on_epoch=on_epoch)
        if on_member is not None:
            on_member(member)
        members.append(member)
    test_probs = [predict(m.spec.config, m.state_dict, blinded, "test", cache_dir) for m in members]
    return final_model(members, blinded, test_probs)


def final_model(members: Sequence[TrainedMember], blinded: PreparedData, test_probs: Sequence[np.ndarray]
                ) -> FinalModel:
    """The members with the decisions taken on validation and their test predictions (of blinded data: made
    without test labels)."""
    validation = decide_on_validation(members, blinded.labels("val"))
    return FinalModel(members=list(members), validation=validation,
                      test_images=blinded.subset("test")["image"].to_numpy(str), test_probs_by_member=list(test_probs))
