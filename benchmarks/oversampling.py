"""Drawing one oversampled epoch: torch's WeightedRandomSampler (what BatchLoader uses) vs numpy's rng.choice(p=...)
(what it used before), on the real NIH labels (112,120 images) with the `rare` oversampler's weights.

Prints, per method, the median wall and CPU time to draw one epoch's indices (N draws with replacement), and how
far each finding's share of positive draws over `--epochs` epochs lies from the share the weights predict
(expected: sum of the weights of the finding's positive images / sum of all weights), as a z-score.

    .venv/bin/python benchmarks/oversampling.py [--csv ../shared/reference/nih/Data_Entry_2017_v2020.csv.gz]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average  # noqa: E402
from trainable.data.loader import OVERSAMPLERS, BatchLoader  # noqa: E402
from trainable.data.nih import parse_entries  # noqa: E402
from trainable.findings import FINDINGS  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "nih" / \
    "Data_Entry_2017_v2020.csv.gz"


def numpy_choice(weights: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The former BatchLoader.order for weighted epochs."""
    return np.random.default_rng([seed, epoch]).choice(len(weights), size=len(weights), replace=True,
                                                       p=weights / weights.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--power", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = parse_entries(args.csv)[list(FINDINGS)].to_numpy(np.float32)
    weights = OVERSAMPLERS["rare"](labels, args.power)
    count = len(labels)
    loader = BatchLoader(np.zeros((count, 1, 1), np.uint8), labels, np.zeros((count, 0), np.float32),
                         batch_size=64, shuffle=True, weights=weights, seed=0, prefetch=0)
    methods = {"torch WeightedRandomSampler (BatchLoader.order)": loader.order,
               "numpy Generator.choice(p=...) (former)": lambda epoch: numpy_choice(weights, 0, epoch)}
    positive = labels > 0.5
    expected = (weights[:, None] * positive).sum(axis=0) / weights.sum()
    print(f"{count} images, rare oversampler power {args.power}, {args.epochs} epochs; load average "
          f"{load_average()}")
    for name, draw in methods.items():
        wall, cpu, hits = [], [], np.zeros(len(FINDINGS))
        for epoch in range(args.epochs):
            started, started_cpu = time.perf_counter(), time.process_time()
            order = draw(epoch)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            hits += positive[order].sum(axis=0)
        draws = args.epochs * count
        z = (hits / draws - expected) / np.sqrt(expected * (1 - expected) / draws)
        print(f"{name}: {statistics.median(wall) * 1000:.1f} ms wall, {statistics.median(cpu) * 1000:.1f} ms CPU "
              f"per epoch (median); per-finding share of draws vs the weights: max |z| {np.abs(z).max():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
