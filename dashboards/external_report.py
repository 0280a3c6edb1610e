"""The final model on external (out-of-distribution) test sets: CheXpert, MIMIC-CXR-JPG, PadChest layouts.

Each data set (trainable.data.external) is decoded once through the image cache at the members' image size and
predicted by the deployed classifier, then scored on the NIH findings it shares, with the internal test's
statistics: AUC with a patient-clustered bootstrap 95% CI, and sensitivity / specificity / PPV / NPV / F1 at the
thresholds chosen on NIH validation. A finding's rows without a label (e.g. uncertain under `--uncertain ignore`)
are left out of that finding only. Subgroups (sex, age band, view) where the layout has the metadata: the internal
test's table (dashboards/subgroups.py), patient-clustered. Files: external_<name>_metrics.csv,
external_<name>_predictions.npz, external_<name>_subgroups.csv and external_<name>_subgroup_gaps.csv; the report
gets a section per data set with the internal test AUC beside the external one, its subgroups and the label mapping.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from trainable.data.cache import open_cache
from trainable.data.external import ExternalData
from trainable.deployed import DeployedClassifier, demographic_inputs
from trainable.findings import FINDINGS
from trainable.metrics import binary_report, bootstrap_auc_ci, per_class_auc
from trainable.runtime import pick_device

from .subgroups import ATTRIBUTES, UNKNOWN, SubgroupReport, subgroup_report
from .tables import markdown_table

PREDICT_BATCH = 64
METRIC_COLUMNS = ("auc", "auc_ci_low", "auc_ci_high", "internal_auc", "auc_drop", "f1", "sensitivity",
                  "specificity", "ppv", "npv", "threshold", "positives", "images", "patients")


@dataclass
class ExternalResult:
    data: ExternalData
    probs: np.ndarray            # (N, 14), rows as data.frame
    metrics: pd.DataFrame        # METRIC_COLUMNS, one row per shared finding
    subgroups: SubgroupReport    # the internal test's subgroup table (external_subgroups)

    @property
    def unavailable(self) -> list[str]:
        """Subgroup attributes without any known value here."""
        return unavailable_attributes(self.data.frame)


def predict_external(model: DeployedClassifier, data: ExternalData, *, image_size: int, cache_dir: str | Path,
                     age_fill: float, device: torch.device | None = None) -> np.ndarray:
    """(N, 14) probabilities of the deployed model on the data set's images, decoded once through the cache."""
    device = device or pick_device()
    images = open_cache(data.frame["path"].tolist(), image_size=image_size, cache_dir=cache_dir, key=data.cache_key)
    demographics = torch.from_numpy(demographic_inputs(data.frame, age_fill))
    model = model.to(device).eval()
    batches = []
    with torch.no_grad():
        for start in range(0, len(images), PREDICT_BATCH):
            batch = torch.from_numpy(np.array(images[start:start + PREDICT_BATCH]))[:, None].to(device)
            batches.append(model(batch, demographics[start:start + PREDICT_BATCH].to(device)).float().cpu().numpy())
    model.cpu()            # as it is registered in MLflow afterwards: loadable on a machine without a GPU
    return np.concatenate(batches).astype(np.float32)


def external_metrics(data: ExternalData, probs: np.ndarray, thresholds: np.ndarray, internal_auc: pd.Series, *,
                     n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per shared finding, on its labelled rows: AUC with its patient-clustered bootstrap CI (as the internal
    test), the metrics at the validation-chosen threshold, and the internal test AUC beside it."""
    labels, patients = data.labels(), data.frame["patient_id"].to_numpy(str)
    rows = {}
    for finding in data.shared:
        k = FINDINGS.index(finding)
        labelled = np.isfinite(labels[:, k])
        y, p = labels[labelled, k:k + 1], probs[labelled, k:k + 1]
        low, high = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed, groups=patients[labelled])
        auc = per_class_auc(y, p)[0]
        at_threshold = binary_report(y, p, thresholds[k:k + 1], findings=[finding])[finding]
        rows[finding] = {"auc": auc, "auc_ci_low": low[0], "auc_ci_high": high[0],
                         "internal_auc": float(internal_auc[finding]), "auc_drop": float(internal_auc[finding]) - auc,
                         **at_threshold, "positives": int(y.sum()), "images": int(labelled.sum()),
                         "patients": len(np.unique(patients[labelled]))}
    table = pd.DataFrame.from_dict(rows, orient="index")[list(METRIC_COLUMNS)]
    table.index.name = "finding"
    return table


def unavailable_attributes(frame: pd.DataFrame) -> list[str]:
    """Subgroup attributes (dashboards.subgroups.ATTRIBUTES) of which no image has a known value here, e.g. sex and
    age of MIMIC-CXR without MIMIC-IV's patients table."""
    return [name for name, group_of in ATTRIBUTES.items() if group_of(frame).eq(UNKNOWN).all()]


def external_subgroups(data: ExternalData, probs: np.ndarray, thresholds: np.ndarray, *,
                       alpha: float = 0.05) -> SubgroupReport:
    """The internal test's subgroup table (dashboards.subgroups.subgroup_report: per sex, age band and view each
    finding's AUC and the underdiagnosis rate, per attribute the largest gap with its patient-clustered CI) on an
    external set. Its missing labels (NaN) leave an image out of that finding's AUC; underdiagnosis (sick: a
    labelled finding present; "No Finding" decided over all 14 outputs, as on the internal test) counts them as
    absent. Findings the set does not label stay NaN."""
    return subgroup_report(data.frame, data.labels(), probs, thresholds, alpha=alpha)


def evaluate_externals(model: DeployedClassifier, externals: Sequence[ExternalData], *, image_size: int,
                       cache_dir: str | Path, age_fill: float, thresholds: np.ndarray, internal_auc: pd.Series,
                       n_boot: int) -> list[ExternalResult]:
    results = []
    for data in externals:
        probs = predict_external(model, data, image_size=image_size, cache_dir=cache_dir, age_fill=age_fill)
        results.append(ExternalResult(data, probs, external_metrics(data, probs, thresholds, internal_auc,
                                                                    n_boot=n_boot),
                                      external_subgroups(data, probs, thresholds)))
    return results


def _subgroup_lines(result: ExternalResult) -> list[str]:
    data, report = result.data, result.subgroups
    known = {name: sorted(set(group_of(data.frame)) - {UNKNOWN}) for name, group_of in ATTRIBUTES.items()}
    one_group = [f"{name}: {groups[0]} only, no gap" for name, groups in known.items() if len(groups) == 1]
    gaps = report.gaps.reset_index()
    return [f"### Subgroups ({data.layout})", "",
            f"- as on the internal test: per {', '.join(ATTRIBUTES)}, each shared finding's AUC on the group's "
            f"images that label it (`images`: all the group's) and the underdiagnosis rate (of the images with a "
            f"labelled finding, the share predicted to have none at the NIH-validation thresholds); per attribute "
            f"the largest gap with its standard error from patient-clustered variances, Holm over the attribute's "
            f"metrics and a CI at Holm's level for the gap (`ci_level`)",
            f"- attributes unavailable (no known value in this data set's metadata): "
            f"{', '.join(result.unavailable) or 'none'}" + "".join(f"; {line}" for line in one_group),
            "", markdown_table(report.by_group.reset_index()), "", f"Largest gap per attribute ({data.layout}):", "",
            markdown_table(gaps) if len(gaps) else "No attribute has two groups big enough for a gap.", ""]


def markdown_section(result: ExternalResult) -> str:
    """The report's section for one data set: what was read, the mapping, the table beside the internal test."""
    data, metrics = result.data, result.metrics
    frame = data.frame
    lines = [f"## External test set: {data.layout} ({data.folder.name})", "",
             f"- {len(frame)} frontal images of {frame['patient_id'].nunique()} patients, cache key {data.cache_key}; "
             f"the model as evaluated on the internal test (thresholds chosen on NIH validation)",
             f"- shared findings ({len(data.shared)} of {len(FINDINGS)}): {', '.join(data.shared)}; mean AUC "
             f"**{np.nanmean(metrics['auc']):.3f}** here vs {np.nanmean(metrics['internal_auc']):.3f} on the "
             f"internal test over the same findings (95% CIs: bootstrap over patients)",
             *(f"- {note}" for note in data.notes), "", markdown_table(metrics), "",
             *_subgroup_lines(result), "Label mapping:", "",
             *(f"- {line}" for line in data.mapping), ""]
    return "\n".join(lines) + "\n"


def summary_lines(result: ExternalResult) -> list[str]:
    """What train_best prints for one data set."""
    shown = result.metrics[["auc", "auc_ci_low", "auc_ci_high", "internal_auc", "positives", "images"]]
    lines = [f"\nexternal test set {result.data.layout} ({len(result.data.frame)} frontal images; "
             f"thresholds from NIH validation):", shown.to_string(float_format=lambda v: f"{v:.3f}")]
    gaps = result.subgroups.gaps
    kept = [f"{attribute} {metric} {row['high']} - {row['low']} = {row['gap']:.3f}"
            for (attribute, metric), row in gaps[gaps["gap_holm"]].iterrows()]
    return [*lines, f"subgroup gaps at a family-wise 5%: {'; '.join(kept) or 'none'}; attributes unavailable: "
                    f"{', '.join(result.unavailable) or 'none'} (external_{result.data.layout}_subgroups.csv)"]
