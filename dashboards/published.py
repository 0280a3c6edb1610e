"""Published per-finding test AUCs on NIH ChestX-ray14, and our test AUCs set beside them.

The numbers are data: `published_auc.csv` (one row per finding, one column per published model) and
`published_auc_sources.csv` (per column: paper, split and seeds, published mean), copied from the project's
reference notes. They come from different splits and numbers of seeds than ours, so every table printed from
them carries those notes: they are not comparable as is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from trainable.errors import DataError
from trainable.findings import FINDINGS

from .tables import MISSING, markdown_table

PUBLISHED_AUC_CSV = Path(__file__).with_name("published_auc.csv")
SOURCES_CSV = Path(__file__).with_name("published_auc_sources.csv")
SOURCE_COLUMNS = ("model", "source", "split_and_seeds", "mean_auc")
MEAN_ROW = "mean"


def load_published(auc_csv: Path = PUBLISHED_AUC_CSV, sources_csv: Path = SOURCES_CSV
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(AUCs indexed by finding in FINDINGS order, one column per model; sources indexed by model)."""
    auc = pd.read_csv(auc_csv).set_index("finding")
    missing = [name for name in FINDINGS if name not in auc.index]
    if missing:
        raise DataError(f"{auc_csv}: finding(s) {', '.join(missing)} missing; expected one row per finding")
    auc = auc.loc[list(FINDINGS)].apply(pd.to_numeric, errors="coerce")
    if auc.isna().any().any():
        column = auc.columns[auc.isna().any()][0]
        raise DataError(f"{auc_csv}: column {column!r} has a non-numeric AUC; expected numbers in [0, 1]")
    sources = pd.read_csv(sources_csv)
    if list(sources.columns) != list(SOURCE_COLUMNS):
        raise DataError(f"{sources_csv}: columns {list(sources.columns)}; expected {', '.join(SOURCE_COLUMNS)}")
    sources = sources.set_index("model")
    unsourced = [model for model in auc.columns if model not in sources.index]
    if unsourced:
        raise DataError(f"{sources_csv}: no source for model column(s) {', '.join(unsourced)} of {auc_csv.name}")
    return auc, sources


def comparison_table(ours: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows: the 14 findings, then the mean over findings. Columns: ours_auc, ours_ci_low, ours_ci_high (from
    `ours`, indexed by finding with columns auc, auc_ci_low, auc_ci_high), then one column per published model."""
    if published is None:
        published, _ = load_published()
    table = pd.DataFrame({"ours_auc": ours["auc"], "ours_ci_low": ours["auc_ci_low"],
                          "ours_ci_high": ours["auc_ci_high"]}).reindex(list(FINDINGS))
    table = table.join(published)
    means = table.mean(numeric_only=True)
    means[["ours_ci_low", "ours_ci_high"]] = np.nan     # a per-finding CI does not average into a CI of the mean
    table.loc[MEAN_ROW] = means
    table.index.name = "finding"
    return table


def caveats(ours: str, sources: pd.DataFrame | None = None) -> list[str]:
    """One line per column of the comparison: where its numbers come from."""
    if sources is None:
        _, sources = load_published()
    return [f"ours: {ours}", *(f"{model}: {row.source}; {row.split_and_seeds}; published mean {row.mean_auc:.3f}"
                               for model, row in sources.iterrows())]


def comparison_markdown(table: pd.DataFrame, notes: list[str]) -> str:
    def cell(value: float) -> str:
        return MISSING if not np.isfinite(value) else f"{value:.3f}"
    ours = [cell(row.ours_auc) + (f" ({cell(row.ours_ci_low)}–{cell(row.ours_ci_high)})"
                                  if np.isfinite(row.ours_ci_low) else "") for row in table.itertuples()]
    shown = pd.DataFrame({"finding": table.index, "ours (95% CI)": ours}).join(
        table[table.columns[3:]].reset_index(drop=True))
    return "\n".join(["**Not comparable as is:** each column comes from its own split, number of seeds and model "
                      "selection:", "", *(f"- {note}" for note in notes), "", markdown_table(shown)])
