"""The evidence behind a config chosen from a sweep by validation AUC: what final training says when it picks one.

An ablation arm has evidence once the ablation report ran on its sweep: the verdict on its mean AUC there (the
report's effects.csv, logged on the sweep's parent run). A search's best is one seed on one split, picked as the
maximum of many: not confirmed until an ablation re-runs it.
"""
from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

from search_spaces import BASELINE_ARM

from .commands import ABLATION_REPORT_SCRIPT, python_words, shell_join
from .effects import MEAN
from .sweep_reader import SweepResults

EVIDENCE_TAG = "selection_evidence"     # on the final run: the evidence behind each of its configs
EFFECTS_CSV = "effects.csv"       # the ablation report's table, beside its page in `<kind>_report/`
SEARCH_BEST = "search best, not confirmed (one seed, one split; re-run it as an ablation)"
CONFIG_FILE = "config file, not confirmed by an ablation report"


def effect_table(client, sweep: SweepResults) -> pd.DataFrame | None:
    """The ablation report's effects of the sweep, or None when no report was logged on it."""
    page = sweep.parent_tags.get("ablation_report")
    if not page:
        return None
    with tempfile.TemporaryDirectory(prefix="evidence-") as scratch:
        try:
            path = client.download_artifacts(sweep.parent_run_id, posixpath.join(posixpath.dirname(page), EFFECTS_CSV),
                                             scratch)
        except (MlflowException, OSError):      # no such artifact
            return None
        return pd.read_csv(Path(path))


def config_evidence(client, sweep: SweepResults, labels: list[str]) -> list[str]:
    """Per chosen config (its label: the arm of an ablation), the evidence behind it in one phrase."""
    if sweep.kind == "search":
        return [SEARCH_BEST for _ in labels]
    effects = effect_table(client, sweep)
    return [_arm_evidence(effects, sweep, label) for label in labels]


def _arm_evidence(effects: pd.DataFrame | None, sweep: SweepResults, label: str) -> str:
    if label == BASELINE_ARM:
        return "the baseline arm (the reference every arm was compared with)"
    if effects is None:
        report = shell_join([*python_words(ABLATION_REPORT_SCRIPT), "--sweep", sweep.name])
        return f"arm {label}: no ablation report on sweep {sweep.name!r} yet, not confirmed (it is made by: {report})"
    rows = effects[(effects["arm"] == label) & (effects["finding"] == MEAN) & (effects["metric"] == "auc")]
    if rows.empty:
        return f"arm {label}: not in the ablation report, not confirmed"
    row = rows.iloc[0]
    return (f"arm {label}: {row['verdict']} on mean AUC in the ablation report (Δ {row['delta']:+.4f} "
            f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}])")
