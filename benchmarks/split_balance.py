"""How evenly patient-wise splits keep each finding's prevalence, on the real NIH metadata (no images needed).

Compares, over several split seeds, the project's split (iterative stratification of per-patient positive-image
counts, trainable.data.nih.assign_patients) with iterative-stratification's own IterativeStratification (the
algorithm behind MultilabelStratifiedShuffleSplit) on per-patient labels, which it binarises; prints the largest
relative gap |prevalence in a split / overall prevalence - 1| over the 13 common findings and for Hernia, and the
time per split.

    .venv/bin/python benchmarks/split_balance.py [--csv ../shared/reference/nih/Data_Entry_2017_v2020.csv.gz]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainable.data.nih import assign_patients, parse_entries  # noqa: E402
from trainable.findings import FINDINGS  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "nih" / \
    "Data_Entry_2017_v2020.csv.gz"
FRACTIONS = {"test": 0.2, "val": 0.1, "train": 0.7}


def gaps(entries: pd.DataFrame, split: pd.Series) -> tuple[float, float]:
    overall = entries[list(FINDINGS)].mean()
    relative = (entries.assign(split=split).groupby("split")[list(FINDINGS)].mean() / overall - 1).abs()
    return float(relative.drop(columns="Hernia").to_numpy().max()), float(relative["Hernia"].max())


def library_split(entries: pd.DataFrame, seed: int) -> pd.Series:
    from iterstrat.ml_stratifiers import IterativeStratification
    positives = entries.groupby("patient_id")[list(FINDINGS)].sum()
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(positives))
    folds = IterativeStratification(positives.to_numpy()[order] > 0, np.array(list(FRACTIONS.values())), rng)
    split = np.empty(len(order), dtype=int)
    split[order] = folds
    return entries["patient_id"].map(pd.Series(np.array(list(FRACTIONS))[split], index=positives.index))


METHODS = {"iterative-stratification (binarised, per patient)": library_split,
           "project (positive-image counts, per patient)": lambda entries, seed: assign_patients(entries, FRACTIONS,
                                                                                                 seed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    entries = parse_entries(args.csv)
    print(f"{len(entries)} images, {entries['patient_id'].nunique()} patients; split {FRACTIONS}")
    for name, split_of in METHODS.items():
        results, seconds = [], []
        for seed in range(args.seeds):
            started = time.perf_counter()
            split = split_of(entries, seed)
            seconds.append(time.perf_counter() - started)
            results.append(gaps(entries, split))
        common, hernia = np.array(results).T
        print(f"{name}: max relative gap, 13 common findings: median {np.median(common):.2%}, worst "
              f"{common.max():.2%}; Hernia: median {np.median(hernia):.2%}, worst {hernia.max():.2%}; "
              f"{np.median(seconds):.2f} s per split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
