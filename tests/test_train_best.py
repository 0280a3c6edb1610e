"""Final training end to end on generated data (timm test_resnet at 64 px, 2 epochs, 2 seeds trained at once as Ray
Tune trials on a local Ray): the registered MLflow model, the report files, thresholds and model selection that
never see test labels, a run killed mid-epoch that resumes to the same report, the published comparison, the
localization score (boxes drawn where the generator draws each finding) and AUC on Google-style expert labels."""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from ray.tune.utils.serialization import TuneFunctionDecoder
from sklearn.metrics import f1_score, roc_auc_score

from dashboards.annotations import read_bboxes, read_google_labels
from dashboards.gradcam import localization_scores
from dashboards.mlflow_store import PARENT_RUN_TAG
from dashboards.published import load_published
from dashboards.subgroups import MIN_CLASS_IMAGES
from sweeps.final.cli import main
from sweeps.final.fit import fit_final
from sweeps.final.members import member_specs
from sweeps.tracking import SweepRun
from trainable.config import TrialConfig
from trainable.data.external_synthetic import generate_external
from trainable.data.nih import DataSpec, prepare_dataset
from trainable.deployed import DeployedClassifier, demographic_inputs
from trainable.findings import FINDINGS
from trainable.metric_names import external_metric
from trainable.train import SplitArrays

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / ".." / "shared" / "reference"
CONFIG = {"backbone": "test_resnet", "pretrained": "none", "image_size": 64, "batch_size": 16, "epochs": 5}
EPOCHS, SEEDS = 2, 2
RUN_TIMEOUT_S = 900
MODEL_NAME = "test-cxr"
EXTERNAL_LAYOUTS = ("chexpert", "mimic", "padchest")
# Where trainable.data.synthetic draws each boxed finding: (top, bottom, left, right) as fractions of the image.
SIGNATURE_BOXES = {
    "Atelectasis": (0.57, 0.66, 0.16, 0.44), "Cardiomegaly": (0.48, 0.76, 0.35, 0.73),
    "Effusion": (0.66, 0.76, 0.17, 0.83), "Infiltrate": (0.32, 0.50, 0.57, 0.75), "Mass": (0.19, 0.35, 0.58, 0.74),
    "Nodule": (0.18, 0.36, 0.21, 0.39), "Pneumonia": (0.40, 0.60, 0.22, 0.42), "Pneumothorax": (0.15, 0.45, 0.76, 0.84),
}


def _entries(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "Data_Entry_2017_v2020.csv", dtype=str, keep_default_na=False)


def _write_bboxes(folder: Path, entries: pd.DataFrame, images: list[str]) -> None:
    """NIH's header and spelling (Infiltrate), one box per boxed finding present on each listed image."""
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for image, labels in entries.set_index("Image Index").loc[images, "Finding Labels"].items():
        for name, (top, bottom, left, right) in SIGNATURE_BOXES.items():
            if {"Infiltrate": "Infiltration"}.get(name, name) in labels.split("|"):
                x, y, w, h = (1024 * v for v in (left, top, right - left, bottom - top))
                lines.append(f"{image},{name},{x},{y},{w},{h}")
    (folder / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")


def _write_google_labels(folder: Path, entries: pd.DataFrame, images: list[str]) -> None:
    rows = entries.set_index("Image Index").loc[images, "Finding Labels"].str.split("|")
    yes = lambda present: np.where(present, "YES", "NO")  # noqa: E731
    frame = pd.DataFrame({"Image Index": rows.index, "Fracture": "NO",
                          "Pneumothorax": yes(rows.map(lambda r: "Pneumothorax" in r)),
                          "Airspace opacity": "NO",
                          "Nodule or mass": yes(rows.map(lambda r: "Nodule" in r or "Mass" in r)), "Set Id": "test"})
    frame.loc[frame.index[0], "Pneumothorax"] = ""          # not read by the radiologists: left out
    frame.to_csv(folder / "google2019_nih-chest-xray-labels.csv", index=False)


@pytest.fixture(scope="module")
def data_dir(synthetic_dir, tmp_path_factory) -> Path:
    """The shared synthetic data set plus NIH-style boxes and Google-style labels (test images and two train ones)."""
    folder = tmp_path_factory.mktemp("final") / "nih"
    shutil.copytree(synthetic_dir, folder)
    entries = _entries(folder)
    test_images = (folder / "test_list.txt").read_text().split()
    train_images = (folder / "train_val_list.txt").read_text().split()[:2]
    _write_bboxes(folder, entries, test_images + train_images)
    _write_google_labels(folder, entries, test_images + train_images)
    return folder


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    print(out.getvalue()[-4000:], err.getvalue()[-4000:], sep="\n")   # shown by pytest when a test fails
    return code, out.getvalue(), err.getvalue()


def final_args(config: Path, data_dir: Path, out: Path, uri: str, cache: Path) -> list[str]:
    """Both members at once (a CPU each), as a cluster would run them."""
    return ["--config", str(config), "--data", str(data_dir), "--epochs", str(EPOCHS), "--seeds", str(SEEDS),
            "--max-concurrent", str(SEEDS), "--cpus-per-trial", "1", "--out", str(out), "--mlflow-uri", uri,
            "--registered-model", MODEL_NAME, "--bootstrap", "100", "--gradcam-samples", "1", "--cache-dir", str(cache)]


@pytest.fixture(scope="module")
def final(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("final-run")
    config = root / "best_config.json"
    config.write_text(json.dumps(CONFIG))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    externals = {layout: generate_external(root / layout, layout, patients=40, image_size=64, seed=5)
                 for layout in EXTERNAL_LAYOUTS}
    (externals["mimic"] / "patients.csv.gz").unlink()      # MIMIC-CXR-JPG without MIMIC-IV: no sex or age
    external_args = [f"--external={layout}={folder}" for layout, folder in externals.items()]
    started = time.perf_counter()
    code, stdout, _ = run_cli(*final_args(config, data_dir, root / "out", uri, root / "cache"), *external_args)
    print(f"train_best took {time.perf_counter() - started:.1f} s")
    assert code == 0
    return {"out": root / "out", "uri": uri, "stdout": stdout, "cache": root / "cache", "config": config,
            "external_args": external_args, "externals": externals}


# --- the model in the registry ----------------------------------------------------------------------------------

def test_registers_a_model_that_loads_back_and_predicts_as_evaluated(final, data_dir, tmp_path):
    client = MlflowClient(final["uri"])
    assert client.get_registered_model(MODEL_NAME).name == MODEL_NAME
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["kind"] == "final" and run.data.tags["data"] == "SYNTHETIC"
    assert run.data.tags["run_type"] == "final" and run.info.run_name == final["out"].name    # its own run type
    assert run.info.status == "FINISHED" and "SYNTHETIC" in versions[0].description
    logged = client.get_logged_model(versions[0].source.rsplit("/", 1)[-1])     # filed under the final run's experiment
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    # the run names the model among its outputs, and the model carries the run's test metrics
    assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]
    assert {m.key: m.value for m in logged.metrics}["test_auc_mean"] == run.data.metrics["test_auc_mean"]
    assert {"test_metrics.csv", "thresholds.json", "config.json", "report.md", "roc_curves.png"} <= \
        {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["test_auc_mean"] == pytest.approx(
        pd.read_csv(final["out"] / "test_metrics.csv")["auc"].mean())

    mlflow.set_tracking_uri(final["uri"])
    try:
        model = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}/{versions[0].version}")
        info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/{versions[0].version}")
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(model, DeployedClassifier)
    assert info.metadata["thresholds"] == json.loads((final["out"] / "thresholds.json").read_text())
    # the registered model, fed the test images as stored, reproduces the evaluated test predictions
    data = prepare_dataset(DataSpec(str(data_dir)), tmp_path)
    images = SplitArrays.load(data, "test", TrialConfig.from_dict(CONFIG), final["cache"]).images
    with torch.no_grad():
        probs = model(torch.from_numpy(np.array(images))[:, None],
                      torch.from_numpy(demographic_inputs(data.subset("test"), data.train_age_mean()))).numpy()
    saved = np.load(final["out"] / "test_predictions.npz")
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-5)


# --- the report -------------------------------------------------------------------------------------------------

def test_writes_the_report_files_and_their_auc_is_sklearns(final):
    out = final["out"]
    for name in ("test_metrics.csv", "members.csv", "members.json", "comparison.csv", "comparison.md",
                 "roc_curves.png", "localization.csv", "google2019_auc.csv", "report.md", "config.json",
                 "thresholds.json", "val_predictions.npz", "test_predictions.npz", "split.csv"):
        assert (out / name).is_file(), name
    assert {p.stem for p in (out / "gradcam").glob("*.png")} <= set(FINDINGS) and list((out / "gradcam").glob("*.png"))
    metrics = pd.read_csv(out / "test_metrics.csv").set_index("finding")
    assert list(metrics.index) == list(FINDINGS)
    saved = np.load(out / "test_predictions.npz")
    thresholds = json.loads((out / "thresholds.json").read_text())
    for k, finding in enumerate(FINDINGS):
        y, p = saved["labels"][:, k], saved["probs"][:, k]
        if 0 < y.sum() < len(y):
            assert metrics.loc[finding, "auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
            assert metrics.loc[finding, "auc_ci_low"] <= metrics.loc[finding, "auc_ci_high"]
        assert metrics.loc[finding, "threshold"] == pytest.approx(thresholds[finding], abs=1e-6)
        if y.any():
            assert metrics.loc[finding, "f1"] == pytest.approx(f1_score(y, p >= thresholds[finding]), abs=1e-6)
        else:                                   # no positives: F1 is undefined, NaN (left out of the mean)
            assert np.isnan(metrics.loc[finding, "f1"])
    report = (out / "report.md").read_text()
    assert "SYNTHETIC DATA" in report and "thresholds chosen on validation" in report.lower()
    assert "SYNTHETIC" in final["stdout"] and "registered model 'test-cxr' version 1" in final["stdout"]


def test_external_test_sets_report_the_shared_findings_with_cis_above_chance(final):
    """The generated CheXpert/MIMIC/PadChest folders carry the NIH generator's signatures: the model trained on
    generated NIH data scores above chance there; each AUC is sklearn's on the labelled rows."""
    out, report = final["out"], (final["out"] / "report.md").read_text()
    internal = pd.read_csv(out / "test_metrics.csv").set_index("finding")["auc"]
    for layout, shared in (("chexpert", 7), ("mimic", 7), ("padchest", 14)):
        metrics = pd.read_csv(out / f"external_{layout}_metrics.csv").set_index("finding")
        saved = np.load(out / f"external_{layout}_predictions.npz")
        assert len(metrics) == shared and f"## External test set: {layout}" in report
        for finding, row in metrics.iterrows():
            k = FINDINGS.index(finding)
            labelled = np.isfinite(saved["labels"][:, k])
            y, p = saved["labels"][labelled, k], saved["probs"][labelled, k]
            assert row["images"] == labelled.sum() and row["positives"] == y.sum()
            if 0 < y.sum() < len(y):
                assert row["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
                assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
            assert row["internal_auc"] == pytest.approx(internal[finding], nan_ok=True)
        print(layout, metrics[["auc", "auc_ci_low", "auc_ci_high", "internal_auc"]].round(3).to_string())
        assert metrics["auc"].mean() > 0.6, layout
        assert f"external test set {layout}" in final["stdout"]
    assert "CheXpert `Pleural Effusion` -> Effusion" in report and "CheXpert `Lung Lesion` is not mapped" in report
    assert "left out of that finding's metrics (--uncertain ignore)" in report


def test_external_metrics_in_mlflow_are_sklearns_on_the_saved_predictions(final):
    """The final run logs each external set's metrics as the internal test's, under ext_<set>_...: each equals
    sklearn on the finding's labelled rows of the predictions the report saved."""
    client = MlflowClient(final["uri"])
    version = client.search_model_versions(f"name = '{MODEL_NAME}'")[0]
    logged = client.get_run(version.run_id).data.metrics
    on_model = {m.key: m.value for m in client.get_logged_model(version.source.rsplit("/", 1)[-1]).metrics}
    thresholds = json.loads((final["out"] / "thresholds.json").read_text())
    for layout in EXTERNAL_LAYOUTS:
        saved = np.load(final["out"] / f"external_{layout}_predictions.npz")
        aucs = []
        for k, finding in enumerate(FINDINGS):
            labelled = np.isfinite(saved["labels"][:, k])
            y, p = saved["labels"][labelled, k], saved["probs"][labelled, k]
            name = external_metric(layout, "auc", finding)
            if not 0 < y.sum() < len(y):                 # not shared (CheXpert has no Mass) or one class only
                assert name not in logged
                continue
            aucs.append(roc_auc_score(y, p))
            assert logged[name] == pytest.approx(aucs[-1], abs=1e-9)
            assert logged[external_metric(layout, "auc_ci_low", finding)] <= logged[name] <= \
                logged[external_metric(layout, "auc_ci_high", finding)]
            assert logged[external_metric(layout, "f1", finding)] == pytest.approx(
                f1_score(y, p >= thresholds[finding]), abs=1e-9)
            assert logged[external_metric(layout, "images", finding)] == labelled.sum()
            assert logged[external_metric(layout, "positives", finding)] == y.sum()
        assert len(aucs) >= 5 and logged[external_metric(layout, "auc_mean")] == pytest.approx(np.mean(aucs))
        assert logged[external_metric(layout, "images")] == len(saved["images"])
        assert on_model[external_metric(layout, "auc_mean")] == logged[external_metric(layout, "auc_mean")]
    assert external_metric("chexpert", "auc", "Effusion") == "ext_chexpert_auc_Effusion"


def test_external_subgroups_are_the_internal_table_and_sklearns_on_a_group(final):
    """CheXpert's Sex from its own CSVs: each sex's AUC on the images labelling the finding (uncertain ones left
    out) and its underdiagnosis rate equal a direct computation; MIMIC without patients.csv says sex and age are
    unavailable."""
    out, report = final["out"], (final["out"] / "report.md").read_text()
    by_group = pd.read_csv(out / "external_chexpert_subgroups.csv").set_index(["attribute", "group"])
    assert list(by_group.columns) == list(pd.read_csv(out / "subgroups.csv").columns[2:])     # the internal table
    saved = np.load(out / "external_chexpert_predictions.npz")
    labels, probs = saved["labels"], saved["probs"]
    folder = final["externals"]["chexpert"]
    raw = pd.concat([pd.read_csv(folder / name, dtype=str) for name in ("train.csv", "valid.csv")]).set_index("Path")
    sex = raw.loc[saved["images"], "Sex"].map({"Male": "M", "Female": "F"}).to_numpy()
    thresholds = np.array([json.loads((out / "thresholds.json").read_text())[f] for f in FINDINGS])
    compared, with_uncertain = 0, 0
    for group in ("M", "F"):
        in_group = sex == group
        assert by_group.loc[("sex", group), "images"] == in_group.sum()
        for finding in by_group.columns[2:-1]:
            k = FINDINGS.index(finding)
            rows = in_group & np.isfinite(labels[:, k])
            y = labels[rows, k]
            if min(y.sum(), len(y) - y.sum()) >= MIN_CLASS_IMAGES:
                assert by_group.loc[("sex", group), finding] == pytest.approx(roc_auc_score(y, probs[rows, k]),
                                                                               abs=1e-5)
                compared, with_uncertain = compared + 1, with_uncertain + int(rows.sum() < in_group.sum())
        sick = in_group & (np.nan_to_num(labels) > 0.5).any(axis=1)
        predicted_healthy = ~(probs >= thresholds).any(axis=1)
        assert by_group.loc[("sex", group), "underdiagnosis"] == pytest.approx(predicted_healthy[sick].mean(),
                                                                                abs=1e-5)
    assert compared >= 2 and with_uncertain >= 1
    gaps = pd.read_csv(out / "external_chexpert_subgroup_gaps.csv")
    assert len(gaps) and (gaps["gap_ci_low"] <= gaps["gap_ci_high"]).all()
    assert "### Subgroups (chexpert)" in report and "### Subgroups (padchest)" in report
    mimic = pd.read_csv(out / "external_mimic_subgroups.csv")
    assert set(mimic.loc[mimic["attribute"].isin(["sex", "age"]), "group"]) == {"unknown"}
    assert "attributes unavailable (no known value in this data set's metadata): sex, age" in report
    assert "attributes unavailable: sex, age (external_mimic_subgroups.csv)" in final["stdout"]


def test_the_report_has_subgroups_whose_auc_is_sklearns_on_the_group(final, data_dir):
    out = final["out"]
    by_group = pd.read_csv(out / "subgroups.csv").set_index(["attribute", "group"])
    gaps = pd.read_csv(out / "subgroup_gaps.csv").set_index(["attribute", "metric"])
    assert set(by_group.index.get_level_values("attribute")) == {"sex", "age", "view"}
    saved = np.load(out / "test_predictions.npz")
    split = pd.read_csv(out / "split.csv").set_index("image").loc[saved["images"]]
    for sex in ("M", "F"):
        rows = (split["sex"] == sex).to_numpy()
        assert by_group.loc[("sex", sex), "images"] == rows.sum()
        k = FINDINGS.index("Cardiomegaly")
        y, p = saved["labels"][rows, k], saved["probs"][rows, k]
        if min(y.sum(), len(y) - y.sum()) >= 5:
            assert by_group.loc[("sex", sex), "Cardiomegaly"] == pytest.approx(roc_auc_score(y, p))
    assert (gaps["gap_ci_low"] <= gaps["gap_ci_high"]).all() and "underdiagnosis" in set(gaps.index.get_level_values(1))
    assert "## Subgroups (test split)" in (out / "report.md").read_text() and "subgroup gaps" in final["stdout"]


def test_published_comparison_covers_all_findings_with_its_caveats(final):
    comparison = pd.read_csv(final["out"] / "comparison.csv").set_index("finding")
    assert list(comparison.index) == [*FINDINGS, "mean"]
    assert {"ours_auc", "chexnet_2017", "dannynet_2025"} <= set(comparison.columns)
    assert comparison.loc["mean", "chexnet_2017"] == pytest.approx(0.841, abs=5e-4)
    assert comparison.loc["mean", "dannynet_2025"] == pytest.approx(0.853, abs=5e-4)
    assert comparison[["chexnet_2017", "dannynet_2025"]].notna().all().all()
    markdown = (final["out"] / "comparison.md").read_text()
    assert "Not comparable as is" in markdown and "arXiv:1711.05225" in markdown and "2% of patients" in markdown
    assert "NOT comparable as is" in final["stdout"]


def test_localization_and_google_labels_use_test_images_only(final, data_dir):
    test_images = set((data_dir / "test_list.txt").read_text().split())
    boxes = read_bboxes(data_dir / "BBox_List_2017.csv")
    on_test = boxes[boxes["image"].isin(test_images)]
    assert len(on_test) < len(boxes), "the fixture should hold boxes on train images too"
    localization = pd.read_csv(final["out"] / "localization.csv").set_index("finding")
    assert localization["boxes"].to_dict() == on_test["finding"].value_counts().to_dict()
    assert ((localization["score"] >= 0) & (localization["score"] <= 1)).all()

    google = pd.read_csv(final["out"] / "google2019_auc.csv").set_index("finding")
    assert list(google.index) == ["Pneumothorax", "Nodule or mass"]
    saved = np.load(final["out"] / "test_predictions.npz")
    entries = _entries(data_dir).set_index("Image Index").loc[saved["images"], "Finding Labels"]
    nodule_or_mass = entries.str.contains("Nodule|Mass").to_numpy()
    score = np.maximum(saved["probs"][:, FINDINGS.index("Nodule")], saved["probs"][:, FINDINGS.index("Mass")])
    assert google.loc["Nodule or mass", "images"] == len(test_images)
    assert google.loc["Pneumothorax", "images"] == len(test_images) - 1      # one left blank by the radiologists
    assert google.loc["Nodule or mass", "auc"] == pytest.approx(roc_auc_score(nodule_or_mass, score), abs=1e-6)


# --- honesty ----------------------------------------------------------------------------------------------------

def test_thresholds_and_selected_epoch_do_not_depend_on_test_labels(final, data_dir, tmp_path):
    shuffled = tmp_path / "shuffled"
    shutil.copytree(data_dir, shuffled)
    entries = _entries(shuffled)
    in_test = entries["Image Index"].isin((shuffled / "test_list.txt").read_text().split()).to_numpy()
    labels = entries["Finding Labels"].to_numpy().copy()
    labels[in_test] = np.random.default_rng(1).permutation(labels[in_test])
    entries.assign(**{"Finding Labels": labels}).to_csv(shuffled / "Data_Entry_2017_v2020.csv", index=False)
    original = prepare_dataset(DataSpec(str(data_dir)), tmp_path / "original")
    data = prepare_dataset(DataSpec(str(shuffled)), tmp_path / "prepared")
    assert not np.array_equal(data.labels("test"), original.labels("test"))
    np.testing.assert_array_equal(data.labels("val"), original.labels("val"))

    config = TrialConfig.from_dict(json.loads((final["out"] / "config.json").read_text()))
    # Here, one member after the other, on one thread as each Tune trial had: the same arithmetic, bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refit = fit_final(member_specs([("best-config", config)], SEEDS), data, cache_dir=final["cache"])
    finally:
        torch.set_num_threads(threads)
    expected = json.loads((final["out"] / "thresholds.json").read_text())
    assert dict(zip(FINDINGS, map(float, refit.validation.thresholds))) == expected
    selected = [m["selected_epoch"] for m in json.loads((final["out"] / "members.json").read_text())]
    assert [m.selected_epoch for m in refit.members] == selected
    np.testing.assert_array_equal(refit.test_probs, np.load(final["out"] / "test_predictions.npz")["probs"])


# --- on the cluster: killed and resumed -------------------------------------------------------------------------

REPORT_FILES = ("test_metrics.csv", "members.csv", "members.json", "thresholds.json", "config.json", "comparison.csv",
                "comparison.md", "localization.csv", "google2019_auc.csv", "report.md")


def test_members_train_as_tune_trials_logged_by_the_driver(final):
    client = MlflowClient(final["uri"])
    parent = client.get_run(client.search_model_versions(f"name = '{MODEL_NAME}'")[0].run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f"best-config-s{seed}" for seed in range(SEEDS)]
    members = json.loads((final["out"] / "members.json").read_text())
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["kind"] == "final-member"
        history = client.get_metric_history(run.info.run_id, "val_auc_mean")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        member = next(m for m in members if m["member"] == run.info.run_name)
        # the selected epoch is the best by validation mean AUC (later on a tie), as the run's history says
        best = max(history, key=lambda m: (m.value, m.step))
        assert member["selected_epoch"] == best.step == int(run.data.tags["selected_epoch"])
        assert member["selected_val_auc_mean"] == pytest.approx(best.value, abs=1e-12)
    # run side by side (a CPU each, --max-concurrent 2), as the parent run records
    assert (parent.data.params["max_concurrent"], parent.data.params["cpus_per_trial"]) == (str(SEEDS), "1.0")
    # the Tune folder is the --out folder (storage default: its parent), with one trial folder per member
    assert len(glob.glob(str(final["out"] / "best-config-s*"))) == SEEDS and (final["out"] / "sweep.json").is_file()


def _saved_checkpoints(out: Path) -> dict[str, str]:
    """trial id -> the checkpoint (folder name) Tune's checkpoint manager holds in its latest saved state on the
    storage: what a resume continues from. (A state saved between a result and its checkpoint's registration
    names the checkpoint in its last result only; a resume starts such a trial afresh.)"""
    states = sorted(glob.glob(str(out / "experiment_state-*.json")), key=os.path.getmtime)
    try:
        trials = json.loads(Path(states[-1]).read_text())["trial_data"] if states else []
    except (FileNotFoundError, json.JSONDecodeError):       # replaced or being written just now
        return {}
    saved = {}
    for trial, runtime in trials:
        # the test's own storage, written by the driver it started: trusted
        manager = TuneFunctionDecoder(allow_cloudpickle=True).decode(runtime).get("checkpoint_manager")
        latest = getattr(manager, "_latest_checkpoint_result", None)
        if latest is not None:
            saved[json.loads(trial)["trial_id"]] = Path(latest.checkpoint.path).name
    return saved


def _into_second_epoch(out: Path) -> list[Path]:
    """Trial folders of members in their second epoch: Tune's saved state names their first checkpoint, and their
    second is not written yet. Files only (no MLflow query), so it can be polled often."""
    saved = _saved_checkpoints(out)
    return [Path(trial) for trial in glob.glob(str(out / "best-config-s*"))
            if saved.get(Path(trial).name.split("_", 1)[1]) == "checkpoint_000000"
            and not (Path(trial) / "checkpoint_000001").exists()]


def test_a_final_training_killed_mid_epoch_resumes_to_the_same_report(final, data_dir, tmp_path):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Tune saves its state every 0.5 s (final training's default: 2 s), so that a save falls inside a tiny
    # member's second epoch (about a second long here) after its first checkpoint is registered
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}
    driver = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "train_best.py"),
                               *final_args(final["config"], data_dir, out, uri, final["cache"]),
                               *final["external_args"]],       # recorded: the resume evaluates them too
                              cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    # Kill driver, Ray and both trials at once, as a lost head node would, once a member is into its second epoch:
    # its first checkpoint written, and Tune's state (saved at every checkpoint) saved since.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (checkpointed := _into_second_epoch(out)):
        assert driver.poll() is None and time.monotonic() < deadline, "final training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    # still at its first checkpoint in the state a resume restores
    saved = _saved_checkpoints(out)
    checkpointed = [trial for trial in checkpointed if saved.get(trial.name.split("_", 1)[1]) == "checkpoint_000000"]
    assert checkpointed
    client = MlflowClient(uri)
    cut = client.search_runs([client.get_experiment_by_name("final-training").experiment_id])
    assert any(r.info.status == "RUNNING" for r in cut) and not (out / "report.md").exists()

    # where it runs and logs is not recorded (it may change on resume): the same store and cache again
    code, stdout, _ = run_cli("--resume", out.name, "--out", str(out), "--mlflow-uri", uri,
                              "--cache-dir", str(final["cache"]))
    assert code == 0 and f"resuming final {out.name!r}" in stdout
    for name in REPORT_FILES:
        assert (out / name).read_bytes() == (final["out"] / name).read_bytes(), name
    for name in ("test_predictions.npz", "val_predictions.npz"):
        resumed, reference = np.load(out / name), np.load(final["out"] / name)
        assert sorted(resumed.keys()) == sorted(reference.keys())
        for key in reference.keys():
            np.testing.assert_array_equal(resumed[key], reference[key])
    # the member killed in its second epoch continued from a checkpoint, not from scratch: the resumed process
    # never reported epoch 1 (Tune's result.json may lack rows of the killed process: on restart its JSON logger
    # copies the file back from the storage, whose copy can lag one save behind; MLflow, below, has every epoch)
    for trial in checkpointed:
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        resumed = [row["epoch"] for row in rows if row["pid"] == rows[-1]["pid"]]
        assert resumed[0] >= 2 and resumed == list(range(resumed[0], EPOCHS + 1)), \
            (trial.name, [(row["pid"], row["epoch"]) for row in rows])
    runs = client.search_runs([client.get_experiment_by_name("final-training").experiment_id])
    parent = next(r for r in runs if PARENT_RUN_TAG not in r.data.tags)
    children = [r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
    assert len(runs) == 1 + SEEDS and parent.info.status == "FINISHED" and parent.data.tags["resumes"] == "1"
    for run in children:      # one run per member, every epoch logged once
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_auc_mean")) == \
            list(range(1, EPOCHS + 1))


# --- from a sweep, with an ensemble -----------------------------------------------------------------------------

def _write_sweep(uri: str, data_dir: Path, artifact_root: str) -> dict[str, float]:
    """A search sweep as sweeps/ logs it: the parent run records the data options; child runs hold flat configs and
    a final val_auc_mean. The best one was pruned by ASHA, so it must not be chosen."""
    client = MlflowClient(uri)
    sweep = SweepRun.start(client, "srch", artifact_root=artifact_root, tags={"kind": "search"},
                           params={"data": str(data_dir), "split": "official", "val_fraction": 0.1,
                                   "test_fraction": 0.2, "split_seed": 0, "view": "all", "max_images": 0,
                                   "skip_missing": False, "data_fingerprint": "x"})
    trials = {"trial-00001": (1e-3, 0.71, "FINISHED"), "trial-00002": (3e-3, 0.74, "FINISHED"),
              "trial-00003": (1e-2, 0.90, "KILLED"), "trial-00004": (3e-4, 0.62, "FINISHED")}
    for name, (lr, auc, status) in trials.items():
        pruned = {"pruned": "true"} if status == "KILLED" else {}
        run = client.create_run(sweep.experiment_id, run_name=name,
                                tags={PARENT_RUN_TAG: sweep.parent_run_id, "trial_id": name, **pruned})
        config = TrialConfig.from_dict({**CONFIG, "lr": lr, "epochs": 3})
        client.log_batch(run.info.run_id, metrics=[Metric("val_auc_mean", auc, 0, 3)],
                         params=[Param(k, str(v)) for k, v in config.to_dict().items()])
        client.set_terminated(run.info.run_id, status=status)
    sweep.end("FINISHED")
    return {name: lr for name, (lr, _, _) in trials.items()}


def test_from_sweep_averages_the_top_configs_by_validation(data_dir, final, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lrs = _write_sweep(uri, data_dir, (tmp_path / "mlartifacts").as_uri())
    code, stdout, _ = run_cli("--from-sweep", "srch", "--ensemble", "2", "--epochs", "1",
                              "--out", str(tmp_path / "out"), "--mlflow-uri", uri, "--registered-model", "ensemble",
                              "--bootstrap", "20", "--gradcam-samples", "0", "--cache-dir", str(final["cache"]))
    assert code == 0
    assert "top 2 by validation mean AUC: trial-00002 (val AUC 0.740" in stdout
    assert stdout.count("evidence: search best, not confirmed") == 2
    assert "differ from those the sweep chose its configs on (x)" in stdout     # the fixture records a fake fingerprint
    members = json.loads((tmp_path / "out" / "members.json").read_text())
    assert [m["config_label"] for m in members] == ["trial-00002", "trial-00001"]    # pruned trial-00003 left out
    assert [m["config"]["lr"] for m in members] == [lrs["trial-00002"], lrs["trial-00001"]]
    assert all(m["config"]["epochs"] == 1 for m in members)
    saved = np.load(tmp_path / "out" / "test_predictions.npz")
    np.testing.assert_allclose(saved["probs"], saved["probs_by_member"].mean(axis=0), atol=1e-6)
    parent = MlflowClient(uri).get_run(MlflowClient(uri).search_model_versions("name = 'ensemble'")[0].run_id)
    assert parent.data.tags["source_sweep"] == "srch"
    assert parent.data.tags["selection_evidence"].startswith("search best, not confirmed")
    assert parent.data.params["data"] == str(data_dir)          # no --data: the sweep's recorded data options
    children = MlflowClient(uri).search_runs([parent.info.experiment_id],
                                             filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["trial-00001-s0", "trial-00002-s0"]


# --- pieces and bad input ---------------------------------------------------------------------------------------

def test_localization_counts_boxes_that_contain_the_cam_peak(tmp_path, monkeypatch):
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                        "a.png,Infiltrate,512,0,512,512\n"      # top right quadrant
                                        "b.png,Infiltrate,0,0,256,256\n"
                                        "b.png,Mass,0,512,1024,512\n"
                                        "b.png,Pneumonia,0,0,1024,1024\n"      # flat map: no peak, a miss
                                        "c.png,Mass,0,0,10,10\n")               # not a test image: left out
    boxes = read_bboxes(tmp_path / "boxes.csv")
    assert set(boxes["finding"]) == {"Infiltration", "Mass", "Pneumonia"}
    peaks = {("a.png", "Infiltration"): (10, 50), ("b.png", "Infiltration"): (40, 40), ("b.png", "Mass"): (60, 5)}
    names = np.array(["a.png", "b.png"])

    def fake_cams(model, images, demographics, findings):
        cams = np.zeros((len(images), 64, 64))
        for i, (image, k) in enumerate(zip(names[images[:, 0, 0]], findings)):
            if (image, FINDINGS[k]) in peaks:
                cams[i][peaks[image, FINDINGS[k]]] = 1.0
        return cams
    monkeypatch.setattr("dashboards.gradcam.grad_cams", fake_cams)
    images = np.stack([np.full((64, 64), i, np.uint8) for i in range(len(names))])   # pixel value = row
    table = localization_scores(None, images, names, np.zeros((2, 3), np.float32), boxes).set_index("finding")
    assert table.loc["Infiltration", ["boxes", "hits"]].tolist() == [2, 1]       # a hit, b missed
    assert table.loc["Mass", ["boxes", "hits"]].tolist() == [1, 1]
    assert table.loc["Pneumonia", ["boxes", "hits"]].tolist() == [1, 0]
    assert table.loc["Infiltration", "score"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.json", "--data", "x"], "--config missing.json: cannot read it"),
    (["--config", "{config}", "--data", "x", "--ensemble", "2"], "--ensemble needs --from-sweep"),
    (["--config", "{config}"], "--data is required with --config"),
    (["--config", "{bad}", "--data", "x"], "unknown config key(s) 'learning_rate'"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, message):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 0.1}))
    args = [a.format(config=tmp_path / "config.json", bad=tmp_path / "bad.json") for a in args]
    code, _, stderr = run_cli(*args, "--out", str(tmp_path / "out"), "--mlflow-uri", f"sqlite:///{tmp_path / 'db'}")
    assert code == 2
    assert stderr.count("\n") == 1 and message in stderr


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="real NIH reference files absent (../shared/reference/ relative to "
                                                   "the repository)")
def test_reads_the_real_nih_box_list_and_google_labels_and_copies_the_published_aucs():
    boxes = read_bboxes(REFERENCE / "nih" / "BBox_List_2017.csv.gz")
    assert len(boxes) == 984 and boxes["finding"].nunique() == 8 and "Infiltration" in set(boxes["finding"])
    google = read_google_labels([REFERENCE / "nih" / "google2019_nih-chest-xray-labels.csv.gz"])
    assert google["set"].value_counts().to_dict() == {"val": 2414, "test": 1962}
    published, sources = load_published()
    reference = pd.read_csv(REFERENCE / "published" / "per_class_auc.csv").set_index("finding")
    pd.testing.assert_frame_equal(published, reference.loc[list(FINDINGS)], check_dtype=False)
    assert set(sources.index) == set(published.columns)
