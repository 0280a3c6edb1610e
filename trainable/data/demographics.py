"""Demographic inputs: which metadata columns a `demographics` setting feeds the model, and how they are encoded."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

# NIH ChestX-ray14 ages: mean 46.6, sd about 16.6 years (reference metadata).
AGE_MEAN, AGE_SD = 46.6, 16.6

# Each feature maps the metadata table to one centred float column of unit scale: inputs of the scale of
# the pooled image features get a usable gradient from the first steps (age/100 in [0, 1] barely moved).
FEATURES: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {
    "age": lambda frame: ((frame["age"].to_numpy(np.float32) - AGE_MEAN) / AGE_SD).astype(np.float32),
    "sex": lambda frame: np.where(frame["sex"] == "M", 1.0, -1.0).astype(np.float32),
    "view": lambda frame: np.where(frame["view"] == "PA", 1.0, -1.0).astype(np.float32),
}

DEMOGRAPHICS: dict[str, tuple[str, ...]] = {
    "none": (),
    "age_sex": ("age", "sex"),
    "age_sex_view": ("age", "sex", "view"),
}


def demographic_matrix(frame: pd.DataFrame, setting: str) -> np.ndarray:
    """(N, number of features) float32 matrix for `setting`; (N, 0) for 'none'."""
    columns = [FEATURES[name](frame) for name in DEMOGRAPHICS[setting]]
    if not columns:
        return np.zeros((len(frame), 0), np.float32)
    return np.stack(columns, axis=1).astype(np.float32)
