"""What a sweep could detect, and what it would take to decide: power from the observed variances.

A two-sided test at level L of Δ with standard error se and ν degrees of freedom detects a true |Δ| with
80% power when |Δ| ≥ (t_{1−L/2,ν} + t_{0.8,ν})·se: the smallest detectable Δ (`mde`). An inconclusive row is
decided at the margin M once both hold: a true |Δ| = M would be called with 80% power, and a true Δ = 0 would
be shown equivalent (TOST at level L per side) with 80% power, i.e. M ≥ (t_{1−L,ν} + t_{0.9,ν})·se. How se and
ν shrink with more seeds comes from the fitted variance model (dashboards/variance.py: the seed variance and
each model's own image noise fall as 1/seeds, the image noise common to an arm's seeds does not).
"""
from __future__ import annotations

import numpy as np
from scipy import special

from .variance import SeedModel, projected_df, projected_variance

POWER = 0.8
MAX_SEEDS = 200         # beyond this the answer is "not with seeds": more validation images, or a larger margin


def minimum_detectable(se: np.ndarray, df: np.ndarray, level: float, power: float = POWER) -> np.ndarray:
    """Smallest |Δ| a two-sided t test at `level` detects with `power` (broadcasts se against df)."""
    se, df = np.asarray(se, float), np.asarray(df, float)
    with np.errstate(invalid="ignore"):
        return (special.stdtrit(df, 1 - level / 2) + special.stdtrit(df, power)) * se


def decides_at_margin(se: np.ndarray, df: np.ndarray, level: float, margin: float, power: float = POWER) -> np.ndarray:
    """Whether a row with this se and df would be decided at the margin with `power` (see the module doc)."""
    se, df = np.asarray(se, float), np.asarray(df, float)
    with np.errstate(invalid="ignore"):
        equivalence = (special.stdtrit(df, 1 - level) + special.stdtrit(df, 1 - (1 - power) / 2)) * se
    return (minimum_detectable(se, df, level, power) <= margin) & (equivalence <= margin)


def seeds_needed(model: SeedModel, arm: str, baseline: str, image_variance: np.ndarray, target: float,
                 level: float, *, decide: bool = True, power: float = POWER) -> np.ndarray:
    """Per column, the smallest number of seeds per arm (arm and baseline alike) at which the row is decided at
    the margin `target` (decide=True), or detects a true |Δ| = target (decide=False), with `power`. NaN where
    even MAX_SEEDS would not do: the image noise common to the seeds alone is too large (more validation
    images would be needed)."""
    seeds = np.arange(2, MAX_SEEDS + 1)
    se = np.sqrt(projected_variance(model, arm, baseline, image_variance, seeds))        # (seeds, F)
    df = projected_df(model, arm, baseline, seeds)[:, None]
    if not np.isfinite(level):
        return np.full(se.shape[1], np.nan)
    done = decides_at_margin(se, df, level, target, power) if decide else \
        minimum_detectable(se, df, level, power) <= target
    first = np.argmax(done, axis=0)
    return np.where(done.any(axis=0), seeds[first], np.nan).astype(float)
