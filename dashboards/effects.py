"""Δ of each ablation arm against the baseline, per finding and for the mean, with intervals, controlled verdicts
and what the sweep could detect.

Input: for every arm, one `TrialPredictions` per seed (validation labels, probabilities, the trial's own F1
thresholds, image names). Output: a tidy table, one row per (arm, finding incl. "mean", metric in auc/f1):
Δ = mean over the arm's seeds − mean over the baseline's seeds, its interval, raw and adjusted p-values, a
verdict, and the smallest effect the row could have detected.

Statistical design (each claim measured on dashboards/simulate.py's generator, whose truth is known, by
benchmarks/effect_calibration.py; figures in BENCHMARKS.md)
------------------------------------------------------------------------------------------------------------
1. Images: a **paired cluster bootstrap**. Each replicate draws patients with replacement (NIH image names encode
   the patient; a patient's follow-up images move together) and *the same draw is applied to every trial of
   every arm*, so noise common to all arms (hard images) cancels in Δ. Every trial's AUC and F1 are recomputed
   exactly in every replicate (AUC from weighted rank sums: the resample is a vector of counts per image, and a
   sparse matrix per trial and finding sums them into the bins between positive scores; 1000 replicates × 14
   findings × 6 trials × 10k images take about 2 s on 2 busy cores).
2. Seeds: training randomness moves a whole model, which the image bootstrap cannot see. dashboards/variance.py
   splits each arm's per-seed spread into its seed part and the image noise it already holds (method of
   moments on the same replicates), pools the seed part over arms, and gives an arm whose spread is credibly
   larger than the others' its own variance and degrees of freedom.
3. Intervals and p-values: Δ ± t_ν · √Var(Δ), and p-values from the same t reference.
4. Families (statsmodels.stats.multitest.multipletests): **primary** = Δ mean AUC of each arm vs the baseline,
   family-wise error ≤ α by Holm; **secondary** = every other row (per-finding AUC and F1, mean F1), false
   discovery rate ≤ α by Benjamini–Hochberg. Equivalence (TOST at ±margin: both one-sided tests reject, i.e.
   the (1 − 2α) interval lies inside ±margin) is adjusted the same way within each family, as its own family.
5. Verdicts: `helps` / `hurts` (adjusted p ≤ α; the sign of Δ), else `equivalent` (adjusted TOST p ≤ α), else
   `inconclusive`; `not estimable` where no seed variance is available (or a finding has no positives).
6. Sequential sweeps (`--until-decided`): the p-values of each row over its looks become repeated p-values of
   an O'Brien–Fleming alpha-spending design (dashboards/sequential.py) before the same adjustment, so repeated
   looks keep the error rates.
7. Power: `mde` is the smallest |Δ| the row would detect with 80% power at the level its family would use for
   it (primary: α/m, Holm's first step; secondary: the Benjamini–Hochberg level at the observed number of
   discoveries), from the observed variances; `seeds_to_decide` how many seeds per arm (arm and baseline alike)
   would make that smallest detectable Δ no larger than the margin, so that an inconclusive row would be
   decided one way or the other (dashboards/power.py).

Limits, stated in the report: F1 uses each trial's own thresholds, chosen on these same validation labels
(optimistic for both arms alike, so Δ F1 compares fairly, but F1 levels are not test estimates; thresholds are
not re-chosen inside replicates). A one-seed arm borrows the pooled seed variance (assuming it varies like the
others) and says so.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from trainable.errors import DataError
from trainable.findings import FINDINGS

from .multiplicity import multiple_tests
from .power import minimum_detectable, seeds_needed
from .sequential import final_look_level, repeated_p_value
from .variance import BORROWED, SeedModel, delta_variance, seed_model

METRICS = ("auc", "f1")
MEAN = "mean"
HELPS, HURTS, EQUIVALENT, INCONCLUSIVE, NOT_ESTIMABLE = "helps", "hurts", "equivalent", "inconclusive", "not estimable"
VERDICTS = (HELPS, HURTS, EQUIVALENT, INCONCLUSIVE, NOT_ESTIMABLE)
DECIDED = (HELPS, HURTS, EQUIVALENT)
PRIMARY, SECONDARY = "primary", "secondary"
DEFAULT_MARGIN = 0.005         # mean AUC: below what the claims in the literature (0.005-0.02) are about
DEFAULT_ALPHA = 0.05
NIH_IMAGE_NAME = re.compile(r"^(\d+)_\d+\.png$")
COLUMNS = ("arm", "finding", "metric", "family", "arm_value", "baseline_value", "delta", "ci_low", "ci_high", "se",
           "image_sd", "df", "p_value", "p_adjusted", "p_equivalence", "p_equivalence_adjusted", "verdict", "mde",
           "seeds_to_decide", "seed_sd", "baseline_seed_sd", "n_seeds", "n_baseline_seeds", "variance", "provisional",
           "unstable_p", "looks", "n_images", "n_patients", "n_positive")


@dataclass(frozen=True)
class TrialPredictions:
    """One trial's validation output: labels and probabilities (N, K), its F1 thresholds (K,), image names."""
    labels: np.ndarray
    probs: np.ndarray
    thresholds: np.ndarray
    images: np.ndarray | None = None
    name: str = "trial"


# --- input checks -------------------------------------------------------------------------------------------

def _check_trial(trial: TrialPredictions, n_findings: int) -> None:
    labels, probs, thresholds = map(np.asarray, (trial.labels, trial.probs, trial.thresholds))
    problems = [
        (labels.ndim == 2 and labels.shape[1] == n_findings,
         f"labels have shape {labels.shape}, expected (N, {n_findings})"),
        (probs.shape == labels.shape, f"probs have shape {probs.shape}, labels {labels.shape}"),
        (thresholds.shape == (n_findings,), f"thresholds have shape {thresholds.shape}, expected ({n_findings},)"),
        (bool(np.isfinite(probs).all()), "probs contain NaN or infinite values"),
        (trial.images is None or len(trial.images) == len(labels),
         f"{0 if trial.images is None else len(trial.images)} image names for {len(labels)} rows"),
    ]
    for ok, problem in problems:
        if not ok:
            raise DataError(f"{trial.name}: {problem}")


def align_trials(arms: Mapping[str, Sequence[TrialPredictions]], reference: TrialPredictions,
                 n_findings: int = len(FINDINGS)) -> dict[str, list[TrialPredictions]]:
    """Every trial's rows in the reference trial's image order; an error if the validation splits differ."""
    aligned: dict[str, list[TrialPredictions]] = {}
    for arm, trials in arms.items():
        if not trials:
            raise DataError(f"arm {arm!r} has no trials")
        aligned[arm] = []
        for trial in trials:
            _check_trial(trial, n_findings)
            aligned[arm].append(_in_reference_order(trial, reference))
    return aligned


def _in_reference_order(trial: TrialPredictions, reference: TrialPredictions) -> TrialPredictions:
    if len(trial.labels) != len(reference.labels):
        raise DataError(f"{trial.name}: {len(trial.labels)} validation images, {reference.name} has "
                        f"{len(reference.labels)}; arms must share one validation split")
    if trial.images is not None and reference.images is not None:
        names, wanted = np.asarray(trial.images).astype(str), np.asarray(reference.images).astype(str)
        if not np.array_equal(names, wanted):
            index = pd.Index(names)
            order = index.get_indexer(wanted) if index.is_unique else np.full(len(wanted), -1)
            if (order < 0).any():
                example = wanted[order < 0][0] if index.is_unique else "a repeated image name"
                raise DataError(f"{trial.name}: validation images differ from {reference.name}'s (e.g. {example}); "
                                f"arms must share one validation split")
            trial = TrialPredictions(np.asarray(trial.labels)[order], np.asarray(trial.probs)[order],
                                     trial.thresholds, wanted, trial.name)
    if not np.array_equal(np.asarray(trial.labels) > 0.5, np.asarray(reference.labels) > 0.5):
        raise DataError(f"{trial.name}: validation labels differ from {reference.name}'s; arms must share one "
                        f"validation split")
    return trial


def patient_groups(images: Sequence[str] | None, n_images: int) -> np.ndarray:
    """Resampling unit per image: the patient when every name has NIH's `<patient>_<follow-up>.png` form,
    otherwise the image itself."""
    if images is not None:
        matches = [NIH_IMAGE_NAME.match(str(name)) for name in images]
        if all(matches):
            return np.unique([int(m.group(1)) for m in matches], return_inverse=True)[1]
    return np.arange(n_images)


# --- the resampling engine ----------------------------------------------------------------------------------

def bootstrap_counts(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_images, n_boot): how often each image appears in each replicate. Each replicate draws as many groups
    as there are, with replacement; all images of a drawn group come along."""
    group_index = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    group_counts = np.empty((n_groups, n_boot), dtype=np.uint16)
    for b in range(n_boot):
        group_counts[:, b] = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
    return group_counts[group_index]


@dataclass(frozen=True)
class _AucBins:
    """Sparse rows over images whose products with a count vector give the resampled Mann-Whitney sums.

    Rows [0, L): positives' counts per distinct positive score (level); rows [L, 2L): negatives' counts by the
    first level above them (they count fully for that level and every higher one, hence a cumulative sum);
    rows [2L, 3L) (only when some negative ties a positive score): negatives tied with a level (count 1/2).
    """
    matrix: sp.csr_matrix
    levels: int
    ties: bool

    @classmethod
    def build(cls, scores: np.ndarray, positive: np.ndarray) -> "_AucBins":
        pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
        values, pos_level = np.unique(scores[pos], return_inverse=True)
        n_levels = len(values)
        above = np.searchsorted(values, scores[neg], side="right")
        tied_level = np.searchsorted(values, scores[neg], side="left")
        counted, tied = above < n_levels, above > tied_level
        rows = np.concatenate([pos_level.ravel(), n_levels + above[counted], 2 * n_levels + tied_level[tied]])
        cols = np.concatenate([pos, neg[counted], neg[tied]])
        shape = ((3 if tied.any() else 2) * n_levels, len(scores))
        matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
        return cls(matrix, n_levels, bool(tied.any()))

    def auc(self, counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """AUC per column of counts (n_images, B); NaN where a replicate lacks positives or negatives."""
        if self.levels == 0:
            return np.full(counts.shape[1], np.nan)
        sums = self.matrix @ counts
        n = self.levels
        positives = sums[:n]
        negatives_below = np.cumsum(sums[n:2 * n], axis=0)
        if self.ties:
            negatives_below += 0.5 * sums[2 * n:]
        # counts are small integers, exact in float32; sum the products in float64
        pairs_won = np.einsum("lb,lb->b", positives, negatives_below, dtype=np.float64)
        n_pos = positives.sum(axis=0, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = pairs_won / (n_pos * (totals - n_pos))
        auc[(n_pos == 0) | (n_pos == totals)] = np.nan
        return auc


def _f1_matrix(trials: Sequence[TrialPredictions], positive: np.ndarray) -> sp.csr_matrix:
    """Rows over images: per trial and finding, true positives then false positives at the trial's thresholds;
    last K rows: positives per finding (false negatives = positives - true positives)."""
    blocks = []
    for trial in trials:
        predicted = np.asarray(trial.probs) >= np.asarray(trial.thresholds)[None, :]
        blocks += [(predicted & positive).T, (predicted & ~positive).T]
    blocks.append(positive.T)
    return sp.csr_matrix(np.concatenate(blocks), dtype=np.float32)


def resampled_metrics(trials: Sequence[TrialPredictions], counts: np.ndarray,
                      chunk: int = 128) -> dict[str, np.ndarray]:
    """Per-class AUC and F1 of every trial in every replicate: {"auc": (T, B, K), "f1": (T, B, K)}.

    A replicate is a column of `counts` (how often each image is drawn); all trials see the same replicates.
    Both are NaN where a replicate holds no positives of a finding (AUC also where it holds no negatives).
    """
    positive = np.asarray(trials[0].labels) > 0.5
    n_trials, n_findings, n_boot = len(trials), positive.shape[1], counts.shape[1]
    bins = [[_AucBins.build(np.asarray(t.probs)[:, k], positive[:, k]) for k in range(n_findings)] for t in trials]
    f1_rows = _f1_matrix(trials, positive)
    auc = np.empty((n_trials, n_boot, n_findings))
    f1 = np.empty((n_trials, n_boot, n_findings))
    for start in range(0, n_boot, chunk):   # a chunk of counts stays in cache across all trials and findings
        block = counts[:, start:start + chunk].astype(np.float32)
        totals = block.sum(axis=0, dtype=np.float64)
        for t in range(n_trials):
            for k in range(n_findings):
                auc[t, start:start + chunk, k] = bins[t][k].auc(block, totals)
        sums = (f1_rows @ block).astype(np.float64).reshape(2 * n_trials + 1, n_findings, -1)
        true_pos, false_pos, n_pos = sums[0:-1:2], sums[1:-1:2], sums[-1:]
        denominator = true_pos + false_pos + n_pos       # = 2TP + FP + FN
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(denominator > 0, 2 * true_pos / denominator, 0.0)   # zero_division=0, as sklearn
        score[:, n_pos[0] == 0] = np.nan      # no positives drawn: F1 says nothing, like AUC
        f1[:, start:start + chunk] = score.transpose(0, 2, 1)
    return {"auc": auc, "f1": f1}



# --- one resample of the whole sweep ------------------------------------------------------------------------

def _with_mean(values: np.ndarray) -> np.ndarray:
    """Prepend the NaN-mean over findings (last axis) as column 0, as epoch_metrics computes its means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=-1, keepdims=True)
    return np.concatenate([mean, values], axis=-1)


@dataclass(frozen=True)
class Resampled:
    """Every trial's metrics on the full validation set and in every shared replicate, by arm in seed order.

    point[metric][arm]: (k, F); replicates[metric][arm]: (k, B, F); column 0 is the mean over findings.
    """
    point: Mapping[str, Mapping[str, np.ndarray]]
    replicates: Mapping[str, Mapping[str, np.ndarray]]
    findings: tuple[str, ...]
    n_images: int
    n_patients: int
    n_positive: np.ndarray          # (F,) images with a positive label (column 0: with any)

    @property
    def seeds(self) -> dict[str, int]:
        return {arm: len(values) for arm, values in self.point[METRICS[0]].items()}

    def first_seeds(self, seeds: Mapping[str, int]) -> "Resampled":
        """The sweep as it stood when each arm had only its first `seeds[arm]` seeds."""
        def cut(by_arm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {arm: values[:seeds.get(arm, len(values))] for arm, values in by_arm.items()}
        return Resampled({m: cut(v) for m, v in self.point.items()}, {m: cut(v) for m, v in self.replicates.items()},
                         self.findings, self.n_images, self.n_patients, self.n_positive)


def resample(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str, *, findings: Sequence[str] = FINDINGS,
             n_boot: int = 1000, seed: int = 0, groups: np.ndarray | None = None) -> Resampled:
    """Check and align the trials, draw the shared patient bootstrap and compute every trial's metrics in it.

    `groups` (one id per image, e.g. patient) sets the resampling unit; by default the patient parsed from NIH
    image names, else the image. The draw depends only on the validation split, n_boot and seed: a sweep
    analysed again with more trials sees the same replicates.
    """
    if baseline not in arms:
        raise DataError(f"baseline arm {baseline!r} is not among the arms ({', '.join(arms) or 'none'})")
    if len(arms) < 2:
        raise DataError(f"only the baseline arm {baseline!r}: nothing to compare it with")
    if n_boot < 10:
        raise DataError(f"n_boot={n_boot} must be >= 10")
    if not arms[baseline]:
        raise DataError(f"arm {baseline!r} has no trials")
    reference = arms[baseline][0]
    arms = align_trials(arms, reference, len(findings))
    trials = [trial for arm_trials in arms.values() for trial in arm_trials]
    arm_of = np.repeat(list(arms), [len(t) for t in arms.values()])
    labels = np.asarray(reference.labels) > 0.5
    if groups is None:
        groups = patient_groups(reference.images, len(labels))
    elif len(groups) != len(labels):
        raise DataError(f"{len(groups)} group ids for {len(labels)} validation images")
    # column 0 draws every image once: the point estimates, through the same code as the replicates (and equal
    # to trainable.metrics.per_class_auc / per_class_f1, which sklearn's per-call checks make slow here)
    counts = np.column_stack([np.ones(len(labels), np.uint16), bootstrap_counts(groups, n_boot, seed)])
    computed = {metric: _with_mean(values) for metric, values in resampled_metrics(trials, counts).items()}
    point = {metric: {arm: values[arm_of == arm, 0] for arm in arms} for metric, values in computed.items()}
    replicates = {metric: {arm: values[arm_of == arm, 1:] for arm in arms} for metric, values in computed.items()}
    n_positive = np.concatenate([[labels.any(axis=1).sum()], labels.sum(axis=0)])
    return Resampled(point, replicates, tuple(findings), len(labels), len(np.unique(groups)), n_positive)


# --- one look: Δ, its variance and the raw tests ------------------------------------------------------------

LOOK_COLUMNS = ("arm", "finding", "metric", "arm_value", "baseline_value", "delta", "se", "image_sd", "df",
                "p_up", "p_down", "p_equivalence", "seed_sd", "baseline_seed_sd", "n_seeds", "n_baseline_seeds",
                "variance", "provisional", "unstable_p")


@dataclass(frozen=True)
class Look:
    """One analysis of the sweep as it stood: the raw statistics per row and the seed models behind them."""
    table: pd.DataFrame
    models: Mapping[str, SeedModel]
    image_variance: Mapping[tuple[str, str], np.ndarray]     # (arm, metric) -> V_img (F,)


def analyse_look(resampled: Resampled, baseline: str, margin: float = DEFAULT_MARGIN, *, seed: int = 0) -> Look:
    """Δ of every arm vs the baseline with Var(Δ) (dashboards/variance.py), and per row the one-sided p-values
    of Δ > 0 and Δ < 0 and the TOST p-value of |Δ| < margin, all from the t reference at the row's df."""
    names = (MEAN, *resampled.findings)
    rows, models, image_variance = [], {}, {}
    for metric in METRICS:
        point, replicates = resampled.point[metric], resampled.replicates[metric]
        model = models[metric] = seed_model(point, replicates, seed=seed)
        arm_means = {arm: replicates[arm].mean(axis=0) for arm in point}                      # (B, F)
        for arm in point:
            if arm == baseline:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                v_img = np.nanvar(arm_means[arm] - arm_means[baseline], axis=0, ddof=1)
            image_variance[(arm, metric)] = v_img
            variance = delta_variance(model, arm, baseline, v_img)
            delta = point[arm].mean(axis=0) - point[baseline].mean(axis=0)
            se = np.sqrt(variance.total)
            p_up, p_down, p_equivalence = t_tests(delta, se, variance.df, margin)
            mine, theirs = model.arms[arm], model.arms[baseline]
            for f, finding in enumerate(names):
                rows.append((arm, finding, metric, point[arm][:, f].mean(), point[baseline][:, f].mean(), delta[f],
                             se[f], np.sqrt(v_img[f]), variance.df[f], p_up[f], p_down[f], p_equivalence[f],
                             np.sqrt(mine.sample_variance[f]), np.sqrt(theirs.sample_variance[f]), mine.k, theirs.k,
                             variance.source, variance.source == BORROWED, mine.p_unstable))
    return Look(pd.DataFrame(rows, columns=list(LOOK_COLUMNS)), models, image_variance)


def t_tests(delta: np.ndarray, se: np.ndarray, df: np.ndarray, margin: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        usable = np.isfinite(delta) & np.isfinite(se) & (se > 0)
        t = np.where(usable, delta / np.where(usable, se, 1.0), np.nan)
        p_up, p_down = stats.t.sf(t, df), stats.t.cdf(t, df)
        above_lower = stats.t.sf((delta + margin) / se, df)          # H0: Δ <= -margin
        below_upper = stats.t.cdf((delta - margin) / se, df)         # H0: Δ >= +margin
        p_equivalence = np.where(usable, np.fmax(above_lower, below_upper), np.nan)
    exact = np.isfinite(delta) & (se == 0)          # every seed of every arm scores alike: nothing uncertain
    p_up = np.where(exact, (delta <= 0).astype(float), p_up)
    p_down = np.where(exact, (delta >= 0).astype(float), p_down)
    p_equivalence = np.where(exact, (np.abs(delta) >= margin).astype(float), p_equivalence)
    return p_up, p_down, p_equivalence


# --- the analysis -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedRounds:
    """The looks of an `--until-decided` sweep: after `initial` seeds, then every `step` more, up to `max_seeds`."""
    initial: int
    max_seeds: int
    step: int

    def __post_init__(self):
        if not 1 <= self.initial <= self.max_seeds or self.step < 1:
            raise DataError(f"seed rounds {self.initial}..{self.max_seeds} by {self.step}: expected "
                            f"1 <= initial <= max_seeds and step >= 1")

    @property
    def looks(self) -> tuple[int, ...]:
        return tuple(sorted({*range(self.initial, self.max_seeds, self.step), self.max_seeds}))

    def fraction(self, seeds: int) -> float:
        return seeds / self.max_seeds


FIXED = None    # a fixed design: one look at all seeds


def estimate_effects(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str = "baseline", *,
                     findings: Sequence[str] = FINDINGS, margin: float = DEFAULT_MARGIN,
                     alpha: float = DEFAULT_ALPHA, n_boot: int = 1000, seed: int = 0,
                     groups: np.ndarray | None = None, rounds: SeedRounds | None = FIXED) -> pd.DataFrame:
    """Δ AUC and Δ F1 of every arm against `baseline`, per finding and for the mean over findings: intervals,
    raw and family-adjusted p-values, verdicts and power (COLUMNS). With `rounds`, the looks of an adaptive
    sweep are replayed and the verdicts follow its sequential rule."""
    resampled = resample(arms, baseline, findings=findings, n_boot=n_boot, seed=seed, groups=groups)
    return analyse(resampled, baseline, margin=margin, alpha=alpha, rounds=rounds, seed=seed).table


@dataclass(frozen=True)
class Analysis:
    table: pd.DataFrame                 # COLUMNS
    stops: Mapping[str, str]            # arm -> why it stopped getting seeds (adaptive sweeps; empty otherwise)
    looks: tuple[int, ...]              # seeds per arm at each look replayed


History = dict  # arm -> list of (information fraction, that look's rows of the arm)


def analyse(resampled: Resampled, baseline: str, *, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA,
            rounds: SeedRounds | None = FIXED, seed: int = 0) -> Analysis:
    """The whole analysis on one resample: its looks (one, or an adaptive sweep's replayed round by round),
    families, verdicts and power."""
    if not 0 < alpha < 1:
        raise DataError(f"alpha={alpha} must lie in (0, 1)")
    if not margin > 0:
        raise DataError(f"margin={margin} must be > 0")
    history: History = {}
    last_look: dict[str, Look] = {}
    available = resampled.seeds
    if rounds is None:
        look = analyse_look(resampled, baseline, margin, seed=seed)
        for arm, rows in look.table.groupby("arm", sort=False):
            history[arm], last_look[arm] = [(1.0, rows)], look
        return _conclude(resampled, history, last_look, baseline, margin, alpha, {}, (max(available.values()),))
    active = [arm for arm in available if arm != baseline]
    stops: dict[str, str] = {}
    seeds = dict(available)
    looks: list[int] = []
    for planned in rounds.looks:
        if planned > available[baseline] or not active:
            break
        for arm in (*active, baseline):
            seeds[arm] = min(planned, available[arm])
        look = analyse_look(resampled.first_seeds(seeds), baseline, margin, seed=seed)
        looks.append(planned)
        for arm, rows in look.table.groupby("arm", sort=False):
            if arm in active:
                history.setdefault(arm, []).append((rounds.fraction(planned), rows))
                last_look[arm] = look
        verdicts = primary_verdicts(history, alpha)
        for arm in list(active):
            if verdicts.get(arm) in DECIDED:
                active.remove(arm)
                stops[arm] = f"{verdicts[arm]} after {seeds[arm]} seeds"
    if not looks:
        raise DataError(f"the baseline has {available[baseline]} seeds, fewer than the first look's "
                        f"{rounds.initial}: nothing to analyse")
    for arm in active:
        stops[arm] = (f"seed budget spent ({rounds.max_seeds}): undecided" if seeds[arm] >= rounds.max_seeds
                      else f"undecided after {seeds[arm]} seeds (budget {rounds.max_seeds} not reached)")
    return _conclude(resampled, history, last_look, baseline, margin, alpha, stops, tuple(looks), rounds)


def primary_verdicts(history: History, alpha: float = DEFAULT_ALPHA) -> dict[str, str]:
    """The primary family's verdict per arm from the looks so far."""
    def primary_rows(rows: pd.DataFrame) -> pd.DataFrame:
        return rows[(rows["finding"] == MEAN) & (rows["metric"] == "auc")]
    primary = pd.concat([_sequential_rows([(fraction, primary_rows(rows)) for fraction, rows in looks])
                         for looks in history.values()], ignore_index=True)
    decide_family(primary, "holm", alpha)
    return dict(zip(primary["arm"], primary["verdict"]))


def _sequential_rows(looks: list[tuple[float, pd.DataFrame]]) -> pd.DataFrame:
    """An arm's rows at its latest look, with each one-sided p-value turned into the repeated p-value over its
    looks (dashboards/sequential.py; a single look at the full information leaves it as it is)."""
    fractions = [fraction for fraction, _ in looks]
    latest = looks[-1][1].copy()
    tests = ("p_up", "p_down", "p_equivalence")
    if fractions == [1.0]:
        up, down, equivalence = (latest[c].to_numpy(float) for c in tests)
    else:
        stacked = [np.stack([rows[c].to_numpy(float) for _, rows in looks], axis=1) for c in tests]
        up, down, equivalence = (np.array([repeated_p_value(row, fractions) for row in values])
                                 for values in stacked)
    latest["p_value"] = np.minimum(1.0, 2 * np.fmin(up, down))          # NaN stays NaN: not estimable
    latest["direction"] = np.where(up <= down, 1, -1)
    latest["p_equivalence"] = equivalence
    latest["looks"] = len(looks)
    return latest


def _adjust(p_values: pd.Series, method: str, alpha: float) -> np.ndarray:
    """multipletests over the finite p-values (a row without one is not in the family); NaN elsewhere."""
    p = p_values.to_numpy(float)
    adjusted = np.full(len(p), np.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = multiple_tests(p[finite], alpha=alpha, method=method)[1]
    return adjusted


def decide_family(rows: pd.DataFrame, method: str, alpha: float = DEFAULT_ALPHA) -> None:
    """Adjust one family's p-values (in place: p_adjusted, p_equivalence_adjusted) and give each row its verdict:
    helps / hurts where the adjusted p ≤ alpha, else equivalent where the adjusted TOST p ≤ alpha, else
    inconclusive; not estimable without a p-value."""
    rows["p_adjusted"] = _adjust(rows["p_value"], method, alpha)
    rows["p_equivalence_adjusted"] = _adjust(rows["p_equivalence"], method, alpha)
    significant = rows["p_adjusted"].to_numpy() <= alpha
    verdict = np.where(rows["p_equivalence_adjusted"].to_numpy() <= alpha, EQUIVALENT, INCONCLUSIVE).astype(object)
    verdict[significant & (rows["direction"].to_numpy() > 0)] = HELPS
    verdict[significant & (rows["direction"].to_numpy() < 0)] = HURTS
    verdict[~np.isfinite(rows["p_value"].to_numpy(float))] = NOT_ESTIMABLE
    rows["verdict"] = verdict


def family_level(rows: pd.DataFrame, method: str, alpha: float = DEFAULT_ALPHA) -> float:
    """The two-sided level a further call in this family would have to meet: α/m for Holm (its first step), and
    Benjamini–Hochberg's α·(R+1)/m at R calls so far (capped at α)."""
    m = int(np.isfinite(rows["p_value"].to_numpy(float)).sum())
    if m == 0:
        return float("nan")
    if method == "holm":
        return alpha / m
    calls = int(rows["verdict"].isin([HELPS, HURTS]).sum())
    return min(alpha, alpha * (calls + 1) / m)


def _conclude(resampled: Resampled, history: History, last_look: Mapping[str, Look], baseline: str, margin: float,
              alpha: float, stops: Mapping[str, str], looks: tuple[int, ...],
              rounds: SeedRounds | None = None) -> Analysis:
    rows = pd.concat([_sequential_rows(history[arm]) for arm in history], ignore_index=True)
    rows["family"] = np.where((rows["finding"] == MEAN) & (rows["metric"] == "auc"), PRIMARY, SECONDARY)
    quantile = stats.t.ppf(1 - alpha / 2, rows["df"].to_numpy(float))
    rows["ci_low"] = rows["delta"] - quantile * rows["se"]
    rows["ci_high"] = rows["delta"] + quantile * rows["se"]
    families = []
    for family, method in ((PRIMARY, "holm"), (SECONDARY, "fdr_bh")):
        part = rows[rows["family"] == family].copy()
        decide_family(part, method, alpha)
        level = family_level(part, method, alpha)
        if rounds is not None:      # the nominal level of the last planned look that spends the family's level
            level = final_look_level([rounds.fraction(n) for n in rounds.looks], level)
        add_power(part, last_look, baseline, margin, level, (MEAN, *resampled.findings))
        families.append(part)
    table = pd.concat(families).sort_index()
    table["n_images"], table["n_patients"] = resampled.n_images, resampled.n_patients
    positives = dict(zip((MEAN, *resampled.findings), resampled.n_positive))
    table["n_positive"] = table["finding"].map(positives).astype(int)
    return Analysis(table[list(COLUMNS)].reset_index(drop=True), dict(stops), looks)


def add_power(rows: pd.DataFrame, last_look: Mapping[str, Look], baseline: str, margin: float, level: float,
              columns: Sequence[str]) -> None:
    """mde and seeds_to_decide per row (in place), at the family's two-sided level (dashboards/power.py)."""
    rows["mde"] = minimum_detectable(rows["se"].to_numpy(float), rows["df"].to_numpy(float), level)
    needed = pd.Series(np.nan, index=rows.index)
    inconclusive = rows[rows["verdict"] == INCONCLUSIVE]
    for (arm, metric), group in inconclusive.groupby(["arm", "metric"], sort=False):
        look = last_look[arm]
        by_column = seeds_needed(look.models[metric], arm, baseline, look.image_variance[(arm, metric)], margin,
                                 level)
        needed[group.index] = by_column[[columns.index(finding) for finding in group["finding"]]]
    rows["seeds_to_decide"] = needed
