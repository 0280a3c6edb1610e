"""The effect analysis: exact resampled metrics, intervals equal to a slow direct bootstrap, the false-call rate of
identical configurations at or below nominal, and planted effects found."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from dashboards.effects import (HELPS, HURTS, MEAN, NO_EFFECT, NOT_ESTIMABLE, TrialPredictions, bootstrap_counts,
                                estimate_effects, patient_groups, resampled_metrics, verdict)
from dashboards.simulate import simulate_sweep
from trainable.errors import DataError
from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds, per_class_auc, per_class_f1

EFFUSION, CARDIOMEGALY = FINDINGS.index("Effusion"), FINDINGS.index("Cardiomegaly")


def false_call_rate(effects: pd.DataFrame) -> float:
    return float((effects["verdict"] != NO_EFFECT).mean())


def test_resampled_auc_and_f1_equal_sklearn_on_the_same_resamples():
    sweep = simulate_sweep({"baseline": 1.0}, n_seeds=1, n_images=300, seed=1)
    trial = sweep["baseline"][0]
    probs = np.round(trial.probs, 2)          # ties between positives and negatives, as sklearn counts them
    trial = TrialPredictions(trial.labels, probs, choose_thresholds(trial.labels, probs), trial.images)
    counts = bootstrap_counts(patient_groups(trial.images, 300), 12, seed=4)
    resampled = resampled_metrics([trial], counts)
    for b in range(counts.shape[1]):
        rows = np.repeat(np.arange(300), counts[:, b])
        auc = per_class_auc(trial.labels[rows], probs[rows])
        np.testing.assert_allclose(resampled["auc"][0, b], auc, rtol=0, atol=1e-12)
        f1 = per_class_f1(trial.labels[rows], probs[rows], trial.thresholds)
        drawn = trial.labels[rows].any(axis=0)          # F1 is left undefined (NaN) without positives
        np.testing.assert_allclose(resampled["f1"][0, b][drawn], f1[drawn], rtol=0, atol=1e-12)
        assert np.isnan(resampled["f1"][0, b][~drawn]).all()


def test_patients_are_resampled_whole():
    groups = patient_groups(np.array(["00000001_000.png", "00000001_001.png", "00000002_000.png"]), 3)
    assert groups[0] == groups[1] != groups[2]
    counts = bootstrap_counts(groups, 50, seed=0)
    assert (counts[0] == counts[1]).all() and counts.sum(axis=0).min() >= 2
    assert (patient_groups(np.array(["a.png", "b.png"]), 2) == [0, 1]).all()


def test_one_seed_interval_is_the_paired_percentile_bootstrap_of_a_direct_loop():
    n, n_boot, level = 300, 40, 0.9
    sweep = simulate_sweep({"baseline": 1.0, "other": 1.3}, n_seeds=1, n_images=n, prevalence_floor=0.05, seed=2)
    base, other = sweep["baseline"][0], sweep["other"][0]
    effects = estimate_effects(sweep, n_boot=n_boot, confidence=level, seed=7).set_index(["finding", "metric"])
    counts = bootstrap_counts(patient_groups(base.images, n), n_boot, seed=7)
    deltas = {"auc": [], "f1": []}
    for b in range(n_boot):          # the slow way: sklearn / plain counting on the resampled rows
        rows = np.repeat(np.arange(n), counts[:, b])
        auc = [[roc_auc_score(t.labels[rows, k], t.probs[rows, k]) for k in range(len(FINDINGS))]
               for t in (other, base)]
        f1 = [slow_f1(t.labels[rows], t.probs[rows] >= t.thresholds) for t in (other, base)]
        for metric, (arm, baseline) in (("auc", auc), ("f1", f1)):
            delta = np.subtract(arm, baseline)
            deltas[metric].append(np.concatenate([[delta.mean()], delta]))
    for metric, values in deltas.items():
        low, high = np.percentile(values, [5, 95], axis=0)
        for f, finding in enumerate((MEAN, *FINDINGS)):
            row = effects.loc[(finding, metric)]
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((low[f], high[f]), abs=1e-9), (finding, metric)
            assert row["provisional"] and row["n_seeds"] == 1
    mass = FINDINGS.index("Mass")
    assert effects.loc[("Mass", "auc"), "arm_value"] == pytest.approx(
        roc_auc_score(other.labels[:, mass], other.probs[:, mass]))
    np.testing.assert_allclose(effects.xs("f1", level="metric")["arm_value"].iloc[1:],
                               per_class_f1(other.labels, other.probs, other.thresholds))
    np.testing.assert_allclose(effects.xs("auc", level="metric")["baseline_value"].iloc[1:],
                               per_class_auc(base.labels, base.probs))


def slow_f1(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    positive = labels > 0.5
    tp, fp, fn = ((positive & predicted).sum(0), (~positive & predicted).sum(0), (positive & ~predicted).sum(0))
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("n_seeds, pairs", [(2, 40), (3, 20)])
def test_identical_configurations_are_rarely_called_different(n_seeds, pairs):
    # seed-level noise comparable with the image noise: an image-only interval calls ~1/3 of these different
    frames = [estimate_effects(simulate_sweep({"baseline": 1.0, "twin": 1.0}, n_seeds=n_seeds, n_images=1000,
                                              seed=500 + p), n_boot=200, seed=p) for p in range(pairs)]
    effects = pd.concat(frames)
    assert false_call_rate(effects) <= 0.10
    assert false_call_rate(effects[effects["finding"] == MEAN]) <= 0.10
    assert not effects["provisional"].any()


def test_with_one_seed_image_only_intervals_overstate_and_rows_are_provisional():
    frames = [estimate_effects(simulate_sweep({"baseline": 1.0, "twin": 1.0}, n_seeds=1, n_images=1000,
                                              seed=900 + p), n_boot=200, seed=p) for p in range(15)]
    effects = pd.concat(frames)
    assert effects["provisional"].all()
    assert false_call_rate(effects) > 0.15      # why one seed is never enough: the simulation's seed noise is real


def test_planted_effects_are_found_and_nothing_else_moves_much():
    better_effusion = np.ones(len(FINDINGS))
    better_effusion[EFFUSION] += 1.5
    worse_cardiomegaly = np.ones(len(FINDINGS))
    worse_cardiomegaly[CARDIOMEGALY] -= 0.8
    sweep = simulate_sweep({"baseline": 1.0, "effusion_up": better_effusion, "cardiomegaly_down": worse_cardiomegaly,
                            "twin": 1.0}, n_seeds=3, n_images=2000, seed=11)
    effects = estimate_effects(sweep, n_boot=300).set_index(["arm", "finding", "metric"])
    assert effects.loc[("effusion_up", "Effusion", "auc"), "verdict"] == HELPS
    assert effects.loc[("effusion_up", "Effusion", "f1"), "verdict"] == HELPS
    assert effects.loc[("cardiomegaly_down", "Cardiomegaly", "auc"), "verdict"] == HURTS
    assert effects.loc[("twin", MEAN, "auc"), "verdict"] == NO_EFFECT
    assert effects.loc[("effusion_up", "Effusion", "auc"), "delta"] > 0.03
    row = effects.loc[("effusion_up", "Effusion", "auc")]
    assert row["n_seeds"] == row["n_baseline_seeds"] == 3 and row["n_images"] == 2000 and row["df"] == 8
    assert 0 < row["seed_sd"] < 0.05


def test_verdict_follows_the_interval():
    assert verdict(-0.01, 0.02) == NO_EFFECT
    assert verdict(0.001, 0.02) == HELPS
    assert verdict(-0.02, -0.001) == HURTS
    assert verdict(np.nan, np.nan) == NOT_ESTIMABLE
    effects = estimate_effects(simulate_sweep({"baseline": 1.0, "twin": 1.0}, n_seeds=2, n_images=600, seed=3),
                               n_boot=100)
    straddles = (effects["ci_low"] <= 0) & (effects["ci_high"] >= 0)
    assert (effects.loc[straddles, "verdict"] == NO_EFFECT).all()
    assert (effects.loc[~straddles, "verdict"] != NO_EFFECT).all()
    assert (effects["ci_low"] <= effects["delta"]).all() and (effects["delta"] <= effects["ci_high"]).all()


def test_trials_are_matched_by_image_name_and_bad_input_is_named():
    sweep = simulate_sweep({"baseline": 1.0, "other": 1.2}, n_seeds=1, n_images=200, seed=5)
    expected = estimate_effects(sweep, n_boot=50)
    other = sweep["other"][0]
    order = np.random.default_rng(0).permutation(200)
    shuffled = TrialPredictions(other.labels[order], other.probs[order], other.thresholds, other.images[order], "o")
    pd.testing.assert_frame_equal(estimate_effects({**sweep, "other": [shuffled]}, n_boot=50), expected)

    with pytest.raises(DataError, match="baseline arm 'control'"):
        estimate_effects(sweep, "control")
    elsewhere = TrialPredictions(other.labels, other.probs, other.thresholds, np.char.add("x", other.images), "o")
    with pytest.raises(DataError, match="validation images differ"):
        estimate_effects({**sweep, "other": [elsewhere]})
    broken = TrialPredictions(other.labels, other.probs[:, :3], other.thresholds, other.images, "broken-s0")
    with pytest.raises(DataError, match="broken-s0: probs have shape"):
        estimate_effects({**sweep, "other": [broken]})


def test_a_finding_without_positives_is_not_estimable():
    sweep = simulate_sweep({"baseline": 1.0, "other": 1.0}, n_seeds=2, n_images=300, seed=6)
    for trials in sweep.values():
        for t in trials:
            t.labels[:, -1] = 0
    effects = estimate_effects(sweep, n_boot=50)
    hernia = effects[effects["finding"] == FINDINGS[-1]]
    assert (hernia["verdict"] == NOT_ESTIMABLE).all()
    assert np.isfinite(effects.loc[effects["finding"] == MEAN, "delta"]).all()
