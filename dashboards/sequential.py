"""Group-sequential boundaries for sweeps that add seeds until every arm is decided (`--until-decided`).

Looking at a comparison after every round of seeds and stopping as soon as it is significant inflates its error
rate: five looks at a nominal 5% reject a true null about 14% of the time. The rule used here is Lan–DeMets
alpha spending with the O'Brien–Fleming-type function

    α(t) = 2 − 2 Φ(Φ⁻¹(1 − α/2) / √t),   t = information fraction = seeds at this look / planned max seeds,

for each one-sided test: the crossing probability spent by look j is α(t_j), so the overall probability of ever
crossing is α however many looks there are (Lan & DeMets 1983). It spends almost nothing early (t = 1/4 of
the seeds: 0.00009 of α = 0.05) and leaves the last look near the fixed-sample level (4 looks: 0.043), so a
sweep that runs to its budget loses little power. Boundaries are computed on the z scale (the score process is
Brownian motion in the information) by recursive numerical integration, then applied as nominal p-value
levels to the t-based p-values of the effect analysis (the usual approximation for estimated variances; the
calibration benchmark measures the resulting error rate).

A comparison with a history of looks gets a *repeated p-value* (Jennison & Turnbull 2000, §9.1): the smallest
overall level γ at which its boundary would have been crossed at some look so far. With one look it is the
ordinary p-value. Holm's procedure on repeated p-values is the group-sequential Holm procedure of Maurer &
Bretz (2013): a rejected hypothesis passes its level on to the others, for all their looks.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

GRID_POINTS = 301             # integration grid per look (on the score scale)
MAX_Z = 30.0                  # boundaries are capped here (a nominal level of 5e-198)
LOWEST_LEVEL = 1e-10          # repeated p-values are not resolved below this
LEVEL_GRID = np.geomspace(LOWEST_LEVEL, 0.5, 61)   # one-sided: above 1/2 the estimate points the other way


def obrien_fleming_spending(t: np.ndarray | float, alpha: float) -> np.ndarray:
    """Lan–DeMets O'Brien–Fleming-type spending: the error probability used up by information fraction t."""
    t = np.clip(np.asarray(t, dtype=float), 1e-12, 1.0)
    return 2 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(t))      # as 2 − 2Φ(·), without underflow


def look_fractions(seeds: Sequence[int], max_seeds: int) -> tuple[float, ...]:
    """Information fractions of looks after `seeds` seeds each (increasing), out of `max_seeds`."""
    seeds = [int(s) for s in seeds]
    if any(b <= a for a, b in zip(seeds, seeds[1:])) or not 0 < seeds[0] or seeds[-1] > max_seeds:
        raise ValueError(f"looks at seeds {seeds} must increase within 1..{max_seeds}")
    return tuple(s / max_seeds for s in seeds)


def one_sided_boundaries(fractions: Sequence[float], alpha: float) -> np.ndarray:
    """z boundaries c_1..c_J of a one-sided test at overall level alpha with looks at these fractions.

    Recursion on the score S(t) = Z(t)·√t (Brownian motion): the sub-density of S at look j over the region
    where the test has not yet crossed is propagated on a grid, and c_j solves P(first crossing at j) =
    α(t_j) − α(t_{j−1}).
    """
    t = np.asarray(fractions, dtype=float)
    spent = obrien_fleming_spending(t, alpha)
    bounds = np.empty(len(t))
    bounds[0] = stats.norm.isf(spent[0])
    low = -10.0 * np.sqrt(t[-1])                     # continuation density below this is negligible
    grid = np.linspace(low, bounds[0] * np.sqrt(t[0]), GRID_POINTS)
    density = stats.norm.pdf(grid, scale=np.sqrt(t[0]))
    for j in range(1, len(t)):
        step = np.sqrt(t[j] - t[j - 1])
        weights = _trapezoid_weights(grid) * density
        target = spent[j] - spent[j - 1]

        def crossing(c: float) -> float:
            return float(weights @ special.ndtr((grid - c * np.sqrt(t[j])) / step)) - target

        # on the log scale of the crossing probability, so that tiny levels are solved as exactly as large ones
        def log_crossing(c: float) -> float:
            return float(np.log(max(crossing(c) + target, 1e-300)) - np.log(target))

        bounds[j] = (MAX_Z if target <= 0 or log_crossing(MAX_Z) >= 0
                     else optimize.brentq(log_crossing, -MAX_Z, MAX_Z, xtol=1e-9) if log_crossing(-MAX_Z) > 0
                     else -MAX_Z)
        new_grid = np.linspace(low, max(bounds[j] * np.sqrt(t[j]), low + 1.0), GRID_POINTS)
        kernel = np.exp(-0.5 * ((new_grid[:, None] - grid[None, :]) / step) ** 2) / (step * np.sqrt(2 * np.pi))
        grid, density = new_grid, kernel @ weights
    return bounds


def _trapezoid_weights(grid: np.ndarray) -> np.ndarray:
    h = np.diff(grid)
    weights = np.zeros_like(grid)
    weights[:-1] += h / 2
    weights[1:] += h / 2
    return weights


@lru_cache(maxsize=64)
def _level_table(fractions: tuple[float, ...]) -> np.ndarray:
    """(levels in LEVEL_GRID, looks): the nominal one-sided p-value level at each look for each overall level."""
    return np.array([stats.norm.sf(one_sided_boundaries(fractions, level)) for level in LEVEL_GRID])


def nominal_levels(fractions: Sequence[float], alpha: float) -> np.ndarray:
    """Nominal one-sided p-value level of each look for an overall one-sided level alpha."""
    return stats.norm.sf(one_sided_boundaries(tuple(fractions), alpha))


def repeated_p_value(p_values: Sequence[float], fractions: Sequence[float]) -> float:
    """The smallest overall one-sided level at which one-sided p-values p_values[j] (at looks with these
    information fractions) cross the spending boundary at some look; p itself with a single look at t = 1."""
    p = np.asarray(p_values, dtype=float)
    if len(p) != len(fractions):
        raise ValueError(f"{len(p)} p-values for {len(fractions)} looks")
    if not np.isfinite(p).any():
        return float("nan")
    if len(p) == 1 and fractions[0] == 1.0:
        return float(p[0])
    table = _level_table(tuple(float(f) for f in fractions))      # (levels, looks), increasing down each column
    crossing = []
    for j, value in enumerate(p):
        if not np.isfinite(value):
            continue
        column = np.log(np.maximum(table[:, j], 1e-300))
        crossing.append(_interpolate_level(np.log(max(value, 1e-300)), column))
    return float(min(crossing))


def _interpolate_level(log_p: float, log_column: np.ndarray) -> float:
    """Overall level at which this look's nominal level equals p (log-log interpolation in the table)."""
    if log_p <= log_column[0]:
        return LOWEST_LEVEL
    if log_p >= log_column[-1]:
        return 1.0
    return float(np.exp(np.interp(log_p, log_column, np.log(LEVEL_GRID))))


def final_look_level(fractions: Sequence[float], level: float) -> float:
    """The two-sided nominal level of the last look of a design whose overall two-sided level is `level`."""
    if list(fractions) == [1.0] or not np.isfinite(level):
        return level
    return float(2 * nominal_levels(tuple(fractions), level / 2)[-1])
