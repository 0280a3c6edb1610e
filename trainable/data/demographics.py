"""Demographic inputs: which metadata columns a `demographics` setting feeds the model, and how they are encoded."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

# Each feature maps the metadata table to one float column in [0, 1]-ish range.
FEATURES: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {
    "age": lambda frame: frame["age"].to_numpy(np.float32) / 100.0,
    "sex": lambda frame: (frame["sex"] == "M").to_numpy(np.float32),
    "view": lambda frame: (frame["view"] == "PA").to_numpy(np.float32),
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
