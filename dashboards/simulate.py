"""Validation predictions of simulated sweeps with known effects: the ground truth the effect analysis is checked on.

Every trial scores each image as  signal_arm,k · y_ik + difficulty_ik + seed-level shift · y_ik + noise_ik:
- `difficulty` is shared by all trials (a hard image is hard for every model), which is what pairing exploits;
- the seed-level shift moves a whole trained model (one draw per trial, plus one per trial and finding): the
  part of seed noise that an image bootstrap cannot see;
- `noise` is each trial's own per-image noise (seed noise an image bootstrap does see).
Two arms with the same signal are identical configurations: any difference between them is seed noise.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy import stats

from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds

from .effects import TrialPredictions

# NIH ChestX-ray14 label counts / 112,120 images (Data_Entry_2017_v2020.csv)
NIH_PREVALENCE = np.array([11559, 2776, 13317, 19894, 5782, 6331, 1431, 5302, 4667, 2303, 2516, 1686, 3385,
                           227]) / 112_120


def simulate_validation(n_images: int, *, prevalence_floor: float = 0.0, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels (N, K), difficulty (N, K), NIH-style image names with 1-3 images per patient)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_images)
    patient = np.repeat(np.arange(1, n_images + 1), per_patient)[:n_images]
    follow_up = np.concatenate([np.arange(c) for c in per_patient])[:n_images]
    prevalence = np.maximum(NIH_PREVALENCE, prevalence_floor)
    # a patient's images share part of their labels and difficulty, as follow-up images do
    patient_latent = rng.normal(size=(patient.max() + 1, len(FINDINGS)))[patient]
    latent = 0.7 * patient_latent + 0.7 * rng.normal(size=(n_images, len(FINDINGS)))
    labels = (latent > stats.norm.ppf(1 - prevalence, scale=np.hypot(0.7, 0.7))).astype(np.float32)
    difficulty = 0.6 * patient_latent + 0.8 * rng.normal(size=(n_images, len(FINDINGS)))
    images = np.array([f"{p:08d}_{f:03d}.png" for p, f in zip(patient, follow_up)])
    return labels, difficulty, images


def simulate_trial(labels: np.ndarray, difficulty: np.ndarray, images: np.ndarray, signal: np.ndarray | float, *,
                   seed_sd: float, noise_sd: float, seed: int, name: str = "trial") -> TrialPredictions:
    rng = np.random.default_rng(seed)
    n_findings = labels.shape[1]
    shift = seed_sd * (rng.normal() + rng.normal(size=n_findings)) / np.sqrt(2)
    score = (np.asarray(signal) + shift) * labels + difficulty + noise_sd * rng.normal(size=labels.shape)
    probs = (1 / (1 + np.exp(-(score - 2.0)))).astype(np.float32)
    return TrialPredictions(labels, probs, choose_thresholds(labels, probs), images, name)


def simulate_sweep(signals: Mapping[str, np.ndarray | float], *, n_seeds: int = 2, n_images: int = 2000,
                   seed_sd: float = 0.15, noise_sd: float = 0.5, prevalence_floor: float = 0.02,
                   seed: int = 0) -> dict[str, list[TrialPredictions]]:
    """{arm: one TrialPredictions per seed} on one shared simulated validation split."""
    labels, difficulty, images = simulate_validation(n_images, prevalence_floor=prevalence_floor, seed=seed)
    trial_seeds = np.random.default_rng([seed, 1]).integers(0, 2**31, (len(signals), n_seeds))
    return {arm: [simulate_trial(labels, difficulty, images, signal, seed_sd=seed_sd, noise_sd=noise_sd,
                                 seed=int(trial_seeds[a, s]), name=f"{arm}-s{s}") for s in range(n_seeds)]
            for a, (arm, signal) in enumerate(signals.items())}
