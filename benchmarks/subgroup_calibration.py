"""Error rates of the final report's subgroup gaps (dashboards/subgroups.py) on simulated test splits whose truth
is known: scores drawn per finding as `separation * label + patient effect + noise`, the same separation in every
group (null), or a smaller one for women on one finding (planted).

Prints, per attribute under the null: how often the gap's 95% CI excludes 0 per metric (the per-gap error the CI
promises to keep at 5%, or below: Bonferroni over the pairs of groups) and how often Holm keeps any gap of the
attribute (the family-wise error, promised at most 5%); under the planted gap: how often the planted finding's
sex gap is kept (power) and how often another sex gap is.

    .venv/bin/python benchmarks/subgroup_calibration.py [--simulations 100] [--patients 200] [--boot 200]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average  # noqa: E402
from dashboards.subgroups import subgroup_report  # noqa: E402
from trainable.findings import FINDINGS  # noqa: E402

PREVALENCE, SEPARATION, PLANTED_SEPARATION, PATIENT_SD = 0.2, 1.5, 0.5, 0.5
PLANTED = "Effusion"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulations", type=int, default=100)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--boot", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started, load = time.perf_counter(), load_average()
    null_ci, null_holm, power, other = [], [], [], []
    for _ in range(args.simulations):
        gaps = subgroup_report(*simulate(rng, args.patients, planted=False), n_boot=args.boot,
                               seed=int(rng.integers(1 << 31))).gaps
        null_ci.append((gaps["gap_ci_low"] > 0).groupby(level="attribute").mean())
        null_holm.append(gaps["gap_holm"].groupby(level="attribute").any())
        sex = subgroup_report(*simulate(rng, args.patients, planted=True), n_boot=args.boot,
                              seed=int(rng.integers(1 << 31))).gaps.loc["sex"]
        power.append(bool(sex.loc[PLANTED, "gap_holm"] and sex.loc[PLANTED, "gap_ci_low"] > 0))
        other.append(bool(sex.drop(index=PLANTED)["gap_holm"].any()))
    print(f"{args.simulations} simulations x 2, {args.patients} patients, {args.boot} resamples; "
          f"{time.perf_counter() - started:.0f} s, load average at start {load}, at the end {load_average()}")
    print("null: per-gap share of CIs above 0 (promised <= 0.05), ± its standard error over simulations:",
          _with_error(pd.concat(null_ci, axis=1)))
    print("null: share of simulations with any Holm-kept gap (family-wise, promised <= 0.05) ± binomial SE:",
          _with_error(pd.concat(null_holm, axis=1).astype(float)))
    print(f"planted ({PLANTED} separation {PLANTED_SEPARATION} for F vs {SEPARATION}): kept with CI above 0 in "
          f"{_share(power)} of simulations; another sex gap kept in {_share(other)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
