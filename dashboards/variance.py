"""The variance of Δ: validation-image noise from the shared bootstrap, seed-to-seed noise from the seeds, each once.

A per-seed metric y_{a,s} (arm a, seed s; one column = one finding or the mean) is

    y_{a,s} = μ_a + u_{a,s} + c_a + d_{a,s},

u the seed-level effect of training randomness (variance σ²_a), and c + d the error of scoring that model on
this finite validation set: c the part all of the arm's models share, d each model's own (variance W_a). The
shared patient bootstrap holds the models fixed and sees c and d: V_img = var*(Δ*) (the noise common to all
arms cancels in the pairing). The sample variance s²_a of an arm's per-seed metrics holds d too: E[s²_a] = σ²_a +
W_a, and W_a is estimated from the same replicates, as the bootstrap variance of each trial's deviation from its
arm's seed mean, summed as in s²: W_a = Σ_s var*(y*_{a,s} − ȳ*_a) / (k_a − 1). Method of moments:

    Var(Δ_a) = C + s²_a / k_a + s²_b / k_b,   C = V_img − W_a / k_a − W_b / k_b   (b the baseline),

C the image noise common to an arm's seeds (it does not shrink with more seeds), truncated at 0; the seed part
σ̂²_a = s²_a − W_a is what the report shows as seed noise. Each model's own image noise is counted once, in s²
(V_img + s²/k, as this module's predecessor did, counts it twice). Where seed noise is small against image noise
σ̂² would often truncate to 0; truncating C instead never takes the seeds' own spread for zero (two arms whose
models are identical give V_img = 0, and their Δ is still judged by how much their seeds vary).

Degrees of freedom. s²_a from one arm's 3 seeds has 2 degrees of freedom (t = 4.3, an interval ~2× the
known-variance width). Arms of one sweep usually vary alike, so s² is pooled over arms (6 arms × 3 seeds: 12
df, t = 2.18). An arm that is less stable than the others (a high learning rate, say) must not be judged by
their stability: an arm is *unstable* when its seed spread is credibly larger than the others' — a one-sided
permutation test (p < 5%) of the arm's mean log variance ratio over all columns of the metric (all findings and
the mean: training instability shows in every finding, which gives the test power that 2 df alone lack). An
unstable arm uses its own s²_a, and the comparison's degrees of freedom are capped at k_a − 1 (Welch–
Satterthwaite alone estimates the df from the same 2-df variances, and overstates them whenever s²_a happens
to come out small). The pooled variance then leaves the unstable arms out. Otherwise the df are Welch–
Satterthwaite's over the terms (C with infinite df). Coverage with one arm at 3× the others' seed spread is
measured in benchmarks/effect_calibration.py.

An arm with one seed has no seed variance of its own: it borrows the pooled one (assuming it varies like the
others), and its rows say so; with no arm of two seeds there is no seed variance at all: not estimable.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np

UNSTABLE_LEVEL = 0.05          # one-sided level of the instability test
PERMUTATIONS = 400
OWN, POOLED, BORROWED, NO_VARIANCE = ("own (unstable arm)", "pooled", "pooled (one seed: borrowed from other arms)",
                                      "none")


@dataclass(frozen=True)
class ArmSeeds:
    """One arm's seed statistics for one metric: (F,) arrays over columns (mean first, then findings)."""
    k: int
    values: np.ndarray             # (k, F) per-seed metric
    sample_variance: np.ndarray    # s², NaN with one seed
    image_part: np.ndarray         # W, NaN with one seed
    unstable: bool = False
    p_unstable: float = float("nan")

    @property
    def seed_variance(self) -> np.ndarray:
        """σ̂² = max(0, s² − W)."""
        return np.fmax(self.sample_variance - self.image_part, 0.0)


@dataclass(frozen=True)
class SeedModel:
    """Every arm's seed statistics and the variance pooled over the stable arms with several seeds."""
    arms: Mapping[str, ArmSeeds]
    pooled: np.ndarray             # (F,) σ̂² pooled; NaN when no stable arm has two seeds
    pooled_df: float
    pooled_image_part: np.ndarray  # (F,) W pooled the same way (stands in for a one-seed arm's)
    pooled_sample: np.ndarray      # (F,) s² pooled the same way: what the degrees of freedom are about


def _nanvar(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanvar(values, axis=axis, ddof=1)


def arm_seeds(point: np.ndarray, replicates: np.ndarray) -> ArmSeeds:
    """From one arm's per-seed metrics (k, F) and their bootstrap replicates (k, B, F)."""
    k = len(point)
    if k < 2:
        nan = np.full(point.shape[1], np.nan)
        return ArmSeeds(k, point, nan, nan)
    deviations = replicates - replicates.mean(axis=0, keepdims=True)
    image_part = _nanvar(deviations, axis=1).sum(axis=0) / (k - 1)
    return ArmSeeds(k, point, np.var(point, axis=0, ddof=1), image_part)


def seed_model(points: Mapping[str, np.ndarray], replicates: Mapping[str, np.ndarray], *,
               seed: int = 0) -> SeedModel:
    """Seed statistics of every arm, instability flags, and the pooled seed variance of the stable arms."""
    arms = {arm: arm_seeds(points[arm], replicates[arm]) for arm in points}
    p_values = instability_p_values({arm: s.values for arm, s in arms.items() if s.k >= 2}, seed=seed)
    arms = {arm: ArmSeeds(s.k, s.values, s.sample_variance, s.image_part,
                          unstable=p_values.get(arm, 1.0) < UNSTABLE_LEVEL, p_unstable=p_values.get(arm, np.nan))
            for arm, s in arms.items()}
    stable = [s for s in arms.values() if s.k >= 2 and not s.unstable]
    n_columns = next(iter(arms.values())).values.shape[1]
    if not stable:
        nan = np.full(n_columns, np.nan)
        return SeedModel(arms, nan, 0.0, nan, nan)
    df = sum(s.k - 1 for s in stable)

    def pool(values: str) -> np.ndarray:
        return np.nansum([(s.k - 1) * getattr(s, values) for s in stable], axis=0) / df
    return SeedModel(arms, pool("seed_variance"), float(df), pool("image_part"), pool("sample_variance"))


def instability_p_values(values: Mapping[str, np.ndarray], *, permutations: int = PERMUTATIONS,
                         seed: int = 0) -> dict[str, float]:
    """Per arm, the one-sided permutation p-value of 'its seed spread exceeds the other arms'.

    Statistic: the mean over columns of log(arm's mean squared residual / the other arms'); residuals are the
    per-seed metrics minus their arm's mean, scaled by √(k/(k−1)) so that every residual has the variance of
    one seed. Permuting whole residual vectors (all columns of a trial together) between arms keeps the
    correlation between findings, which a parametric F test over columns would ignore. Needs ≥ 3 arms with
    several seeds (with 2 the two arms' statistics mirror each other: nothing to compare with).
    """
    arms = sorted(arm for arm, v in values.items() if len(v) >= 2)      # sorted: the same draws in any arm order
    if len(arms) < 3:
        return {}
    residuals, owner = [], []
    for index, arm in enumerate(arms):
        v = values[arm]
        residuals.append((v - v.mean(axis=0)) * np.sqrt(len(v) / (len(v) - 1)))
        owner += [index] * len(v)
    squared = np.concatenate(residuals) ** 2                 # (T, F)
    usable = np.isfinite(squared).all(axis=0) & (squared.sum(axis=0) > 0)
    if not usable.any():
        return {}
    squared, owner = squared[:, usable], np.array(owner)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([owner, *(rng.permutation(owner) for _ in range(permutations))])   # row 0: as observed
    statistics = _spread_statistics(squared, shuffled, len(arms))                           # (1 + P, arms)
    exceed = (statistics[1:] >= statistics[0] - 1e-12).sum(axis=0)
    return {arm: float((1 + exceed[i]) / (1 + permutations)) for i, arm in enumerate(arms)}


def _spread_statistics(squared: np.ndarray, owners: np.ndarray, n_arms: int) -> np.ndarray:
    """(assignments, arms): mean over columns of log(arm's mean squared residual / the other arms')."""
    one_hot = (owners[:, None, :] == np.arange(n_arms)[None, :, None]).astype(float)     # (P, arms, T)
    sums = one_hot @ squared                                                              # (P, arms, F)
    counts = one_hot.sum(axis=2, keepdims=True)
    mine = sums / counts
    others = (sums.sum(axis=1, keepdims=True) - sums) / (owners.shape[1] - counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nanmean(np.log(mine / others), axis=2)


@dataclass(frozen=True)
class DeltaVariance:
    """Var(Δ) of one arm vs the baseline per column, its degrees of freedom, and what it was built from."""
    common: np.ndarray             # C: image noise common to each arm's seeds (truncated at 0)
    seed_terms: np.ndarray         # s²_a/k_a + s²_b/k_b (own or pooled s²)
    df: np.ndarray
    source: str

    @property
    def total(self) -> np.ndarray:
        return self.common + self.seed_terms


def _sides(model: SeedModel, arm: str, baseline: str) -> list[tuple[np.ndarray, np.ndarray, int, float, str]]:
    """Per side: (s² it is judged by, its models' own image noise W, seeds, df of that s², source)."""
    sides = []
    for side in (arm, baseline):
        stats = model.arms[side]
        image_part = stats.image_part if stats.k >= 2 else model.pooled_image_part
        if stats.unstable:
            sides.append((stats.sample_variance, image_part, stats.k, float(stats.k - 1), OWN))
        else:
            sides.append((model.pooled_sample, image_part, stats.k, model.pooled_df,
                          BORROWED if stats.k < 2 else POOLED))
    return sides


def common_image_variance(model: SeedModel, arm: str, baseline: str, image_variance: np.ndarray) -> np.ndarray:
    """C = V_img − W_a/k_a − W_b/k_b, truncated at 0."""
    return np.fmax(image_variance - sum(np.nan_to_num(w) / k for _, w, k, _, _ in _sides(model, arm, baseline)), 0.0)


def delta_variance(model: SeedModel, arm: str, baseline: str, image_variance: np.ndarray) -> DeltaVariance:
    """C + each side's s²/k (own if unstable, else pooled), with Welch–Satterthwaite degrees of freedom over the
    s² terms (C known from the bootstrap: infinite df), capped at an unstable side's k − 1."""
    sides = _sides(model, arm, baseline)
    common = common_image_variance(model, arm, baseline, image_variance)
    own = [(s2 / k, df) for s2, _, k, df, source in sides if source == OWN]
    pooled = sum(1 / k for _, _, k, _, source in sides if source != OWN)
    terms = own + ([(model.pooled_sample * pooled, model.pooled_df)] if pooled else [])
    seed_part = np.sum([value for value, _ in terms], axis=0)
    total = common + seed_part
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.sum([value ** 2 / df for value, df in terms if df > 0], axis=0)
        df = np.where(denominator > 0, total ** 2 / denominator, np.inf)
    if own:
        df = np.minimum(df, min(d for _, d in own))
    sources = [source for *_, source in sides]
    no_variance = pooled and not np.isfinite(model.pooled_sample).any()
    source = NO_VARIANCE if no_variance else OWN if OWN in sources else BORROWED if BORROWED in sources else POOLED
    return DeltaVariance(common, seed_part, df, source)


def projected_variance(model: SeedModel, arm: str, baseline: str, image_variance: np.ndarray,
                       seeds: np.ndarray) -> np.ndarray:
    """Var(Δ) (len(seeds), F) if arm and baseline had `seeds` seeds each: C stays, the s² terms (seed noise and
    each model's own image noise) shrink with the seeds."""
    seeds = np.asarray(seeds, float)[:, None]
    common = common_image_variance(model, arm, baseline, image_variance)
    return common + sum(s2 for s2, *_ in _sides(model, arm, baseline)) / seeds


def projected_df(model: SeedModel, arm: str, baseline: str, seeds: np.ndarray) -> np.ndarray:
    """Degrees of freedom of the seed part at `seeds` seeds per arm (the pooled arms growing together)."""
    seeds = np.asarray(seeds, float)
    if model.arms[arm].unstable or model.arms[baseline].unstable:
        return seeds - 1
    stable_arms = sum(1 for s in model.arms.values() if s.k >= 2 and not s.unstable)
    return max(stable_arms, 1) * (seeds - 1)
