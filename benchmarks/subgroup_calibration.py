"""Error rates of the final report's subgroup gaps (dashboards/subgroups.py) on simulated test splits whose truth
is known: scores drawn per finding as `separation * label + patient effect + noise`, the same separation in every
group (null), or a smaller one for women on one finding (planted).

Prints, per attribute under the null, with standard errors over the simulations: how often a gap's unadjusted
test has p < 0.05 (the per-gap error, promised 5%: it checks the variance), how often its CI (at Holm's level for
the gap) lies above 0, and how often Holm keeps any gap of the attribute (the family-wise error, promised at most
5%); the sex gaps' spread over simulations relative to the standard errors the report claims; under the planted
gap: how often the planted finding's sex gap is kept (power) and how often another sex gap is; and how many gaps'
CI and Holm decision disagree (none should). The per-group table is computed without fairlearn's per-call
overhead (checked equal to the report's MetricFrame table first); the gaps are the report's own code.

    .venv/bin/python benchmarks/subgroup_calibration.py [--simulations 200] [--patients 200] [--workers 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average  # noqa: E402
from dashboards import subgroups  # noqa: E402
from dashboards.subgroups import MIN_CLASS_IMAGES, MIN_GROUP_IMAGES, UNDERDIAGNOSIS, subgroup_report  # noqa: E402
from trainable.findings import FINDINGS  # noqa: E402

PREVALENCE, SEPARATION, PLANTED_SEPARATION, PATIENT_SD = 0.2, 1.5, 0.5, 0.5
PLANTED = "Effusion"
ALPHA = 0.05


def simulate(rng: np.random.Generator, patients: int, planted: bool) -> tuple:
    images = rng.integers(1, 4, patients)
    patient = np.repeat(np.arange(patients), images)
    sex = np.repeat(np.where(rng.random(patients) < 0.55, "M", "F"), images)
    age = np.repeat(rng.uniform(1, 90, patients), images)
    view = np.where(rng.random(len(patient)) < 0.6, "PA", "AP")
    labels = (rng.random((len(patient), len(FINDINGS))) < PREVALENCE).astype(float)
    separation = np.full(labels.shape, SEPARATION)
    if planted:
        separation[sex == "F", FINDINGS.index(PLANTED)] = PLANTED_SEPARATION
    effect = rng.normal(0, PATIENT_SD, (patients, len(FINDINGS)))[patient]
    scores = separation * labels + effect + rng.normal(0, 1, labels.shape)
    probs = 1 / (1 + np.exp(-(scores - 1.5)))
    frame = pd.DataFrame({"patient_id": patient, "sex": sex, "age": age, "view": view})
    return frame, labels, probs, np.full(len(FINDINGS), 0.5)


def _share(hits: list[bool]) -> str:
    """A share over simulations with its binomial standard error."""
    p = float(np.mean(hits))
    return f"{p:.3f} ± {np.sqrt(p * (1 - p) / len(hits)):.3f}"


def _with_error(per_simulation: pd.DataFrame) -> dict[str, str]:
    """attribute -> mean over simulations (columns) ± its standard error (the simulations' spread / sqrt(n))."""
    n = per_simulation.shape[1]
    return {attribute: f"{row.mean():.3f} ± {row.std(ddof=1) / np.sqrt(n):.3f}"
            for attribute, row in per_simulation.iterrows()}


def fast_group_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, groups: pd.Series
                       ) -> pd.DataFrame:
    """subgroups.group_metrics' table without fairlearn's and sklearn's per-call overhead (most of a report's time
    under load): the same Mann-Whitney AUCs and shares, checked equal to it at the start of every run."""
    codes, table = groups.to_numpy(), {}
    sick = (labels > 0.5).any(axis=1)
    missed = ~(probs >= thresholds).any(axis=1)
    for group in sorted(set(codes)):
        rows = codes == group
        row = {}
        for k, finding in enumerate(FINDINGS):
            y = labels[rows, k] > 0.5
            positives, negatives = int(y.sum()), int((~y).sum())
            row[finding] = ((rankdata(probs[rows, k])[y].sum() - positives * (positives + 1) / 2)
                            / (positives * negatives) if min(positives, negatives) >= MIN_CLASS_IMAGES else np.nan)
        row[UNDERDIAGNOSIS] = missed[rows & sick].mean() if (rows & sick).sum() >= MIN_GROUP_IMAGES else np.nan
        table[group] = row
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("group")


def _check_fast_group_metrics(patients: int) -> None:
    frame, labels, probs, thresholds = simulate(np.random.default_rng(12345), patients, planted=True)
    for of in subgroups.ATTRIBUTES.values():
        groups = of(frame)
        slow, fast = subgroups.group_metrics(labels, probs, thresholds, groups), fast_group_metrics(
            labels, probs, thresholds, groups)
        pd.testing.assert_frame_equal(fast, slow.astype(np.float64), check_names=False, check_index_type=False,
                                      check_column_type=False, atol=1e-12)


def one_simulation(seed: np.random.SeedSequence, patients: int) -> dict:
    """A null and a planted test split, their reports and what the promises are checked on."""
    subgroups.group_metrics = fast_group_metrics           # the same table, faster (checked in main)
    rng = np.random.default_rng(seed)
    null = subgroup_report(*simulate(rng, patients, planted=False)).gaps
    planted = subgroup_report(*simulate(rng, patients, planted=True)).gaps
    sex = planted.loc["sex"]
    by_attribute = null.groupby(level="attribute")
    return {"ci": (null["gap_ci_low"] > 0).groupby(level="attribute").mean(),
            "test": (null["p_value"] < ALPHA).groupby(level="attribute").mean(),
            "holm": by_attribute["gap_holm"].any(),
            # the sex gap is |difference| of two independent groups: its mean square over the SE's is the
            # variance over simulations relative to the variance the method claims
            "sex_squares": (float(np.nansum(null.loc["sex", "gap"] ** 2 * np.isfinite(null.loc["sex", "gap_se"]))),
                            float(np.nansum(null.loc["sex", "gap_se"] ** 2))),
            "power": bool(sex.loc[PLANTED, "gap_holm"] and sex.loc[PLANTED, "gap_ci_low"] > 0),
            "other": bool(sex.drop(index=PLANTED)["gap_holm"].any()),
            "disagree": int(((null["gap_ci_low"] > 0) != null["gap_holm"]).sum()
                            + ((planted["gap_ci_low"] > 0) != planted["gap_holm"]).sum())}


def summarise(results: list[dict], args: argparse.Namespace, started: float, load: str) -> None:
    n = len(results)
    squares = np.array([result["sex_squares"] for result in results]).sum(axis=0)
    print(f"{n} simulations x 2, {args.patients} patients, {args.workers} workers; "
          f"{time.perf_counter() - started:.0f} s, load average at start {load}, now {load_average()}")
    print(f"null: per-gap share of unadjusted tests p < {ALPHA} (promised {ALPHA}) ± SE over simulations:",
          _with_error(pd.concat([result["test"] for result in results], axis=1)))
    print("null: per-gap share of CIs above 0 (promised <= 0.05) ± SE over simulations:",
          _with_error(pd.concat([result["ci"] for result in results], axis=1)))
    print("null: share of simulations with any Holm-kept gap (family-wise, promised <= 0.05) ± binomial SE:",
          _with_error(pd.concat([result["holm"] for result in results], axis=1).astype(float)))
    print(f"null: sex gaps' spread over simulations / their claimed SE: {np.sqrt(squares[0] / squares[1]):.3f}")
    print(f"planted ({PLANTED} separation {PLANTED_SEPARATION} for F vs {SEPARATION}): kept with CI above 0 in "
          f"{_share([result['power'] for result in results])} of simulations; another sex gap kept in "
          f"{_share([result['other'] for result in results])}")
    print(f"gaps whose CI excludes 0 but Holm does not keep, or the reverse: "
          f"{sum(result['disagree'] for result in results)} of {n * 2 * 45}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=200)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes (simulations are independent)")
    parser.add_argument("--every", type=int, default=25, help="print the figures so far every this many simulations")
    args = parser.parse_args()
    seeds = np.random.SeedSequence(args.seed).spawn(args.simulations)
    started, load = time.perf_counter(), load_average()
    _check_fast_group_metrics(args.patients)
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        for result in pool.map(one_simulation, seeds, [args.patients] * args.simulations):
            results.append(result)
            if len(results) % args.every == 0 and len(results) < args.simulations:
                summarise(results, args, started, load)          # so far, in case the run is cut short
    summarise(results, args, started, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
