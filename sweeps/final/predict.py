"""Final training's decisions on validation and its test predictions: what keeps the test split honest.

The order is structural: everything up to the test predictions works on `blind_test_labels(data)`, a copy of the
data whose test labels are zeroed, so neither model selection (each member's epoch with the best validation mean
AUC, sweeps/final/members.py) nor the F1 thresholds (`decide_on_validation`, on the validation predictions of the
selected checkpoints) can depend on a test label. The test split is predicted without its labels
(`predict_test`, as Ray tasks with a trial's resources: on a cluster whose head node has no GPU, the GPU nodes do
it); its labels are read only afterwards, by the evaluation (dashboards/final_report.py), once.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import ray

from trainable.config import TrialConfig
from trainable.data.nih import PreparedData
from trainable.deployed import DeployedClassifier, MemberClassifier
from trainable.evaluate import build_model, predict
from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds
from trainable.runtime import gpu_device, pick_device
from trainable.tune import node_name

from .members import TrainedMember


def blind_test_labels(data: PreparedData) -> PreparedData:
    """The same data with every test label zeroed: what training, selection and thresholds get to see.

    The fingerprint (which keys the image cache) is kept: pixels and paths are unchanged."""
    frame = data.frame.copy()
    frame.loc[frame["split"] == "test", list(FINDINGS)] = 0
    return dataclasses.replace(data, frame=frame)


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


def final_model(members: Sequence[TrainedMember], blinded: PreparedData, test_probs: Sequence[np.ndarray]
                ) -> FinalModel:
    """The members with the decisions taken on validation and their test predictions (of blinded data: made
    without test labels)."""
    validation = decide_on_validation(members, blinded.labels("val"))
    return FinalModel(members=list(members), validation=validation,
                      test_images=blinded.subset("test")["image"].to_numpy(str), test_probs_by_member=list(test_probs))


@ray.remote
def _predict_test(config: dict, state_dict: dict, data: PreparedData, cache_dir: str | None, gpus: float
                  ) -> np.ndarray:
    device = gpu_device(gpus, node_name()) if gpus > 0 else pick_device()
    return predict(TrialConfig.from_dict(config), state_dict, data, "test", cache_dir, device=device)


def predict_test(members: Sequence[TrainedMember], blinded: PreparedData, args: argparse.Namespace
                 ) -> list[np.ndarray]:
    """Each member's test probabilities, as Ray tasks with a trial's resources (of the blinded data)."""
    data = ray.put(blinded)
    task = _predict_test.options(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial)
    return ray.get([task.remote(m.spec.config.to_dict(), m.state_dict, data, args.cache_dir, args.gpus_per_trial)
                    for m in members])
