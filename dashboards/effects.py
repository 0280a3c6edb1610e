"""Δ of each ablation arm against the baseline, per finding and for the mean, with intervals and verdicts.

Input: for every arm, one `TrialPredictions` per seed (validation labels, probabilities, the trial's own F1
thresholds, image names). Output: a tidy table, one row per (arm, finding incl. "mean", metric in auc/f1):
Δ = mean over the arm's seeds − mean over the baseline's seeds, its interval and a verdict
(helps / hurts / no detectable effect).

Statistical design
------------------
Two sources of noise make Δ uncertain, and the interval must carry both.

1. Images. The validation set is a sample. **Paired cluster bootstrap**: each replicate draws patients with
   replacement (NIH image names encode the patient; a patient's follow-up images move together, since they are
   not independent) and *the same draw is applied to every trial of every arm* -- all arms share one validation
   split, so noise common to both arms (hard images) cancels in Δ. Inside each replicate every trial's AUC and
   F1 are recomputed and averaged over the arm's seeds, giving Δ*_b; V_img = var(Δ*). AUC per replicate is
   computed exactly (ties count one half, as in sklearn) from weighted rank sums: the resample is a vector of
   counts per image, and a sparse matrix per trial and finding sums those counts into the bins between
   positive scores, so 1000 replicates × 14 findings × a few trials × 10k images take about a second.
2. Seeds. Training randomness moves a whole model (a lucky seed is better on most images), and the image
   bootstrap holds trained models fixed: it cannot see this. Two identical configurations trained with
   different seeds then differ by more than V_img explains, and an image-only interval calls them different
   far too often (measured below). The between-seed part is V_seed = s²_arm/k_arm + s²_base/k_base (Welch),
   from the per-seed metrics on the full validation set.

**Interval**: the paired percentile interval [q_lo, q_hi] of Δ*, widened about Δ by
f = t_ν · sqrt(V_img + V_seed) / (z · sqrt(V_img)), where ν is the Welch–Satterthwaite degrees of freedom
ν = (V_img + V_seed)² / Σ_terms (s²/k)² / (k − 1), the image term counted with unlimited degrees of freedom
(thousands of images). With one seed per arm f = 1 and the interval is exactly the paired percentile bootstrap;
with few seeds the t quantile carries the uncertainty of a variance estimated from few seeds (with 2 seeds per
arm and seed noise dominating, ν ≈ 2 and t = 4.3: such intervals are wide, by necessity).

Why not a hierarchical bootstrap (seeds with replacement, then images): with 2 seeds, resampling seeds gives a
three-point distribution with half the unbiased variance and no allowance for a variance estimated from one
degree of freedom. Measured on the null simulation of tests/test_effects.py (2 seeds per arm, seed-level
noise about as large as image noise, nominal 5%): image-only bootstrap 27% false calls, hierarchical bootstrap
13%, this interval 2.5%.

**Conservative by design.** A per-seed metric on a finite validation set also holds image noise specific to
that model, which both V_img and V_seed count; when there are no seed-level effects at all the interval is at
most √2 too wide, and the false-call rate falls below nominal. That is the price of never exceeding the nominal
rate with 2–3 seeds.

Limits, stated in the report:
- One seed in an arm: its seed variance cannot be estimated. If other arms have several seeds, their pooled
  within-arm variance stands in (assuming arms vary alike); otherwise the interval holds image noise only.
  Either way the row is marked provisional.
- Seed variance is per arm (Welch), not pooled, so a less stable arm (e.g. a high learning rate) is not judged
  by the baseline's stability.
- Each interval has a per-comparison error rate: over many arms × findings × metrics about 5% of truly null
  comparisons are flagged (fewer, given the conservatism); the report states how many to expect.
- F1 uses each trial's own thresholds, chosen on these same validation labels: optimistic for both arms alike,
  so Δ F1 compares fairly but F1 levels are not test estimates. Thresholds are not re-chosen inside replicates.
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
from trainable.metrics import per_class_auc, per_class_f1

METRICS = ("auc", "f1")
MEAN = "mean"
HELPS, HURTS, NO_EFFECT, NOT_ESTIMABLE = "helps", "hurts", "no detectable effect", "not estimable"
VERDICTS = (HELPS, HURTS, NO_EFFECT, NOT_ESTIMABLE)
NIH_IMAGE_NAME = re.compile(r"^(\d+)_\d+\.png$")
COLUMNS = ("arm", "finding", "metric", "arm_value", "baseline_value", "delta", "ci_low", "ci_high", "seed_sd",
           "baseline_seed_sd", "n_seeds", "n_baseline_seeds", "n_images", "n_patients", "n_positive", "df",
           "verdict", "provisional")


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
        (labels.ndim == 2 and labels.shape[1] == n_findings, f"labels have shape {labels.shape}, expected (N, {n_findings})"),
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
            position = {name: row for row, name in enumerate(names)}
            missing = [name for name in wanted if name not in position]
            if missing or len(position) != len(names):
                raise DataError(f"{trial.name}: validation images differ from {reference.name}'s (e.g. "
                                f"{(missing or ['a duplicate name'])[0]}); arms must share one validation split")
            order = np.array([position[name] for name in wanted])
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
    return sp.csr_matrix(np.concatenate(blocks).astype(np.float32))


def resampled_metrics(trials: Sequence[TrialPredictions], counts: np.ndarray,
                      chunk: int = 128) -> dict[str, np.ndarray]:
    """Per-class AUC and F1 of every trial in every replicate: {"auc": (T, B, K), "f1": (T, B, K)}.

    A replicate is a column of `counts` (how often each image is drawn); all trials see the same replicates.
    """
    positive = np.asarray(trials[0].labels) > 0.5
    n_trials, (n_images, n_findings), n_boot = len(trials), positive.shape, counts.shape[1]
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
        f1[:, start:start + chunk] = score.transpose(0, 2, 1)
    return {"auc": auc, "f1": f1}


# --- intervals and verdicts ---------------------------------------------------------------------------------

def _with_mean(values: np.ndarray) -> np.ndarray:
    """Append the NaN-mean over findings (last axis) as an extra first column, like epoch_metrics' means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=-1, keepdims=True)
    return np.concatenate([mean, values], axis=-1)


def _seed_variance(per_seed: np.ndarray) -> np.ndarray:
    """Sample variance over seeds (axis 0); NaN with one seed."""
    if len(per_seed) < 2:
        return np.full(per_seed.shape[1:], np.nan)
    return np.var(per_seed, axis=0, ddof=1)


def combined_interval(delta: np.ndarray, boot_deltas: np.ndarray, seed_terms: Sequence[tuple[np.ndarray, float]],
                      confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, df) per column: the paired percentile interval of boot_deltas (B, F) around delta (F,),
    widened for the between-seed terms, each (variance of the seed mean, degrees of freedom)."""
    tail = 100 * (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q_low, q_high = np.nanpercentile(boot_deltas, [tail, 100 - tail], axis=0)
        v_img = np.nanvar(boot_deltas, axis=0, ddof=1)
    v_seed = sum((np.nan_to_num(v) for v, _ in seed_terms), np.zeros_like(delta))
    df_denominator = sum((np.nan_to_num(v) ** 2 / df for v, df in seed_terms if df > 0), np.zeros_like(delta))
    v_total = v_img + v_seed
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(df_denominator > 0, v_total ** 2 / df_denominator, np.inf)
        z = stats.norm.ppf(1 - tail / 100)
        t = stats.t.ppf(1 - tail / 100, df)
        widen = t * np.sqrt(v_total) / (z * np.sqrt(v_img))
        symmetric = t * np.sqrt(v_total)
        low = np.where(v_img > 0, delta - widen * (delta - q_low), delta - symmetric)
        high = np.where(v_img > 0, delta + widen * (q_high - delta), delta + symmetric)
    return low, high, df


def verdict(low: float, high: float) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return NOT_ESTIMABLE
    return HELPS if low > 0 else HURTS if high < 0 else NO_EFFECT


# --- the analysis -------------------------------------------------------------------------------------------

def estimate_effects(arms: Mapping[str, Sequence[TrialPredictions]], baseline: str = "baseline", *,
                     findings: Sequence[str] = FINDINGS, n_boot: int = 1000, confidence: float = 0.95,
                     seed: int = 0, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Δ AUC and Δ F1 of every arm against `baseline`, per finding and for the mean over findings.

    `groups` (one id per image, e.g. patient) sets the bootstrap's resampling unit; by default the patient
    parsed from NIH image names, else the image.
    """
    if baseline not in arms:
        raise DataError(f"baseline arm {baseline!r} is not among the arms ({', '.join(arms) or 'none'})")
    if len(arms) < 2:
        raise DataError(f"only the baseline arm {baseline!r}: nothing to compare it with")
    if not 0 < confidence < 1 or n_boot < 10:
        raise DataError(f"confidence={confidence} must lie in (0, 1) and n_boot={n_boot} be >= 10")
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

    counts = bootstrap_counts(groups, n_boot, seed)
    resampled = resampled_metrics(trials, counts)
    point = {"auc": np.stack([per_class_auc(t.labels, t.probs) for t in trials]),
             "f1": np.stack([per_class_f1(t.labels, t.probs, t.thresholds) for t in trials])}
    names = (MEAN, *findings)
    n_positive = np.concatenate([[labels.any(axis=1).sum()], labels.sum(axis=0)])

    rows = []
    for metric in METRICS:
        per_seed = {arm: _with_mean(point[metric][arm_of == arm]) for arm in arms}        # (k, F)
        boot_mean = {arm: _with_mean(resampled[metric][arm_of == arm]).mean(axis=0) for arm in arms}   # (B, F)
        variances = {arm: _seed_variance(values) for arm, values in per_seed.items()}
        pooled = _pooled_variance(per_seed, variances)
        for arm in arms:
            if arm == baseline:
                continue
            terms = [_seed_term(per_seed[a], variances[a], pooled) for a in (arm, baseline)]
            delta = per_seed[arm].mean(axis=0) - per_seed[baseline].mean(axis=0)
            low, high, df = combined_interval(delta, boot_mean[arm] - boot_mean[baseline], terms, confidence)
            provisional = min(len(per_seed[arm]), len(per_seed[baseline])) < 2
            for f, finding in enumerate(names):
                rows.append((arm, finding, metric, per_seed[arm][:, f].mean(), per_seed[baseline][:, f].mean(),
                             delta[f], low[f], high[f], np.sqrt(variances[arm][f]), np.sqrt(variances[baseline][f]),
                             len(per_seed[arm]), len(per_seed[baseline]), len(labels), len(np.unique(groups)),
                             int(n_positive[f]), df[f], verdict(low[f], high[f]), provisional))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _pooled_variance(per_seed: Mapping[str, np.ndarray],
                     variances: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float] | None:
    """Within-arm seed variance pooled over arms with several seeds, and its degrees of freedom."""
    usable = [arm for arm, values in per_seed.items() if len(values) > 1]
    if not usable:
        return None
    df = sum(len(per_seed[arm]) - 1 for arm in usable)
    return sum((len(per_seed[arm]) - 1) * variances[arm] for arm in usable) / df, float(df)


def _seed_term(per_seed: np.ndarray, variance: np.ndarray,
               pooled: tuple[np.ndarray, float] | None) -> tuple[np.ndarray, float]:
    """(variance of this arm's seed mean, its degrees of freedom); the pooled variance stands in for one seed."""
    k = len(per_seed)
    if k > 1:
        return variance / k, float(k - 1)
    if pooled is not None:
        return pooled[0], pooled[1]
    return np.zeros(per_seed.shape[1]), 0.0


def expected_false_calls(effects: pd.DataFrame, confidence: float = 0.95) -> float:
    """How many of these comparisons would be flagged by chance alone if no arm changed anything (an upper
    bound: the intervals are conservative)."""
    return float((effects["verdict"] != NOT_ESTIMABLE).sum() * (1 - confidence))
