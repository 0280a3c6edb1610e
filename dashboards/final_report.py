"""The final model's test evaluation and its files: the one place that reads test labels.

Everything it is given was decided before (members, selected epochs, thresholds: sweeps/final/, on validation
only). It writes into the output folder, each file atomically: test_metrics.csv, members.csv,
comparison.csv + comparison.md, roc_curves.png, gradcam/<Finding>.png, localization.csv (with NIH's boxes),
google2019_auc.csv (with Google's 2019 expert labels), subgroups.csv + subgroup_gaps.csv (dashboards/subgroups.py),
external_<name>_metrics.csv + _predictions.npz + _subgroups.csv + _subgroup_gaps.csv (--external:
dashboards/external_report.py), val_/test_predictions.npz and report.md (last).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import RocCurveDisplay

from trainable.config import TrialConfig
from trainable.data.nih import PreparedData, write_atomically, write_text_atomically
from trainable.deployed import DeployedClassifier, demographic_inputs
from trainable.findings import FINDINGS
from trainable.metrics import binary_report, bootstrap_auc_ci, expected_calibration_error, per_class_auc
from trainable.runtime import default_cache_dir
from trainable.train import SplitArrays

from .annotations import GOOGLE_FINDINGS, read_bboxes, read_google_labels
from .external_report import evaluate_externals, markdown_section, summary_lines
from .gradcam import localization_scores, write_overlays
from .published import caveats, comparison_markdown, comparison_table, load_published
from .subgroups import SubgroupReport, subgroup_report
from .subgroups import markdown_section as subgroup_section
from .subgroups import summary_lines as subgroup_lines
from .tables import markdown_table

METRIC_COLUMNS = ("auc", "auc_ci_low", "auc_ci_high", "f1", "sensitivity", "specificity", "ppv", "npv", "ece",
                  "threshold")
SYNTHETIC_WARNING = ("**SYNTHETIC DATA**: this data set was generated (trainable.data.synthetic); it is not NIH "
                     "ChestX-ray14 and these numbers say nothing about chest X-rays.")


# --- tables -----------------------------------------------------------------------------------------------------

def evaluate_on_test(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, *, n_boot: int = 1000,
                     seed: int = 0, patients: np.ndarray | None = None) -> pd.DataFrame:
    """Per finding: AUC with its bootstrap 95% CI (patients resampled when given), and F1, sensitivity,
    specificity, PPV, NPV at the given (validation-chosen) thresholds, ECE, the threshold, and the counts."""
    low, high = bootstrap_auc_ci(labels, probs, n_boot=n_boot, seed=seed, groups=patients)
    at_threshold = pd.DataFrame(binary_report(labels, probs, thresholds)).T
    table = pd.DataFrame({"auc": per_class_auc(labels, probs), "auc_ci_low": low, "auc_ci_high": high,
                          "ece": expected_calibration_error(labels, probs)}, index=list(FINDINGS))
    table = table.join(at_threshold)[list(METRIC_COLUMNS)]
    table["positives"] = (np.asarray(labels) > 0.5).sum(axis=0)
    table["images"] = len(labels)
    table.index.name = "finding"
    return table


def member_metrics(names: Sequence[str], labels: Sequence[str], seeds: Sequence[int], epochs: Sequence[int],
                   val_values: Sequence[float], test_labels: np.ndarray, test_probs: Sequence[np.ndarray]
                   ) -> pd.DataFrame:
    """One row per member (config x seed): selected epoch, its validation mean AUC, test AUC mean and per finding."""
    rows = []
    for name, label, seed, epoch, value, probs in zip(names, labels, seeds, epochs, val_values, test_probs):
        auc = per_class_auc(test_labels, probs)
        rows.append({"member": name, "config": label, "seed": seed, "selected_epoch": epoch,
                     "val_auc_mean": value, "test_auc_mean": float(np.nanmean(auc)),
                     **{f"test_auc_{f}": a for f, a in zip(FINDINGS, auc)}})
    return pd.DataFrame(rows)


def google_auc(google: pd.DataFrame, names: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000) -> pd.DataFrame:
    """AUC on Google's expert labels, on the images of our test split only (the others may be training images)."""
    in_test = google[google["image"].isin(set(names))]
    row_of = pd.Series(np.arange(len(names)), index=names)
    rows = []
    for finding, (described, score) in GOOGLE_FINDINGS.items():
        labelled = in_test[in_test[finding].notna()]
        y = labelled[finding].to_numpy()[:, None]
        p = score(probs[row_of[labelled["image"]].to_numpy()])[:, None]
        auc = per_class_auc(y, p)[0] if len(y) else math.nan
        patients = labelled["image"].str.split("_").str[0].to_numpy()  # NIH names: <patient>_<follow-up>.png
        low, high = (bootstrap_auc_ci(y, p, n_boot=n_boot, groups=patients) if len(y)
                     else ([math.nan], [math.nan]))
        rows.append({"finding": finding, "our_score": described, "images": len(y),
                     "positives": int(y.sum()), "auc": auc, "auc_ci_low": low[0], "auc_ci_high": high[0],
                     "sets": ",".join(sorted(labelled["set"].unique()))})
    return pd.DataFrame(rows)


ROC_CURVE_LABEL, CHANCE_LABEL = "ROC curve (test)", "chance level (AUC 0.5)"


def roc_figure(labels: np.ndarray, probs: np.ndarray, title: str) -> Figure:
    """One panel per finding, its AUC in the panel title; plain axis labels on the outer panels and one legend for
    the figure (sklearn's display labels every axis "(Positive label: 1)" and gives each panel its own legend)."""
    figure = Figure(figsize=(16, 16), layout="constrained")
    axes = figure.subplots(4, 4).ravel()
    for k, (axis, finding) in enumerate(zip(axes, FINDINGS)):
        y = np.asarray(labels[:, k]) > 0.5
        if 0 < y.sum() < len(y):
            display = RocCurveDisplay.from_predictions(y, probs[:, k], ax=axis, plot_chance_level=True,
                                                       curve_kwargs={"label": ROC_CURVE_LABEL},
                                                       chance_level_kw={"label": CHANCE_LABEL})
            axis.get_legend().remove()
            axis.set_title(f"{finding} (AUC {display.roc_auc:.3f})")
        else:
            axis.set_title(f"{finding} (no AUC: one class only)")
        # x labelled on the lowest panel of each column, y on the first column
        axis.set_xlabel("false positive rate" if k + 4 >= len(FINDINGS) else "")
        axis.set_ylabel("true positive rate" if k % 4 == 0 else "")
    for axis in axes[len(FINDINGS):]:
        axis.set_axis_off()
    handles = next((axis.get_legend_handles_labels()[0] for axis in axes if axis.get_lines()), [])
    if handles:
        figure.legend(handles=handles, loc="lower right", bbox_to_anchor=(0.95, 0.1), fontsize="large")
    figure.suptitle(title)
    return figure


# --- files ------------------------------------------------------------------------------------------------------

@dataclass
class ReportContext:
    """What the report says about how the model was made, and where the optional annotations are."""
    source: str                       # e.g. "config file best_config.json" or "sweep 'srch': top 2 configs"
    member_names: list[str]
    member_labels: list[str]
    member_seeds: list[int]
    selected_epochs: list[int]
    selected_values: list[float]
    cache_dir: str | None = None
    n_boot: int = 1000
    gradcam_per_finding: int = 2
    bbox_csv: Path | None = None
    google_files: list[Path] = field(default_factory=list)
    externals: list = field(default_factory=list)     # trainable.data.external.ExternalData: --external


@dataclass
class FinalReport:
    test_metrics: pd.DataFrame
    members: pd.DataFrame
    comparison: pd.DataFrame
    comparison_notes: list[str]
    localization: pd.DataFrame | None
    google: pd.DataFrame | None
    files: list[Path]
    markdown: str
    external: list = field(default_factory=list)      # dashboards.external_report.ExternalResult per data set
    subgroups: SubgroupReport | None = None


def _write_csv(path: Path, frame: pd.DataFrame, *, index: bool = False) -> Path:
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=index, float_format="%.6g"))
    return path


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    write_atomically(path, save)
    return path


def write_report(out: Path, data: PreparedData, model: DeployedClassifier, context: ReportContext, *,
                 image_config: TrialConfig, val_images: np.ndarray, val_labels: np.ndarray, val_probs: np.ndarray,
                 thresholds: np.ndarray, test_images: np.ndarray, test_probs_by_member: Sequence[np.ndarray]
                 ) -> FinalReport:
    """Evaluate on the test split (its labels are read here, once) and write every report file into `out`.
    Grad-CAM inputs are the test images as cached at `image_config.image_size` (each member resizes them)."""
    test_frame = data.subset("test")
    if not np.array_equal(test_frame["image"].to_numpy(str), test_images):
        raise ValueError("test predictions are not in the test split's image order")
    labels = data.labels("test")
    probs = np.mean(test_probs_by_member, axis=0).astype(np.float32)
    findings = np.array(FINDINGS)
    files = [_write_npz(out / "val_predictions.npz", images=val_images, labels=val_labels, probs=val_probs,
                        findings=findings),
             _write_npz(out / "test_predictions.npz", images=test_images, labels=labels, probs=probs,
                        probs_by_member=np.stack(test_probs_by_member), members=np.array(context.member_names),
                        findings=findings)]

    metrics = evaluate_on_test(labels, probs, thresholds, n_boot=context.n_boot,
                               patients=test_frame["patient_id"].to_numpy())
    members = member_metrics(context.member_names, context.member_labels, context.member_seeds,
                             context.selected_epochs, context.selected_values, labels, test_probs_by_member)
    files += [_write_csv(out / "test_metrics.csv", metrics, index=True), _write_csv(out / "members.csv", members)]
    comparison, notes, comparison_files = _write_comparison(out, metrics, data, context)
    files += comparison_files
    files.append(_write_roc(out / "roc_curves.png", labels, probs, data.synthetic))

    boxes = read_bboxes(context.bbox_csv) if context.bbox_csv else None
    localization, gradcam_files = _write_gradcam(out, model, data, context, image_config, labels, probs, boxes)
    files += gradcam_files
    google = None
    if context.google_files:
        google = google_auc(read_google_labels(context.google_files), test_images, probs, n_boot=context.n_boot)
        files.append(_write_csv(out / "google2019_auc.csv", google))

    external = evaluate_externals(model, context.externals, image_size=image_config.image_size,
                                  cache_dir=context.cache_dir or default_cache_dir(), age_fill=data.train_age_mean(),
                                  thresholds=thresholds, internal_auc=metrics["auc"], n_boot=context.n_boot)
    for result in external:
        name = result.data.layout
        files += [_write_csv(out / f"external_{name}_metrics.csv", result.metrics, index=True),
                  _write_npz(out / f"external_{name}_predictions.npz", images=result.data.frame["image"].to_numpy(str),
                             labels=result.data.labels(), probs=result.probs, findings=findings),
                  _write_csv(out / f"external_{name}_subgroups.csv", result.subgroups.by_group, index=True),
                  _write_csv(out / f"external_{name}_subgroup_gaps.csv", result.subgroups.gaps, index=True)]
    subgroups = subgroup_report(test_frame, labels, probs, thresholds)
    files += [_write_csv(out / "subgroups.csv", subgroups.by_group, index=True),
              _write_csv(out / "subgroup_gaps.csv", subgroups.gaps, index=True)]
    report = FinalReport(test_metrics=metrics, members=members, comparison=comparison, comparison_notes=notes,
                         localization=localization, google=google, files=files, markdown="", external=external,
                         subgroups=subgroups)
    report.markdown = _markdown(data, context, report, thresholds, boxes is not None)
    write_text_atomically(out / "report.md", report.markdown)     # last: its presence means the report is complete
    report.files.append(out / "report.md")
    return report


def _write_comparison(out: Path, metrics: pd.DataFrame, data: PreparedData, context: ReportContext
                      ) -> tuple[pd.DataFrame, list[str], list[Path]]:
    published, sources = load_published()
    comparison = comparison_table(metrics, published)
    notes = caveats(_our_description(data, context), sources)
    write_text_atomically(out / "comparison.md", comparison_markdown(comparison, notes) + "\n")
    return comparison, notes, [_write_csv(out / "comparison.csv", comparison, index=True), out / "comparison.md"]


def _write_roc(path: Path, labels: np.ndarray, probs: np.ndarray, synthetic: bool) -> Path:
    figure = roc_figure(labels, probs, f"Test ROC curves{' — SYNTHETIC data' if synthetic else ''} "
                                       f"({len(labels)} images)")
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))
    return path


def _write_gradcam(out: Path, model: DeployedClassifier, data: PreparedData, context: ReportContext,
                   image_config: TrialConfig, labels: np.ndarray, probs: np.ndarray, boxes: pd.DataFrame | None
                   ) -> tuple[pd.DataFrame | None, list[Path]]:
    """Overlays for sample test images, and the localization score when there are boxes."""
    test_frame = data.subset("test")
    names = test_frame["image"].to_numpy(str)
    images = SplitArrays.load(data, "test", image_config,
                              Path(context.cache_dir) if context.cache_dir else default_cache_dir()).images
    demographics = demographic_inputs(test_frame, data.train_age_mean())
    files = write_overlays(model, images, names, demographics, labels, probs, out / "gradcam",
                           per_finding=context.gradcam_per_finding, boxes=boxes, synthetic=data.synthetic)
    if boxes is None:
        return None, files
    localization = localization_scores(model, images, names, demographics, boxes)
    return localization, [*files, _write_csv(out / "localization.csv", localization)]


def _our_description(data: PreparedData, context: ReportContext) -> str:
    sizes = data.split_sizes()["test"]
    kind = "SYNTHETIC data (not NIH)" if data.synthetic else "NIH ChestX-ray14"
    return (f"{kind}, data {data.fingerprint}, test split of {sizes['images']} images / {sizes['patients']} "
            f"patients; {len(context.member_names)} model(s) averaged ({', '.join(context.member_names)}); "
            f"epochs selected and thresholds chosen on validation only")


def _markdown(data: PreparedData, context: ReportContext, report: FinalReport, thresholds: np.ndarray,
              have_boxes: bool) -> str:
    sizes = data.split_sizes()
    mean_auc = float(np.nanmean(report.test_metrics["auc"]))
    lines = ["# Final model: test evaluation", ""]
    if data.synthetic:
        lines += [SYNTHETIC_WARNING, ""]
    lines += [f"- source: {context.source}",
              f"- data fingerprint {data.fingerprint}; split sizes (images / patients): " +
              ", ".join(f"{name} {s['images']} / {s['patients']}" for name, s in sizes.items()),
              "- members (averaged): " + ", ".join(f"{n} (epoch {e})" for n, e in
                                                    zip(context.member_names, context.selected_epochs)),
              "- model selection: each member's epoch with the best validation mean AUC; F1 thresholds chosen on the "
              "validation predictions of the averaged members; the test split was predicted once, at the end",
              f"- test mean AUC over the 14 findings: **{mean_auc:.3f}** (95% CIs per finding: bootstrap over test "
              f"images, {context.n_boot} resamples)", "",
              "## Test metrics at the validation-chosen thresholds", "",
              markdown_table(report.test_metrics), "",
              *(markdown_section(result) for result in report.external),
              subgroup_section(report.subgroups),
              "## Members", "", markdown_table(report.members[["member", "config", "seed", "selected_epoch",
                                                                "val_auc_mean", "test_auc_mean"]]), "",
              "## Published per-finding AUCs", "", comparison_markdown(report.comparison, report.comparison_notes), ""]
    if report.localization is not None:
        lines += ["## Grad-CAM localization (NIH boxes)", "",
                  "Score = share of a finding's boxes (on test images) that contain the Grad-CAM peak for that "
                  "finding.", "", markdown_table(report.localization), ""]
    else:
        lines += ["No BBox_List_2017.csv was found: no localization score.", ""]
    if report.google is not None:
        lines += ["## AUC on Google's 2019 expert labels (test-split images only)", "",
                  markdown_table(report.google), ""]
    lines += ["## Thresholds (chosen on validation)", "", "```json",
              json.dumps(dict(zip(FINDINGS, map(float, thresholds))), indent=2), "```", "",
              "Figures: `roc_curves.png`, `gradcam/<Finding>.png`" + (" (boxes in green)" if have_boxes else "")]
    return "\n".join(lines) + "\n"


def summary_text(report: FinalReport, synthetic: bool) -> str:
    """What train_best prints at the end."""
    buffer = io.StringIO()
    if synthetic:
        print("SYNTHETIC DATA: generated, not NIH ChestX-ray14; these numbers say nothing about chest X-rays.",
              file=buffer)
    metrics = report.test_metrics
    shown = metrics[["auc", "auc_ci_low", "auc_ci_high", "f1", "sensitivity", "specificity", "ppv", "npv", "ece",
                     "threshold"]]
    print("test metrics (thresholds chosen on validation):", file=buffer)
    print(shown.to_string(float_format=lambda v: f"{v:.3f}"), file=buffer)
    print(f"mean AUC {np.nanmean(metrics['auc']):.3f}, mean F1 {np.nanmean(metrics['f1']):.3f}", file=buffer)
    print("\ncomparison with published per-finding AUCs — NOT comparable as is:", file=buffer)
    for note in report.comparison_notes:
        print(f"  {note}", file=buffer)
    print(report.comparison.to_string(float_format=lambda v: f"{v:.3f}", na_rep="—"), file=buffer)
    if report.localization is not None:
        print("\nGrad-CAM localization (share of boxes containing the CAM peak):", file=buffer)
        print(report.localization.to_string(index=False, float_format=lambda v: f"{v:.2f}"), file=buffer)
    if report.google is not None:
        print("\nAUC on Google 2019 expert labels (test-split images):", file=buffer)
        print(report.google.to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=buffer)
    for line in [*subgroup_lines(report.subgroups), *(line for r in report.external for line in summary_lines(r))]:
        print(line, file=buffer)
    return buffer.getvalue().rstrip()
