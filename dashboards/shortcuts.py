"""Shortcut baselines of an ablation: how far metadata alone, and chance, get on the sweep's own split.

- metadata-only: age, sex and view (encoded as demographic inputs are: trainable/data/demographics.py) -> each of
  the 14 findings, one scikit-learn LogisticRegression per finding fitted on the training split, scored on the
  validation split. The sweep driver fits it once, before any trial (`write_shortcut_inputs`), and logs its
  validation predictions with the validation metadata on the parent run under `shortcut_baselines/`.
- shuffled-label floor: the baseline arm's validation probabilities (its first seed) scored against the labels
  permuted over images (whole rows, so findings keep their co-occurrence); mean and 95th percentile over
  SHUFFLES permutations: what an AUC reaches by chance on this many images.

"Clearly beats metadata alone": the image model (the baseline arm's AUC, mean over its seeds) minus the metadata
model's AUC has an interval above 0; the interval is the percentile interval of the paired patient bootstrap
(dashboards/effects.py's resampling, the same replicates for both), at level 1 − α/F (Bonferroni over the F
findings with an AUC): with probability ≥ 1 − α no finding is called clearly better by chance. It holds image noise
only (the metadata model has no seed; the baseline's seed spread is averaged, not added): a finding where this
fails is flagged.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from trainable.checkpoint_files import PREDICTIONS_FILE
from trainable.data.demographics import demographic_matrix
from trainable.data.nih import PreparedData, write_atomically
from trainable.findings import FINDINGS

from .effect_report import ReportSection
from .effects import DEFAULT_ALPHA, TrialPredictions, align_trials, resample

ARTIFACT_FOLDER = "shortcut_baselines"
METADATA_PREDICTIONS = f"metadata_{PREDICTIONS_FILE}"
VAL_METADATA_CSV = "val_metadata.csv"          # image, patient_id, age, sex, view of the validation split
METADATA_FEATURES = "age_sex_view"
SHUFFLES = 100
SHORTCUTS_CSV = "shortcut_baselines.csv"


def metadata_model_probs(data: PreparedData) -> np.ndarray:
    """(val images, 14) probabilities of the metadata-only model fitted on the training split; a finding with one
    class only in training gets its training prevalence."""
    fill = data.train_age_mean()
    train, val = data.subset("train"), data.subset("val")
    x_train, x_val = (demographic_matrix(frame, METADATA_FEATURES, age_fill=fill) for frame in (train, val))
    y_train = data.labels("train") > 0.5
    probs = np.empty((len(val), len(FINDINGS)), np.float32)
    for k in range(len(FINDINGS)):
        if y_train[:, k].all() or not y_train[:, k].any():
            probs[:, k] = y_train[:, k].mean()
        else:
            probs[:, k] = LogisticRegression(max_iter=1000).fit(x_train, y_train[:, k]).predict_proba(x_val)[:, 1]
    return probs


def write_shortcut_inputs(data: PreparedData, folder: Path) -> list[Path]:
    """The metadata model's validation predictions (in a trial's val_predictions.npz format) and the validation
    split's metadata, written into `folder` for the sweep driver to log on the parent run."""
    folder.mkdir(parents=True, exist_ok=True)
    val = data.subset("val")
    probs = metadata_model_probs(data)
    npz, csv = folder / METADATA_PREDICTIONS, folder / VAL_METADATA_CSV
    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as file:       # a file object: savez would append .npz to the temporary name
            np.savez_compressed(file, images=val["image"].to_numpy(str), labels=data.labels("val"), probs=probs,
                                findings=np.array(FINDINGS))
    write_atomically(npz, write_npz)
    write_atomically(csv, lambda tmp: val[["image", "patient_id", "age", "sex", "view"]].to_csv(tmp, index=False))
    return [npz, csv]


def shuffled_floor(trial: TrialPredictions, shuffles: int = SHUFFLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per finding: mean and 95th percentile of the AUC of `trial`'s probabilities against permuted labels.

    AUC as the Mann–Whitney rank sum (mid-ranks for ties: equal to sklearn's roc_auc_score), so all permutations
    are one matrix product instead of shuffles x 14 sklearn calls."""
    rng = np.random.default_rng(seed)
    labels, probs = np.asarray(trial.labels) > 0.5, np.asarray(trial.probs)
    ranks = stats.rankdata(probs, axis=0)                                          # (N, K)
    n_pos = labels.sum(axis=0).astype(float)                                       # a permutation keeps the counts
    n_neg = len(labels) - n_pos
    permuted = np.stack([labels[rng.permutation(len(labels))] for _ in range(shuffles)])     # (S, N, K)
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = ((permuted * ranks).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)  # (S, K)
    aucs[:, (n_pos == 0) | (n_neg == 0)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(aucs, axis=0), np.nanpercentile(aucs, 95, axis=0)


def shortcut_table(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str, metadata: TrialPredictions, *,
                   groups: np.ndarray | None = None, n_boot: int = 1000, alpha: float = DEFAULT_ALPHA,
                   seed: int = 0) -> pd.DataFrame:
    """One row per finding: the baseline image model's AUC (mean over seeds), every arm's, the metadata model's,
    the shuffled-label floor, Δ image − metadata with its Bonferroni-adjusted interval, and the flag."""
    reference = arms[baseline][0]
    metadata = align_trials({"metadata": [metadata]}, reference)["metadata"][0]
    resampled = resample({baseline: arms[baseline], "metadata": [metadata]}, baseline, n_boot=n_boot, seed=seed,
                         groups=groups)
    image_point = resampled.point["auc"][baseline].mean(axis=0)[1:]              # column 0 is the mean
    meta_point = resampled.point["auc"]["metadata"][0, 1:]
    difference = (resampled.replicates["auc"][baseline].mean(axis=0) - resampled.replicates["auc"]["metadata"][0])
    difference = difference[:, 1:]                                                # (B, F)
    estimable = np.isfinite(image_point) & np.isfinite(meta_point)
    level = alpha / max(int(estimable.sum()), 1)
    with np.errstate(invalid="ignore"):
        low, high = np.nanpercentile(difference, [100 * level / 2, 100 * (1 - level / 2)], axis=0)
    floor_mean, floor_95 = shuffled_floor(reference, seed=seed)
    table = pd.DataFrame({"finding": list(FINDINGS), "n_positive": resampled.n_positive[1:],
                          "image_auc": image_point, "metadata_auc": meta_point,
                          "shuffled_auc": floor_mean, "shuffled_auc_95": floor_95,
                          "image_minus_metadata": image_point - meta_point, "ci_low": low, "ci_high": high})
    table["clearly_beats_metadata"] = np.where(estimable, low > 0, None)
    table["flag"] = np.where(~estimable, "not estimable", np.where(low > 0, "", np.where(
        meta_point >= image_point, "metadata alone does as well or better", "not clearly better than metadata")))
    for arm, trials in arms.items():
        if arm != baseline:
            aligned = align_trials({arm: trials}, reference)[arm]
            table[f"auc_{arm}"] = [np.mean([_auc(t.labels[:, k], t.probs[:, k]) for t in aligned])
                                   for k in range(len(FINDINGS))]
    return table


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    return roc_auc_score(labels, probs) if 0 < labels.sum() < len(labels) else float("nan")


def read_shortcut_inputs(folder: Path) -> tuple[TrialPredictions | None, pd.DataFrame | None]:
    """What write_shortcut_inputs wrote, read into memory: (metadata model's predictions, validation metadata);
    None for what is not there (a sweep run before they existed)."""
    path, csv = folder / METADATA_PREDICTIONS, folder / VAL_METADATA_CSV
    predictions = None
    if path.is_file():
        with np.load(path, allow_pickle=False) as saved:
            predictions = TrialPredictions(labels=saved["labels"], probs=saved["probs"],
                                           thresholds=np.full(len(FINDINGS), 0.5),
                                           images=saved["images"].astype(str), name="metadata-only model")
    metadata = pd.read_csv(csv, dtype={"image": str, "sex": str, "view": str}) if csv.is_file() else None
    return predictions, metadata


def shortcut_section(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str,
                     metadata: TrialPredictions | None, *, groups=None, n_boot: int = 1000,
                     alpha: float = DEFAULT_ALPHA, seed: int = 0) -> ReportSection:
    heading = "Shortcut baselines: metadata alone and chance"
    if metadata is None:
        return ReportSection(heading, (f"The sweep logged no {ARTIFACT_FOLDER}/ (run before they existed): no "
                                       "shortcut baselines.",), summary=("shortcut baselines: none logged",))
    table = shortcut_table(arms, baseline, metadata, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed)
    estimable = int(table["clearly_beats_metadata"].notna().sum())
    flagged = table[table["flag"] != ""]
    text = (f"image_auc: the baseline arm {baseline!r} (mean over seeds); metadata_auc: logistic regression on age, "
            "sex and view fitted on the training split; shuffled_auc (_95): the baseline's probabilities against "
            f"permuted labels, mean (95th percentile) over {SHUFFLES} permutations. A finding is flagged unless the "
            f"{1 - alpha / max(estimable, 1):.4g} paired patient-bootstrap interval of image − metadata AUC "
            f"(Bonferroni over {estimable} findings: family-wise α = {alpha:g}) lies above 0.")
    summary = [f"shortcut baselines (image = {baseline!r}; flagged: not clearly better than metadata alone):"]
    summary += [f"  {r.finding:<20} image {r.image_auc:.3f}  metadata {r.metadata_auc:.3f}  shuffled "
                f"{r.shuffled_auc:.3f} (95% {r.shuffled_auc_95:.3f})  Δ {r.image_minus_metadata:+.3f} "
                f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]" + (f"  FLAG: {r.flag}" if r.flag else "")
                for r in table.itertuples()]
    paragraphs = (text, "Flagged: " + ", ".join(f"{r.finding} ({r.flag})" for r in flagged.itertuples()) + "."
                  if len(flagged) else "Every finding: the image model clearly beats metadata alone.")
    return ReportSection(heading, paragraphs, {SHORTCUTS_CSV: table}, {}, tuple(summary))
