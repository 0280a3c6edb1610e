"""Demographic inputs: which metadata columns a `demographics` setting feeds the model, and how they are encoded.

An unknown age (NaN: the 2017 release has a few impossible ones) is imputed with the training split's mean age
and flagged by the `age_missing` indicator, so the model sees a finite input and can tell an imputed age from a
real one; a known age has `age_missing` = 0, and a split without unknown ages gets the exact encoding it had.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

# NIH ChestX-ray14 ages: mean 46.6, sd about 16.6 years (reference metadata).
AGE_MEAN, AGE_SD = 46.6, 16.6


def _age(frame: pd.DataFrame, age_fill: float) -> np.ndarray:
    ages = frame["age"].to_numpy(np.float64)
    filled = np.where(np.isnan(ages), age_fill if np.isfinite(age_fill) else AGE_MEAN, ages)
    return ((filled - AGE_MEAN) / AGE_SD).astype(np.float32)


# Each feature maps the metadata table (and the age that replaces an unknown one) to one float column of unit
# scale: inputs of the scale of the pooled image features get a usable gradient from the first steps (age/100 in
# [0, 1] barely moved).
FEATURES: dict[str, Callable[[pd.DataFrame, float], np.ndarray]] = {
    "age": _age,
    "age_missing": lambda frame, _fill: frame["age"].isna().to_numpy().astype(np.float32),
    "sex": lambda frame, _fill: np.where(frame["sex"] == "M", 1.0, -1.0).astype(np.float32),
    "view": lambda frame, _fill: np.where(frame["view"] == "PA", 1.0, -1.0).astype(np.float32),
}

DEMOGRAPHICS: dict[str, tuple[str, ...]] = {
    "none": (),
    "age_sex": ("age", "age_missing", "sex"),
    "age_sex_view": ("age", "age_missing", "sex", "view"),
}


def demographic_matrix(frame: pd.DataFrame, setting: str, age_fill: float = AGE_MEAN) -> np.ndarray:
    """(N, number of features) float32 matrix for `setting`; (N, 0) for 'none'. `age_fill`: the age in years
    that stands in for an unknown one (the training split's mean: PreparedData.train_age_mean)."""
    columns = [FEATURES[name](frame, age_fill) for name in DEMOGRAPHICS[setting]]
    if not columns:
        return np.zeros((len(frame), 0), np.float32)
    return np.stack(columns, axis=1).astype(np.float32)
