"""Validation predictions of simulated sweeps with known effects: the ground truth the effect analysis is checked on.

Every trial scores each image as  signal_arm,k · y_ik + difficulty_ik + seed-level shift · y_ik + noise_ik:
- `difficulty` is shared by all trials (a hard image is hard for every model), which is what pairing exploits;
- the seed-level shift moves a whole trained model (one draw per trial, plus one per trial and finding): the
  part of seed noise that an image bootstrap cannot see;
- `noise` is each trial's own per-image noise (seed noise an image bootstrap does see).
Two arms with the same signal and seed spread are identical configurations: any difference between them is seed
noise. The truth the analysis is checked against: Δ = 0 between identical arms, and `expected_delta` (the mean
AUC over seeds and validation sets, by simulation with antithetic seed draws) otherwise.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
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


def _scores(labels: np.ndarray, difficulty: np.ndarray, signal: np.ndarray | float, seed_sd: float, noise_sd: float,
            rng: np.random.Generator, sign: float = 1.0) -> np.ndarray:
    shift = sign * seed_sd * (rng.normal() + rng.normal(size=labels.shape[1])) / np.sqrt(2)
    return (np.asarray(signal) + shift) * labels + difficulty + noise_sd * rng.normal(size=labels.shape)


def simulate_trial(labels: np.ndarray, difficulty: np.ndarray, images: np.ndarray, signal: np.ndarray | float, *,
                   seed_sd: float, noise_sd: float, seed: int, name: str = "trial",
                   thresholds: bool = True) -> TrialPredictions:
    """One trained model's validation output; `thresholds=False` skips choosing F1 thresholds (0.5 instead) where
    only AUC is wanted."""
    score = _scores(labels, difficulty, signal, seed_sd, noise_sd, np.random.default_rng(seed))
    probs = (1 / (1 + np.exp(-(score - 2.0)))).astype(np.float32)
    chosen = choose_thresholds(labels, probs) if thresholds else np.full(labels.shape[1], 0.5)
    return TrialPredictions(labels, probs, chosen, images, name)


def simulate_sweep(signals: Mapping[str, np.ndarray | float], *, n_seeds: int | Mapping[str, int] = 2,
                   n_images: int = 2000, seed_sd: float | Mapping[str, float] = 0.15, noise_sd: float = 0.5,
                   prevalence_floor: float = 0.02, seed: int = 0, thresholds: bool = True
                   ) -> dict[str, list[TrialPredictions]]:
    """{arm: one TrialPredictions per seed} on one shared simulated validation split.

    `n_seeds` and `seed_sd` may differ per arm (a mapping over the arms); seed s of an arm is the same model
    whatever the other arms' seed counts, so a sweep with more seeds extends one with fewer.
    """
    labels, difficulty, images = simulate_validation(n_images, prevalence_floor=prevalence_floor, seed=seed)
    seeds = n_seeds if isinstance(n_seeds, Mapping) else dict.fromkeys(signals, n_seeds)
    spread = seed_sd if isinstance(seed_sd, Mapping) else dict.fromkeys(signals, seed_sd)
    trial_seeds = np.random.default_rng([seed, 1]).integers(0, 2**31, (len(signals), max(seeds.values())))
    return {arm: [simulate_trial(labels, difficulty, images, signal, seed_sd=spread[arm], noise_sd=noise_sd,
                                 seed=int(trial_seeds[a, s]), name=f"{arm}-s{s}", thresholds=thresholds)
                  for s in range(seeds[arm])]
            for a, (arm, signal) in enumerate(signals.items())}


def expected_delta(arm: tuple[np.ndarray | float, float], baseline: tuple[np.ndarray | float, float], *,
                   n_models: int = 300, **options) -> tuple[float, float]:
    """(true Δ mean AUC of an arm vs the baseline, its Monte-Carlo standard error), each arm given as (signal,
    seed_sd): the mean of `delta_draws` over n_models models."""
    draws = delta_draws(arm, baseline, range(n_models), **options)
    return float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(len(draws)))


def delta_draws(arm: tuple[np.ndarray | float, float], baseline: tuple[np.ndarray | float, float],
                models: Sequence[int], *, noise_sd: float = 0.5, n_images: int = 10_000,
                prevalence_floor: float = 0.02, seed: int = 0) -> np.ndarray:
    """Per model (seed) index, the difference in population mean AUC between the arm's and the baseline's model,
    measured on one large validation set (AUC is unbiased for its population value). Both arms' models share
    their random draws (common random numbers, so the validation set's own error cancels in the difference),
    and each seed shift is drawn with its mirror image (antithetic draws, which cancel the linear part of the
    seed noise). Model indices make the draws reproducible in any split across processes."""
    labels, difficulty, _ = simulate_validation(n_images, prevalence_floor=prevalence_floor, seed=seed)
    positive = labels > 0.5
    differences = []
    for model in models:
        means = [np.mean([_mean_auc(positive, _scores(labels, difficulty, signal, seed_sd, noise_sd,
                                                      np.random.default_rng([seed, 2, model]), sign))
                          for sign in (1.0, -1.0)]) for signal, seed_sd in (arm, baseline)]
        differences.append(means[0] - means[1])
    return np.array(differences)


def _mean_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mean over findings of the AUC as the Mann–Whitney U / (n₊ n₋) (scipy: rank-based, ties count 1/2 as in
    sklearn, and much faster than roc_auc_score on 20,000 images)."""
    return float(np.mean([stats.mannwhitneyu(scores[positive[:, k], k], scores[~positive[:, k], k]).statistic
                          / (positive[:, k].sum() * (~positive[:, k]).sum()) for k in range(positive.shape[1])]))


def simulate_metadata(images: Sequence[str], seed: int = 0, unknown_ages: int = 5) -> pd.DataFrame:
    """Sex, age and view of simulated validation images (one sex and age per patient, parsed from the NIH-style
    names; the first `unknown_ages` images' ages unknown), in the columns the sweep driver logs."""
    rng = np.random.default_rng(seed)
    patient = np.array([int(str(name).split("_")[0]) for name in images])
    ids, index = np.unique(patient, return_inverse=True)
    age = rng.integers(1, 95, len(ids))[index].astype(float)
    age[:unknown_ages] = np.nan
    return pd.DataFrame({"image": list(images), "patient_id": patient, "age": age,
                         "sex": np.where(rng.random(len(ids)) < 0.5, "F", "M")[index],
                         "view": np.where(rng.random(len(images)) < 0.6, "PA", "AP")})
