"""False-call rate of the ablation report's subgroup-gap rows on null sweeps, whose truth is known.

    .venv/bin/python benchmarks/subgroup_gap_calibration.py [--sweeps 40] [--n-boot 200]

Each sweep: dashboards/simulate.py, a baseline and one arm identical to it in distribution, 3 seeds each, 1500
validation images, metadata from simulate_metadata; dashboards/subgroup_gaps.py's Δ gap rows (sex, age band, view
× mean AUC, underdiagnosis: 6 rows, Benjamini–Hochberg at α = 0.05). Under this complete null every call is false:
the share of sweeps with any call estimates the family-wise rate (= FDR here), target ≤ 5%; the share of rows with
a raw p < 0.05 checks the per-row test, target 5%.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboards.simulate import simulate_metadata, simulate_sweep  # noqa: E402
from dashboards.subgroup_gaps import NARROWS, WIDENS, gap_rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", type=int, default=40)
    parser.add_argument("--n-boot", type=int, default=200)
    args = parser.parse_args()
    started, any_call, raw, rows = time.perf_counter(), 0, 0, 0
    for sweep in range(args.sweeps):
        arms = simulate_sweep({arm: np.ones(14) for arm in ("baseline", "twin")}, n_seeds=3, n_images=1500,
                              prevalence_floor=0.05, seed=100 + sweep)
        table, _ = gap_rows(arms, "baseline", simulate_metadata(arms["baseline"][0].images, seed=sweep),
                            n_boot=args.n_boot)
        any_call += bool(table["verdict"].isin([WIDENS, NARROWS]).any())
        raw += int((table["p_value"] < 0.05).sum())
        rows += len(table)
    n = args.sweeps
    print(f"{n} null sweeps, {rows} gap rows, {time.perf_counter() - started:.0f} s")
    print(f"sweeps with any call (family-wise = FDR under the null): {any_call / n:.3f} "
          f"(± {np.sqrt(0.05 * 0.95 / n):.3f} binomial SE at 5%)")
    print(f"rows with raw p < 0.05: {raw / rows:.3f} (± {np.sqrt(0.05 * 0.95 / rows):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
