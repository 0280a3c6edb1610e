"""Per-class metrics over (N, K) label and probability arrays: AUC, F1 at validation-chosen thresholds,
the binary report for test evaluation, calibration and bootstrap confidence intervals.

AUC and F1 come from sklearn.metrics. Thresholds are chosen on validation labels only; test evaluation
applies those thresholds (choosing them on test labels, as reference implementations do, inflates F1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_curve, roc_auc_score

from .findings import FINDINGS


def _binary(y_true: np.ndarray) -> np.ndarray:
    return (np.asarray(y_true) > 0.5).astype(np.int64)


def _has_both_labels(column: np.ndarray) -> bool:
    return 0 < column.sum() < len(column)


def per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC per column; NaN where a class has only one label value (AUC undefined)."""
    y_true, probs = _binary(y_true), np.asarray(probs)
    return np.array([roc_auc_score(y_true[:, k], probs[:, k]) if _has_both_labels(y_true[:, k]) else np.nan
                     for k in range(y_true.shape[1])])


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per class, the probability threshold (predict positive when prob >= threshold) maximising F1 on these
    labels -- call it on validation data only. 0.5 for a class without positives."""
    y_true, probs = _binary(y_true), np.asarray(probs)
    thresholds = np.full(y_true.shape[1], 0.5)
    for k in range(y_true.shape[1]):
        if y_true[:, k].sum() == 0:
            continue
        precision, recall, candidates = precision_recall_curve(y_true[:, k], probs[:, k])
        # the last precision/recall pair (recall 0) has no threshold
        precision, recall = precision[:-1], recall[:-1]
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        thresholds[k] = candidates[int(np.argmax(f1))]
    return thresholds


def per_class_f1(y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """F1 per column at the given thresholds; NaN where a class has no positives (F1 says nothing there: it is
    0 for any prediction, so counting it would drag a mean down for a split that merely lacks the class)."""
    y_true, predicted = _binary(y_true), np.asarray(probs) >= np.asarray(thresholds)[None, :]
    return np.array([f1_score(y_true[:, k], predicted[:, k], zero_division=0) if y_true[:, k].any() else np.nan
                     for k in range(y_true.shape[1])])


def epoch_metrics(y_true: np.ndarray, probs: np.ndarray, *, val_loss: float, findings: Sequence[str] = FINDINGS,
                  prefix: str = "val") -> tuple[dict[str, float], np.ndarray]:
    """The per-epoch metrics dict (MLflow names) and the F1 thresholds chosen on these same labels.

    Means are NaN-means over findings: a finding whose AUC is undefined (one label value in this split), or
    whose F1 is (no positives), is left out of the mean instead of making it NaN; `<prefix>_auc_findings` and
    `<prefix>_f1_findings` say how many each mean covers (14 on any real validation split; fewer only on tiny
    ones).
    """
    if len(findings) != np.shape(y_true)[1]:
        raise ValueError(f"{len(findings)} finding names for {np.shape(y_true)[1]} label columns")
    auc = per_class_auc(y_true, probs)
    thresholds = choose_thresholds(y_true, probs)
    f1 = per_class_f1(y_true, probs, thresholds)
    metrics = {
        f"{prefix}_loss": float(val_loss),
        f"{prefix}_auc_mean": _nanmean(auc),
        f"{prefix}_f1_mean": _nanmean(f1),
        f"{prefix}_auc_findings": float(np.isfinite(auc).sum()),
        f"{prefix}_f1_findings": float(np.isfinite(f1).sum()),
    }
    metrics.update({f"{prefix}_auc_{name}": float(value) for name, value in zip(findings, auc)})
    metrics.update({f"{prefix}_f1_{name}": float(value) for name, value in zip(findings, f1)})
    return metrics, thresholds


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def binary_report(y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, *,
                  findings: Sequence[str] = FINDINGS) -> dict[str, dict[str, float]]:
    """Per finding at the given (validation-chosen) thresholds: sensitivity, specificity, PPV, NPV, F1.
    A ratio with an empty denominator is NaN; so is F1 without positives, as in per_class_f1."""
    y_true, probs = _binary(y_true), np.asarray(probs)
    report = {}
    for k, name in enumerate(findings):
        predicted = (probs[:, k] >= thresholds[k]).astype(np.int64)
        tn, fp, fn, tp = confusion_matrix(y_true[:, k], predicted, labels=[0, 1]).ravel()
        report[name] = {
            "threshold": float(thresholds[k]),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else float("nan"),
        }
    return report


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> np.ndarray:
    """Per class: sum over equal-width probability bins [i/bins, (i+1)/bins) (the last one closed) of
    (share of images in the bin) * |observed positive rate - mean predicted probability|."""
    y_true, probs = _binary(y_true).astype(np.float64), np.asarray(probs, dtype=np.float64)
    bin_index = np.clip((probs * bins).astype(np.int64), 0, bins - 1)
    errors = np.zeros(y_true.shape[1])
    for k in range(y_true.shape[1]):
        count = np.bincount(bin_index[:, k], minlength=bins)
        observed = np.bincount(bin_index[:, k], weights=y_true[:, k], minlength=bins)
        predicted = np.bincount(bin_index[:, k], weights=probs[:, k], minlength=bins)
        errors[k] = np.abs(observed - predicted).sum() / len(probs)  # sum_b n_b/N * |mean y - mean p|
    return errors


def bootstrap_auc_ci(y_true: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Percentile (1 - alpha) CI of each class's AUC over images resampled with replacement.

    With `groups` (e.g. patient ids) whole groups are resampled: a patient's follow-up images are not
    independent, and resampling them one by one would make the interval too narrow.
    A resample in which a class has one label value is skipped for that class; a class with no usable
    resample gets NaN bounds.
    """
    y_true, probs = _binary(y_true), np.asarray(probs)
    count, classes = y_true.shape
    rng = np.random.default_rng(seed)
    codes = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.arange(count)
    members = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
    samples = np.full((n_boot, classes), np.nan)
    for b in range(n_boot):
        drawn = rng.integers(0, len(members), len(members))
        index = np.concatenate([members[g] for g in drawn])
        samples[b] = per_class_auc(y_true[index], probs[index])
    low, high = np.full(classes, np.nan), np.full(classes, np.nan)
    for k in range(classes):
        valid = samples[:, k][np.isfinite(samples[:, k])]
        if len(valid):
            low[k], high[k] = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return low, high
