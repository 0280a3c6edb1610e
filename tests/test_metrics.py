"""Metrics equal independent sklearn / hand computations; undefined cases give NaN, not errors."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from trainable.findings import FINDINGS
from trainable.metrics import (binary_report, bootstrap_auc_ci, choose_thresholds, epoch_metrics,
                               expected_calibration_error, per_class_auc, per_class_f1)


def fake_predictions(n=300, k=14, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < np.linspace(0.05, 0.5, k)).astype(np.float32)
    probs = np.clip(0.3 * y + rng.random((n, k)) * 0.7, 0, 1).round(2)  # rounding makes ties
    return y, probs


def test_per_class_auc_equals_sklearn_and_nan_for_constant_class():
    y, probs = fake_predictions()
    y[:, 3] = 0
    auc = per_class_auc(y, probs)
    assert np.isnan(auc[3])
    for k in set(range(14)) - {3}:
        assert auc[k] == pytest.approx(roc_auc_score(y[:, k], probs[:, k]))


def test_thresholds_maximise_f1_like_brute_force():
    y, probs = fake_predictions(n=200, k=4)
    y[:, 2] = 0
    thresholds = choose_thresholds(y, probs)
    assert thresholds[2] == 0.5
    f1 = per_class_f1(y, probs, thresholds)
    assert np.isnan(f1[2])          # no positives: F1 is undefined, not 0
    for k in (0, 1, 3):
        best = max(f1_score(y[:, k], probs[:, k] >= t, zero_division=0) for t in np.unique(probs[:, k]))
        assert f1[k] == pytest.approx(best)
        assert f1[k] == pytest.approx(f1_score(y[:, k], probs[:, k] >= thresholds[k], zero_division=0))


def test_epoch_metrics_names_and_nan_means():
    y, probs = fake_predictions()
    y[:, 13] = 0  # e.g. no Hernia in a small validation split
    metrics, thresholds = epoch_metrics(y, probs, val_loss=0.25)
    expected = {"val_loss", "val_auc_mean", "val_f1_mean", "val_auc_findings", "val_f1_findings"} | \
        {f"val_{m}_{f}" for m in ("auc", "f1") for f in FINDINGS}
    assert set(metrics) == expected
    assert metrics["val_loss"] == 0.25
    assert np.isnan(metrics["val_auc_Hernia"])
    assert metrics["val_auc_findings"] == 13  # the mean covers the 13 findings with a defined AUC
    auc = per_class_auc(y, probs)
    assert metrics["val_auc_mean"] == pytest.approx(np.mean(auc[:13]))
    assert metrics["val_auc_Atelectasis"] == pytest.approx(roc_auc_score(y[:, 0], probs[:, 0]))
    f1 = [f1_score(y[:, k], probs[:, k] >= thresholds[k]) for k in range(13)]   # Hernia has no positives
    assert np.isnan(metrics["val_f1_Hernia"]) and metrics["val_f1_findings"] == 13
    assert metrics["val_f1_mean"] == pytest.approx(np.mean(f1))
    assert thresholds.shape == (14,)
    test_metrics, _ = epoch_metrics(y[:, :2], probs[:, :2], val_loss=1.0, findings=("A", "B"), prefix="test")
    assert set(test_metrics) == {"test_loss", "test_auc_mean", "test_f1_mean", "test_auc_findings", "test_f1_findings",
                                 "test_auc_A", "test_auc_B", "test_f1_A", "test_f1_B"}


def test_binary_report_counts():
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [1, 0]])
    probs = np.array([[0.9, 0.1], [0.4, 0.2], [0.6, 0.3], [0.1, 0.4], [0.7, 0.5]])
    report = binary_report(y, probs, np.array([0.5, 0.5]), findings=("A", "B"))
    # A: tp=2 (0.9, 0.7), fn=1 (0.4), fp=1 (0.6), tn=1 (0.1)
    assert report["A"] == pytest.approx({"threshold": 0.5, "sensitivity": 2 / 3, "specificity": 1 / 2,
                                         "ppv": 2 / 3, "npv": 1 / 2, "f1": 2 / 3})
    # B has no positives: sensitivity and F1 undefined; one false positive (0.5 >= 0.5)
    assert np.isnan(report["B"]["sensitivity"]) and np.isnan(report["B"]["f1"])
    assert report["B"]["specificity"] == pytest.approx(4 / 5) and report["B"]["ppv"] == 0.0


def test_expected_calibration_error_by_hand():
    y = np.array([[1], [0], [1], [1]])
    probs = np.array([[0.1], [0.2], [0.8], [0.6]])
    # bins of width 0.5: {0.1, 0.2} observed 1/2 vs predicted 0.15; {0.8, 0.6} observed 1 vs predicted 0.7
    expected = 2 / 4 * abs(0.5 - 0.15) + 2 / 4 * abs(1.0 - 0.7)
    assert expected_calibration_error(y, probs, bins=2)[0] == pytest.approx(expected)
    perfect = expected_calibration_error(np.array([[0], [1]]), np.array([[0.0], [1.0]]))
    assert perfect[0] == pytest.approx(0.0)


def test_bootstrap_ci_contains_point_auc_and_narrows_with_more_images():
    widths = []
    for n in (80, 2000):
        y, probs = fake_predictions(n=n, k=2, seed=1)
        low, high = bootstrap_auc_ci(y, probs, n_boot=100, seed=0)
        point = per_class_auc(y, probs)
        assert np.all(low <= point) and np.all(point <= high)
        widths.append(high - low)
    assert np.all(widths[1] < widths[0] / 2)


def test_bootstrap_skips_single_label_resamples():
    y = np.zeros((20, 2))
    y[0, 0] = 1  # one positive: many resamples miss it
    probs = np.linspace(0, 1, 40).reshape(20, 2)
    low, high = bootstrap_auc_ci(y, probs, n_boot=100, seed=0)
    assert np.isfinite(low[0]) and np.isfinite(high[0])
    assert np.isnan(low[1]) and np.isnan(high[1])  # never positive: no usable resample
    again = bootstrap_auc_ci(y, probs, n_boot=100, seed=0)
    np.testing.assert_array_equal(again[0][:1], low[:1])


def test_bootstrap_over_patients_treats_a_patients_images_as_one_unit():
    rng = np.random.default_rng(7)
    labels = (rng.random((60, 3)) < 0.3).astype(float)
    probs = np.clip(labels * 0.3 + rng.random((60, 3)) * 0.7, 0, 1)
    # every image seen twice by the same patient: resampling patients must give the intervals of the
    # single images (AUC does not change when every sample is doubled); resampling images would narrow them
    doubled_labels, doubled_probs = np.repeat(labels, 2, axis=0), np.repeat(probs, 2, axis=0)
    patients = np.repeat(np.arange(60), 2)
    single = bootstrap_auc_ci(labels, probs, n_boot=200, seed=3)
    grouped = bootstrap_auc_ci(doubled_labels, doubled_probs, n_boot=200, seed=3, groups=patients)
    ungrouped = bootstrap_auc_ci(doubled_labels, doubled_probs, n_boot=200, seed=3)
    np.testing.assert_allclose(grouped, single)
    assert np.all(ungrouped[1] - ungrouped[0] < single[1] - single[0])
    # one group per image is the plain image bootstrap
    np.testing.assert_allclose(bootstrap_auc_ci(labels, probs, n_boot=200, seed=3, groups=np.arange(60)), single)
