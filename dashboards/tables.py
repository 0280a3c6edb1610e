"""Tables as text: Markdown (pandas' `to_markdown`, through tabulate) and console text (`to_string`).

One place decides how a missing value reads (an em dash, never "nan") and how floats are rounded, so the report
files, the console summaries and the HTML pages agree.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import pandas as pd

MISSING = "—"


def _blank_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing and infinite floats as None, which tabulate prints as its `missingval` (NaN it prints as "nan")."""
    missing = frame.isna()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            missing[column] |= ~np.isfinite(frame[column].to_numpy())
    return frame.astype(object).where(~missing, None)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-style Markdown table: a named index becomes the first column, floats get `digits` decimals,
    integers stay integers, missing values read as an em dash."""
    frame = frame.reset_index() if frame.index.name else frame
    return _blank_missing(frame).to_markdown(index=False, floatfmt=f".{digits}f", missingval=MISSING)


def text_table(frame: pd.DataFrame, formatters: Mapping[str, Callable[[object], str]] | None = None,
               indent: str = "  ") -> str:
    """Console columns (pandas' `to_string`, no index), each line indented by `indent`."""
    text = frame.to_string(index=False, formatters=dict(formatters or {}), na_rep=MISSING)
    return "\n".join(indent + line.rstrip() for line in text.splitlines())
