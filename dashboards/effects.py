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
   positive scores: 1000 replicates × 14 findings × 6 trials × 10k images take about 2 s on 2 busy cores.
2. Seeds. Training randomness moves a whole model (a lucky seed is better on most images), and the image
   bootstrap holds trained models fixed: it cannot see this. Two identical configurations trained with
   different seeds then differ by more than V_img explains, and an image-only interval calls them different
   far too often (measured below). The between-seed part is V_seed = σ²_arm/k_arm + σ²_base/k_base, from the
   per-seed metrics on the full validation set, where each arm's σ² is the larger of its own seed variance and
   the within-arm seed variance pooled over all arms of the sweep (df = Σ (k − 1)).

**Interval**: the paired percentile interval [q_lo, q_hi] of Δ*, widened about Δ by
f = t_df · sqrt(V_img + V_seed) / (z · sqrt(V_img)), with df the pooled seed degrees of freedom. With one seed
per arm there is no seed term, f = 1 and the interval is exactly the paired percentile bootstrap. The pooled
variance gives a t quantile with usable degrees of freedom (20 arms × 2 seeds: df = 20, t = 2.09, instead of
Welch's df ≈ 1–2 per comparison); taking the larger of own and pooled keeps an arm that is less stable than the
rest (e.g. a high learning rate) from being judged by the others' stability. Counting the seed term's degrees of
freedom for the whole sum (rather than a Welch–Satterthwaite mix with the image term) is deliberately
conservative: Satterthwaite is liberal at such small df.

Measured false-call rates on the null simulation of dashboards/simulate.py (two identical arms, seed-level noise
about twice the image noise of the mean AUC, 2000 images, nominal 5%, all findings and both metrics; mean AUC
alone in brackets):
  2 seeds per arm (150–200 pairs): image-only bootstrap 34% (69%); hierarchical bootstrap (seeds with
  replacement, then images) 10% (30%); Welch–Satterthwaite 5.5% (7.3%); pooled-variance Satterthwaite 6.6%
  (8.7%); this interval 0.5% (2.0%).
  3 seeds per arm: this interval 1.6% (4.7%) over 150 pairs; Welch–Satterthwaite 4.7% (8%) over 100.
  6 arms × 2 seeds, 5 twins vs one baseline (150 sweeps, 750 comparisons): this interval 1.7% (4.3%).
  Without seed-level noise (image noise only), 2 seeds: this interval 0% -- see the next paragraph.
With 2 seeds the hierarchical bootstrap fails because resampling two seeds gives a three-point distribution
with half the unbiased variance and no allowance for a variance estimated from one degree of freedom.

**Conservative by design.** A per-seed metric on a finite validation set also holds image noise specific to
that model, which both V_img and V_seed count; when there are no seed-level effects at all the interval is at
most √2 too wide (× t_df / z), and the false-call rate falls below nominal. That is the price of never exceeding
the nominal rate with 2–3 seeds; more arms (a larger pooled df) and more seeds buy the power back.

Limits, stated in the report:
- One seed in an arm: its seed variance cannot be estimated. If other arms have several seeds, their pooled
  within-arm variance stands in (assuming arms vary alike); otherwise the interval holds image noise only and
  is too narrow. Either way the row is marked provisional.
- Pooling assumes arms differ in seed variance by no more than "own vs pooled, whichever is larger" allows: an
  unstable arm with 2 seeds can still, by chance, look stable.
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


# --- intervals and verdicts ---------------------------------------------------------------------------------

def _with_mean(values: np.ndarray) -> np.ndarray:
    """Prepend the NaN-mean over findings (last axis) as column 0, as epoch_metrics computes its means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=-1, keepdims=True)
    return np.concatenate([mean, values], axis=-1)


def _seed_variance(per_seed: np.ndarray) -> np.ndarray:
    """Sample variance over seeds (axis 0); NaN with one seed."""
    if len(per_seed) < 2:
        return np.full(per_seed.shape[1:], np.nan)
    return np.var(per_seed, axis=0, ddof=1)


def combined_interval(delta: np.ndarray, boot_deltas: np.ndarray, seed_variance: np.ndarray, seed_df: float,
                      confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per column: the paired percentile interval of boot_deltas (B, F) around delta (F,), widened
    by the between-seed variance of Δ (F,) whose estimate has seed_df degrees of freedom (inf: none to add)."""
    tail = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q_low, q_high = np.nanpercentile(boot_deltas, [100 * tail, 100 * (1 - tail)], axis=0)
        v_img = np.nanvar(boot_deltas, axis=0, ddof=1)
    v_total = v_img + seed_variance
    quantile = stats.t.ppf(1 - tail, seed_df) if np.isfinite(seed_df) else stats.norm.ppf(1 - tail)
    with np.errstate(invalid="ignore", divide="ignore"):
        widen = quantile * np.sqrt(v_total) / (stats.norm.ppf(1 - tail) * np.sqrt(v_img))
        # clipped so the interval always holds Δ, even where a skewed bootstrap puts Δ outside its percentiles
        low = np.where(v_img > 0, delta - widen * np.maximum(delta - q_low, 0), delta - quantile * np.sqrt(v_total))
        high = np.where(v_img > 0, delta + widen * np.maximum(q_high - delta, 0), delta + quantile * np.sqrt(v_total))
    return low, high


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

    # column 0 draws every image once: the point estimates, through the same code as the replicates (and equal
    # to trainable.metrics.per_class_auc / per_class_f1, which sklearn's per-call checks make slow here)
    counts = np.column_stack([np.ones(len(labels), np.uint16), bootstrap_counts(groups, n_boot, seed)])
    computed = resampled_metrics(trials, counts)
    point = {metric: values[:, 0] for metric, values in computed.items()}          # (T, K)
    resampled = {metric: values[:, 1:] for metric, values in computed.items()}     # (T, B, K)
    names = (MEAN, *findings)
    n_positive = np.concatenate([[labels.any(axis=1).sum()], labels.sum(axis=0)])
    n_groups = len(np.unique(groups))

    rows = []
    for metric in METRICS:
        per_seed = {arm: _with_mean(point[metric][arm_of == arm]) for arm in arms}        # (k, F)
        boot_mean = {arm: _with_mean(resampled[metric][arm_of == arm]).mean(axis=0) for arm in arms}   # (B, F)
        own = {arm: _seed_variance(values) for arm, values in per_seed.items()}
        pooled, seed_df = _pooled_variance(per_seed, own)
        for arm in arms:
            if arm == baseline:
                continue
            # each arm's seed variance: its own or the pooled one, whichever is larger (pooled alone for one seed)
            seed_variance = sum(np.fmax(own[a], pooled) / len(per_seed[a]) for a in (arm, baseline))
            delta = per_seed[arm].mean(axis=0) - per_seed[baseline].mean(axis=0)
            low, high = combined_interval(delta, boot_mean[arm] - boot_mean[baseline], seed_variance, seed_df,
                                          confidence)
            provisional = min(len(per_seed[arm]), len(per_seed[baseline])) < 2
            for f, finding in enumerate(names):
                rows.append((arm, finding, metric, per_seed[arm][:, f].mean(), per_seed[baseline][:, f].mean(),
                             delta[f], low[f], high[f], np.sqrt(own[arm][f]), np.sqrt(own[baseline][f]),
                             len(per_seed[arm]), len(per_seed[baseline]), len(labels), n_groups,
                             int(n_positive[f]), seed_df, verdict(low[f], high[f]), provisional))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _pooled_variance(per_seed: Mapping[str, np.ndarray],
                     own: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """Within-arm seed variance pooled over the arms with several seeds, and its degrees of freedom
    (zeros and inf when no arm has two seeds: nothing to add, nothing estimated)."""
    usable = [arm for arm, values in per_seed.items() if len(values) > 1]
    if not usable:
        return np.zeros(next(iter(per_seed.values())).shape[1]), np.inf
    df = sum(len(per_seed[arm]) - 1 for arm in usable)
    return sum((len(per_seed[arm]) - 1) * own[arm] for arm in usable) / df, float(df)


def expected_false_calls(effects: pd.DataFrame, confidence: float = 0.95) -> float:
    """How many of these comparisons would be flagged by chance alone if no arm changed anything (an upper
    bound: the intervals are conservative)."""
    return float((effects["verdict"] != NOT_ESTIMABLE).sum() * (1 - confidence))
