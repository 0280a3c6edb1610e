"""The effect analysis: exact resampled metrics, the variance model against direct computations, adjusted p-values
equal to statsmodels', verdicts that follow them, identical configurations rarely called different, planted
effects found, equivalence once enough seeds are given, and the sequential boundaries."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from dashboards.effects import (EQUIVALENT, HELPS, HURTS, INCONCLUSIVE, MEAN, NOT_ESTIMABLE, PRIMARY, SECONDARY,
                                SeedRounds, TrialPredictions, analyse, analyse_look, bootstrap_counts,
                                estimate_effects, patient_groups, resample, resampled_metrics)
from dashboards.power import minimum_detectable, seeds_needed
from dashboards.sequential import nominal_levels, one_sided_boundaries, repeated_p_value
from dashboards.simulate import simulate_sweep
from dashboards.variance import BORROWED, OWN, POOLED
from trainable.errors import DataError
from trainable.findings import FINDINGS
from trainable.metrics import choose_thresholds, per_class_auc, per_class_f1

EFFUSION, CARDIOMEGALY = FINDINGS.index("Effusion"), FINDINGS.index("Cardiomegaly")
CALLS = (HELPS, HURTS)


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
        assert np.isnan(resampled["f1"][0, b][~drawn]).all() and np.isnan(f1[~drawn]).all()


def test_patients_are_resampled_whole():
    groups = patient_groups(np.array(["00000001_000.png", "00000001_001.png", "00000002_000.png"]), 3)
    assert groups[0] == groups[1] != groups[2]
    counts = bootstrap_counts(groups, 50, seed=0)
    assert (counts[0] == counts[1]).all() and counts.sum(axis=0).min() >= 2
    assert (patient_groups(np.array(["a.png", "b.png"]), 2) == [0, 1]).all()


def slow_f1(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    positive = labels > 0.5
    tp, fp, fn = ((positive & predicted).sum(0), (~positive & predicted).sum(0), (positive & ~predicted).sum(0))
    return 2 * tp / (2 * tp + fp + fn)


def test_image_noise_is_the_paired_bootstrap_of_a_direct_loop_and_one_seed_everywhere_is_not_estimable():
    n, n_boot = 300, 40
    sweep = simulate_sweep({"baseline": 1.0, "other": 1.3}, n_seeds=1, n_images=n, prevalence_floor=0.05, seed=2)
    base, other = sweep["baseline"][0], sweep["other"][0]
    effects = estimate_effects(sweep, n_boot=n_boot, seed=7).set_index(["finding", "metric"])
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
        sd = np.std(values, axis=0, ddof=1)
        for f, finding in enumerate((MEAN, *FINDINGS)):
            row = effects.loc[(finding, metric)]
            assert row["image_sd"] == pytest.approx(sd[f], rel=1e-9), (finding, metric)
            # no arm has two seeds: no seed variance anywhere, nothing to call
            assert row["verdict"] == NOT_ESTIMABLE and row["n_seeds"] == 1 and np.isnan(row["p_value"])
    mass = FINDINGS.index("Mass")
    assert effects.loc[("Mass", "auc"), "arm_value"] == pytest.approx(
        roc_auc_score(other.labels[:, mass], other.probs[:, mass]))
    np.testing.assert_allclose(effects.xs("f1", level="metric")["arm_value"].iloc[1:],
                               per_class_f1(other.labels, other.probs, other.thresholds))
    np.testing.assert_allclose(effects.xs("auc", level="metric")["baseline_value"].iloc[1:],
                               per_class_auc(base.labels, base.probs))


def test_variance_counts_each_models_image_noise_once():
    sweep = simulate_sweep({"baseline": 1.0, "a": 1.0, "b": 1.1}, n_seeds=3, n_images=800, seed=8)
    resampled = resample(sweep, "baseline", n_boot=60, seed=3)
    look = analyse_look(resampled, "baseline")
    point, boot = resampled.point["auc"], resampled.replicates["auc"]     # (k, F), (k, B, F) per arm
    s2, within = {}, {}
    for arm in sweep:           # by hand: s² of the per-seed metrics and the bootstrap variance of the deviations
        s2[arm] = point[arm].var(axis=0, ddof=1)
        within[arm] = np.var(boot[arm] - boot[arm].mean(axis=0), axis=1, ddof=1).sum(axis=0) / 2
    assert all(s.p_unstable > 0.05 for s in look.models["auc"].arms.values())     # nobody flagged here
    pooled = np.mean(list(s2.values()), axis=0)                                   # equal seeds: a plain mean
    np.testing.assert_allclose(look.models["auc"].pooled_sample, pooled, rtol=1e-10)
    np.testing.assert_allclose(look.models["auc"].pooled,
                               np.mean([np.maximum(s2[a] - within[a], 0) for a in sweep], axis=0), rtol=1e-10)
    for arm in ("a", "b"):
        v_img = np.var(boot[arm].mean(axis=0) - boot["baseline"].mean(axis=0), axis=0, ddof=1)
        common = np.maximum(v_img - within[arm] / 3 - within["baseline"] / 3, 0)
        rows = look.table[(look.table["arm"] == arm) & (look.table["metric"] == "auc")]
        np.testing.assert_allclose(rows["se"] ** 2, common + 2 * pooled / 3, rtol=1e-10)
        np.testing.assert_allclose(rows["image_sd"] ** 2, v_img, rtol=1e-10)
        # Satterthwaite with the common image part at infinite df: at least the pooled df (3 arms x 2)
        assert (rows["df"] >= 6 - 1e-9).all() and (rows["variance"] == POOLED).all()
        expected = point[arm].mean(axis=0) - point["baseline"].mean(axis=0)
        np.testing.assert_allclose(rows["delta"], expected)
    # no double counting: each model's own image noise is in s² only, so se² < V_img + 2 s²/3 wherever W > 0
    rows = look.table[(look.table["arm"] == "a") & (look.table["metric"] == "auc")]
    assert (rows["se"] ** 2 < rows["image_sd"] ** 2 + 2 * pooled / 3).all()


def test_adjusted_p_values_are_statsmodels_multipletests_of_the_raw_ones():
    signals = {"baseline": 1.0, "up": np.r_[1.0, 1.0, 1.6, np.ones(11)], "twin": 1.0, "down": 0.9}
    effects = estimate_effects(simulate_sweep(signals, n_seeds=3, n_images=1000, seed=4), n_boot=100)
    for family, method in ((PRIMARY, "holm"), (SECONDARY, "fdr_bh")):
        rows = effects[(effects["family"] == family) & effects["p_value"].notna()]
        assert len(rows) == (3 if family == PRIMARY else 3 * 29)
        for raw, adjusted in (("p_value", "p_adjusted"), ("p_equivalence", "p_equivalence_adjusted")):
            np.testing.assert_allclose(rows[adjusted], multipletests(rows[raw], alpha=0.05, method=method)[1])
    primary = effects[effects["family"] == PRIMARY]
    assert set(primary["finding"]) == {MEAN} and set(primary["metric"]) == {"auc"}
    # p-values from the same t reference as the interval: p < α exactly when the interval excludes 0
    t = effects["delta"] / effects["se"]
    np.testing.assert_allclose(effects["p_value"], 2 * stats.t.sf(np.abs(t), effects["df"]), rtol=1e-9)
    estimable = effects["p_value"].notna()
    excludes = (effects["ci_low"] > 0) | (effects["ci_high"] < 0)
    assert ((effects["p_value"] < 0.05) == excludes)[estimable].all()


def test_verdicts_follow_the_adjusted_p_values():
    signals = {"baseline": 1.0, "up": np.r_[1.0, 1.0, 1.6, np.ones(11)], "twin": 1.0}
    effects = estimate_effects(simulate_sweep(signals, n_seeds=3, n_images=1000, seed=5), n_boot=100, margin=0.02)
    significant = effects["p_adjusted"] <= 0.05
    assert (effects.loc[significant & (effects["delta"] > 0), "verdict"] == HELPS).all()
    assert (effects.loc[significant & (effects["delta"] < 0), "verdict"] == HURTS).all()
    equivalent = ~significant & (effects["p_equivalence_adjusted"] <= 0.05)
    assert (effects.loc[equivalent, "verdict"] == EQUIVALENT).all()
    rest = ~significant & ~equivalent & effects["p_value"].notna()
    assert (effects.loc[rest, "verdict"] == INCONCLUSIVE).all()
    assert (effects.loc[effects["p_value"].isna(), "verdict"] == NOT_ESTIMABLE).all()
    assert set(effects["verdict"]) <= {HELPS, HURTS, EQUIVALENT, INCONCLUSIVE, NOT_ESTIMABLE}
    assert (effects["ci_low"] <= effects["delta"]).all() and (effects["delta"] <= effects["ci_high"]).all()
    # power: the smallest detectable Δ is the t-test formula at the family's level (Holm: α/m, here m = 2)
    primary = effects[effects["family"] == PRIMARY]
    np.testing.assert_allclose(primary["mde"], minimum_detectable(primary["se"], primary["df"], 0.05 / 2))


def test_identical_configurations_are_rarely_called_different():
    # 10 null sweeps of 4 identical arms x 3 seeds: 30 primary and 870 secondary comparisons (the error rates
    # themselves are measured by benchmarks/effect_calibration.py)
    frames = [estimate_effects(simulate_sweep(dict.fromkeys(["baseline", "a", "b", "c"], 1.0), n_seeds=3,
                                              n_images=600, seed=500 + p), n_boot=40, seed=p) for p in range(10)]
    effects = pd.concat(frames, keys=range(10), names=["sweep"])
    calls = effects["verdict"].isin(CALLS)
    assert calls.mean() <= 0.01 and calls.groupby("sweep").any().sum() <= 2
    assert not effects["provisional"].any()
    assert (effects.loc[effects["family"] == PRIMARY, "verdict"] != NOT_ESTIMABLE).all()


def test_one_seed_arm_borrows_the_pooled_variance_and_says_so():
    sweep = simulate_sweep({"baseline": 1.0, "a": 1.0, "single": 1.0}, n_seeds={"baseline": 3, "a": 3, "single": 1},
                           n_images=600, seed=9)
    effects = estimate_effects(sweep, n_boot=50)
    single, paired = effects[effects["arm"] == "single"], effects[effects["arm"] == "a"]
    assert single["provisional"].all() and (single["variance"] == BORROWED).all()
    assert not paired["provisional"].any()
    assert (single.loc[single["family"] == PRIMARY, "verdict"] != NOT_ESTIMABLE).all()
    # its Δ carries one model's noise and a whole seed variance: wider than the 3-seed arm's, row by row mostly
    wider = single["se"].to_numpy() > paired["se"].to_numpy()
    assert wider[0] and wider[np.isfinite(paired["se"].to_numpy())].mean() >= 0.8


def test_planted_effects_are_found_and_an_unstable_arm_gets_its_own_variance():
    better_effusion = np.ones(len(FINDINGS))
    better_effusion[EFFUSION] += 1.5
    worse_cardiomegaly = np.ones(len(FINDINGS))
    worse_cardiomegaly[CARDIOMEGALY] -= 0.8
    sweep = simulate_sweep({"baseline": 1.0, "effusion_up": better_effusion, "cardiomegaly_down": worse_cardiomegaly,
                            "twin": 1.0, "shaky": 1.0}, n_seeds=4, n_images=2000, seed=11,
                           seed_sd={"baseline": 0.15, "effusion_up": 0.15, "cardiomegaly_down": 0.15, "twin": 0.15,
                                    "shaky": 0.75})
    effects = estimate_effects(sweep, n_boot=150).set_index(["arm", "finding", "metric"])
    assert effects.loc[("effusion_up", "Effusion", "auc"), "verdict"] == HELPS
    assert effects.loc[("effusion_up", "Effusion", "f1"), "verdict"] == HELPS
    assert effects.loc[("cardiomegaly_down", "Cardiomegaly", "auc"), "verdict"] == HURTS
    assert effects.loc[("twin", MEAN, "auc"), "verdict"] not in CALLS
    assert effects.loc[("effusion_up", "Effusion", "auc"), "delta"] > 0.03
    row = effects.loc[("effusion_up", "Effusion", "auc")]
    assert row["n_seeds"] == row["n_baseline_seeds"] == 4 and row["n_images"] == 2000
    # the arm with 5x the seed spread is judged by its own variance, with its own 3 degrees of freedom
    shaky = effects.loc[("shaky", MEAN, "auc")]
    assert shaky["variance"] == OWN and shaky["df"] <= 3 and shaky["unstable_p"] < 0.05
    assert shaky["se"] > 2 * effects.loc[("twin", MEAN, "auc"), "se"]
    assert effects.loc[("twin", MEAN, "auc"), "variance"] == POOLED


def test_an_equivalent_pair_is_reported_equivalent_once_enough_seeds_are_given():
    sweep = simulate_sweep({"baseline": 1.0, "twin": 1.0}, n_seeds=10, n_images=1500, seed_sd=0.03, seed=12)
    resampled = resample(sweep, "baseline", n_boot=100)
    verdicts = {}
    for seeds in (4, 10):
        table = analyse(resampled.first_seeds({"baseline": seeds, "twin": seeds}), "baseline").table
        verdicts[seeds] = table.set_index(["finding", "metric"]).loc[(MEAN, "auc")]
    assert verdicts[4]["verdict"] == INCONCLUSIVE and 4 < verdicts[4]["seeds_to_decide"] < 50
    assert verdicts[10]["verdict"] == EQUIVALENT          # at the default margin of 0.005 mean AUC
    assert -0.005 < verdicts[10]["ci_low"] and verdicts[10]["ci_high"] < 0.005
    # seeds_to_decide is the variance model's projection: decided with 80% power there, not one seed earlier
    look = analyse_look(resampled.first_seeds({"baseline": 4, "twin": 4}), "baseline")
    needed = seeds_needed(look.models["auc"], "twin", "baseline", look.image_variance[("twin", "auc")], 0.005, 0.05)
    assert needed[0] == verdicts[4]["seeds_to_decide"]


def test_trials_are_matched_by_image_name_and_bad_input_is_named():
    sweep = simulate_sweep({"baseline": 1.0, "other": 1.2}, n_seeds=2, n_images=200, seed=5)
    expected = estimate_effects(sweep, n_boot=50)
    other = sweep["other"][0]
    order = np.random.default_rng(0).permutation(200)
    shuffled = TrialPredictions(other.labels[order], other.probs[order], other.thresholds, other.images[order], "o")
    pd.testing.assert_frame_equal(estimate_effects({**sweep, "other": [shuffled, sweep["other"][1]]}, n_boot=50),
                                  expected)

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


# --- sequential ---------------------------------------------------------------------------------------------

def test_obrien_fleming_boundaries_match_the_published_ones_and_spend_alpha():
    # Lan-DeMets O'Brien-Fleming, 4 equally spaced looks, two-sided 0.05 (Jennison & Turnbull, table 7.6)
    np.testing.assert_allclose(one_sided_boundaries([0.25, 0.5, 0.75, 1.0], 0.025), [4.333, 2.963, 2.359, 2.014],
                               atol=2e-3)
    # a Brownian path crosses them with probability 0.025
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(200_000, 4)) * 0.5).cumsum(axis=1) / np.sqrt([0.25, 0.5, 0.75, 1.0])
    assert (z >= one_sided_boundaries([0.25, 0.5, 0.75, 1.0], 0.025)).any(axis=1).mean() == pytest.approx(0.025,
                                                                                                       abs=0.0015)
    # a repeated p-value is the level at which the boundary is just crossed; one final look: the p-value itself
    levels = nominal_levels([0.5, 1.0], 0.01)
    assert repeated_p_value([0.5, levels[1]], [0.5, 1.0]) == pytest.approx(0.01, rel=0.02)
    assert repeated_p_value([levels[0], 0.5], [0.5, 1.0]) == pytest.approx(0.01, rel=0.02)
    assert repeated_p_value([0.03], [1.0]) == 0.03


def test_adaptive_rounds_stop_decided_arms_and_keep_going_with_the_rest():
    signals = {"baseline": 1.0, "big": 1.6, "twin": 1.0}
    sweep = simulate_sweep(signals, n_seeds=6, n_images=1000, seed=13, thresholds=False)
    analysis = analyse(resample(sweep, "baseline", n_boot=60), "baseline", rounds=SeedRounds(2, 6, 2),
                       margin=0.0001)
    assert analysis.looks == (2, 4, 6)
    assert analysis.stops["big"].startswith(HELPS) and analysis.stops["twin"] == "seed budget spent (6): undecided"
    table = analysis.table.set_index(["arm", "finding", "metric"])
    big, twin = table.loc[("big", MEAN, "auc")], table.loc[("twin", MEAN, "auc")]
    assert big["n_seeds"] < 6 and twin["n_seeds"] == 6 and twin["looks"] == 3
    assert twin["verdict"] == INCONCLUSIVE
    # the primary p-values are repeated p-values over each arm's looks, then Holm
    primary = analysis.table[analysis.table["family"] == PRIMARY]
    np.testing.assert_allclose(primary["p_adjusted"], multipletests(primary["p_value"], method="holm")[1])
