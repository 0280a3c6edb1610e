"""Error rates, coverage, interval width and power of the effect analysis, on simulated sweeps whose truth is known.

    .venv/bin/python benchmarks/effect_calibration.py              # the recorded run: ~8 minutes on 2 idle cores
    .venv/bin/python benchmarks/effect_calibration.py --minutes 20 # a busy machine: report on the sweeps done by then

The default 200 null sweeps resolve a 5% error rate to ±1.6% (binomial standard error), the 400 unstable-arm
sweeps a 95% coverage to ±1.1%; --sweeps 600 takes ~9 minutes more and resolves ±0.9%.

Every sweep comes from dashboards/simulate.py (2000 validation images from ~1000 patients, NIH prevalences floored
at 2%, seed-level noise on) and is analysed by dashboards/effects.py exactly as a report is: the shared patient
bootstrap, the variance model, the families, the verdicts (margin 0.005, α = 0.05).

1. Null sweeps: 6 arms (a baseline and 5 arms identical to it in distribution) × 12 seeds each.
   - the first 3 seeds of every arm (6 arms × 3 seeds) are analysed as a fixed sweep: the family-wise
     false-call rate of the primary family (any Δ mean AUC called helps/hurts), the false discovery rate of the
     secondary family (under a complete null every call is false: FDR = P(any per-finding call)), coverage of
     the 95% interval of Δ mean AUC (truth 0) and its median half-width over the known-variance oracle's
     (1.96 × the Monte-Carlo standard deviation of Δ);
   - the same sweeps under `--until-decided` (looks at 3, 6, 9, 12 seeds; arms stop once decided): the family-
     wise false-call rate of the sequential rule, and for contrast that of stopping at the first fixed-sample
     Holm call (no alpha spending).
2. One unstable arm: the same 6 × 3 sweep with one arm at 3× the others' seed spread: coverage of its interval
   (truth: dashboards.simulate.expected_delta, its expected mean AUC differs, as AUC is concave) and of the
   others'.
3. Power: 6 arms × 2, 3, 5 and 8 seeds, one arm with a planted Δ mean AUC of about 0.02: the median smallest
   detectable Δ (80% power at the primary family's level) the analysis reports for the null arms, the seeds it
   says would decide at the margin, and the measured power to call the planted arm `helps`.

Targets (issue 9): family-wise rate ≤ 5% and FDR ≤ 5% within Monte-Carlo error; coverage 93–97% with equal arms
and with the unstable arm; median width ≤ 1.25 × oracle; sequential family-wise rate ≤ 5%.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import command_line, load_average, machine_info, print_header, usable_cores  # noqa: E402

from dashboards.effects import (DECIDED, HELPS, HURTS, MEAN, PRIMARY, SECONDARY, SeedRounds, analyse,  # noqa: E402
                                resample)
from dashboards.simulate import delta_draws, simulate_sweep  # noqa: E402
from trainable.metrics import choose_thresholds  # noqa: E402

ARMS = ("baseline", "a1", "a2", "a3", "a4", "a5")
SEED_SD, UNSTABLE_SCALE, PLANTED_SIGNAL = 0.15, 3.0, 1.19
FIXED_SEEDS, ROUNDS = 3, SeedRounds(initial=3, max_seeds=12, step=3)
POWER_SEEDS = (2, 3, 5, 8)
MARGIN, ALPHA, N_IMAGES = 0.005, 0.05, 2000
CALLS = (HELPS, HURTS)
TRUTH_MODELS = 150           # Monte-Carlo SE of the unstable arm's true Δ: ~0.0006, against intervals of ±0.05


def _worker_init() -> None:
    # statsmodels' Holm calls gc.collect(); with the analysis' objects frozen out of the collector it is cheap
    gc.freeze()
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def primary(table):
    return table[table["family"] == PRIMARY].set_index("arm")


def null_sweep(job: tuple[int, int]) -> dict:
    replicate, n_boot = job
    arms = with_thresholds(simulate_sweep(dict.fromkeys(ARMS, 1.0), n_seeds=ROUNDS.max_seeds, n_images=N_IMAGES,
                                          seed_sd=SEED_SD, seed=10_000 + replicate, thresholds=False), FIXED_SEEDS)
    resampled = resample(arms, "baseline", n_boot=n_boot, seed=replicate)
    fixed = analyse(resampled.first_seeds(dict.fromkeys(ARMS, FIXED_SEEDS)), "baseline", margin=MARGIN,
                    alpha=ALPHA).table
    head = primary(fixed)
    sequential = analyse(resampled, "baseline", margin=MARGIN, alpha=ALPHA, rounds=ROUNDS)
    seq_head = primary(sequential.table)
    return {"fwer": bool(head["verdict"].isin(CALLS).any()),
            "secondary_calls": int(fixed.loc[fixed["family"] == SECONDARY, "verdict"].isin(CALLS).sum()),
            "delta": head["delta"].to_numpy(), "half_width": ((head["ci_high"] - head["ci_low"]) / 2).to_numpy(),
            "mde": head["mde"].to_numpy(), "own": (head["variance"] != "pooled").to_numpy(),
            "sequential_fwer": bool(seq_head["verdict"].isin(CALLS).any()),
            "sequential_seeds": seq_head["n_seeds"].to_numpy(),
            "naive_fwer": naive_sequential_call(resampled)}


def with_thresholds(arms: dict, seeds: int) -> dict:
    """F1 thresholds chosen as a trial chooses them, for the first `seeds` seeds of each arm only: the later
    seeds feed only the sequential primary family (mean AUC), and choosing thresholds is most of a sweep's cost."""
    return {arm: [replace(trial, thresholds=choose_thresholds(trial.labels, trial.probs)) if s < seeds else trial
                  for s, trial in enumerate(trials)] for arm, trials in arms.items()}


def naive_sequential_call(resampled) -> bool:
    """Stop an arm at the first look where its fixed-sample Holm verdict is decided: any false call?"""
    active = set(ARMS[1:])
    seeds = dict.fromkeys(ARMS, ROUNDS.initial)
    for planned in ROUNDS.looks:
        for arm in (*active, "baseline"):
            seeds[arm] = planned
        verdicts = primary(analyse(resampled.first_seeds(seeds), "baseline", margin=MARGIN, alpha=ALPHA).table)
        if verdicts.loc[list(active), "verdict"].isin(CALLS).any():
            return True
        active -= {arm for arm in active if verdicts.loc[arm, "verdict"] in DECIDED}
        if not active:
            return False
    return False


def unstable_sweep(job: tuple[int, int]) -> dict:
    replicate, n_boot = job
    spreads = {arm: SEED_SD * (UNSTABLE_SCALE if arm == "a1" else 1.0) for arm in ARMS}
    arms = simulate_sweep(dict.fromkeys(ARMS, 1.0), n_seeds=FIXED_SEEDS, n_images=N_IMAGES, seed_sd=spreads,
                          seed=20_000 + replicate, thresholds=False)
    head = primary(analyse(resample(arms, "baseline", n_boot=n_boot, seed=replicate), "baseline", margin=MARGIN,
                           alpha=ALPHA).table)
    return {"delta": head["delta"].to_numpy(), "low": head["ci_low"].to_numpy(), "high": head["ci_high"].to_numpy(),
            "own": (head["variance"] != "pooled").to_numpy()}


def power_sweep(job: tuple[int, int]) -> dict:
    replicate, n_boot = job
    signals = {**dict.fromkeys(ARMS[:-1], 1.0), "planted": PLANTED_SIGNAL}
    arms = simulate_sweep(signals, n_seeds=max(POWER_SEEDS), n_images=N_IMAGES, seed_sd=SEED_SD,
                          seed=30_000 + replicate, thresholds=False)
    resampled = resample(arms, "baseline", n_boot=n_boot, seed=replicate)
    out = {}
    for seeds in POWER_SEEDS:
        head = primary(analyse(resampled.first_seeds(dict.fromkeys(signals, seeds)), "baseline", margin=MARGIN,
                               alpha=ALPHA).table)
        nulls = head.drop(index="planted")
        out[seeds] = {"found": head.loc["planted", "verdict"] == HELPS, "mde": nulls["mde"].median(),
                      "to_decide": nulls["seeds_to_decide"].median(),
                      "false": bool(nulls["verdict"].isin(CALLS).any())}
    return out


def true_delta(pool, workers: int, arm, baseline, n_models: int) -> tuple[float, float]:
    """dashboards.simulate's expected Δ (mean, Monte-Carlo SE), its model draws split over the workers."""
    chunks = np.array_split(np.arange(n_models), 4 * workers)
    draws = np.concatenate(pool.starmap(delta_draws, [(arm, baseline, list(c)) for c in chunks if len(c)]))
    return float(draws.mean()), float(draws.std(ddof=1) / np.sqrt(len(draws)))


SIMULATIONS = {"null": null_sweep, "unstable": unstable_sweep, "power": power_sweep}


def run_job(job: tuple[str, int, int]) -> tuple[str, dict, float]:
    kind, replicate, n_boot = job
    cpu = time.process_time()
    return kind, SIMULATIONS[kind]((replicate, n_boot)), time.process_time() - cpu


def interleaved(counts: dict[str, int], n_boot: int) -> list[tuple[str, int, int]]:
    """Every kind's sweeps in one stream, each kind spread evenly over it: a run stopped early (--minutes) has
    done about the same share of each."""
    jobs = [(kind, r, n_boot) for kind, n in counts.items() for r in range(n)]
    return sorted(jobs, key=lambda job: (job[1] + 0.5) / counts[job[0]])


def binomial_se(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 1e-12) / n))


def rate(values, what: str, target: str) -> str:
    p = float(np.mean(values))
    return f"  {what:<58} {p:6.1%}  ± {binomial_se(p, len(values)):.1%}   target {target}"


def print_nulls(nulls: list[dict], n_boot: int) -> None:
    deltas = np.concatenate([n["delta"] for n in nulls])
    half = np.concatenate([n["half_width"] for n in nulls])
    oracle = 1.96 * deltas.std(ddof=1)
    covered = np.abs(deltas) <= half
    width_ratio = np.median(half) / oracle
    seeds_used = np.concatenate([n["sequential_seeds"] for n in nulls])

    print(f"\n{len(nulls)} null sweeps of 6 arms × {FIXED_SEEDS} seeds ({len(nulls) * 5} comparisons), "
          f"{N_IMAGES} images, {n_boot} bootstrap replicates, margin {MARGIN}, α {ALPHA}:")
    print(rate([n["fwer"] for n in nulls], "family-wise false-call rate, primary (Holm)", "<= 5%"))
    print(rate([n["secondary_calls"] > 0 for n in nulls], "false discovery rate, per-finding AUC/F1 (BH)", "<= 5%"))
    print(f"  {'secondary calls per sweep (140 null rows)':<58} {np.mean([n['secondary_calls'] for n in nulls]):6.3f}")
    print(rate(covered, "coverage of the 95% interval of Δ mean AUC, equal arms", "93-97%"))
    print(f"  {'comparisons judged by an arm flagged unstable (own variance)':<58} "
          f"{np.concatenate([n['own'] for n in nulls]).mean():6.1%}")
    print(f"  {'median half-width / known-variance oracle':<58} {width_ratio:6.2f}   (oracle {oracle:.4f}, median "
          f"half-width {np.median(half):.4f})   target <= 1.25")
    print(f"\nthe same sweeps under --until-decided (looks at {', '.join(map(str, ROUNDS.looks))} seeds, "
          f"O'Brien-Fleming alpha spending):")
    print(rate([n["sequential_fwer"] for n in nulls], "family-wise false-call rate, primary", "<= 5%"))
    print(rate([n["naive_fwer"] for n in nulls], "for contrast: stopping at the first fixed-sample Holm call", "-"))
    print(f"  {'mean seeds per arm used':<58} {seeds_used.mean():6.2f}")


def print_unstable(unstable: list[dict], truth_unstable: float) -> None:
    low = np.stack([u["low"] for u in unstable])
    high = np.stack([u["high"] for u in unstable])
    delta_u = np.stack([u["delta"] for u in unstable])
    truth = np.zeros(low.shape[1])
    truth[0] = truth_unstable                                   # column 0 is arm a1, the unstable one
    covered_u = (low <= truth) & (truth <= high)
    oracle_u = 1.96 * delta_u[:, 0].std(ddof=1)
    own = np.stack([u["own"] for u in unstable])

    print(f"\n{len(unstable)} sweeps of 6 arms × {FIXED_SEEDS} seeds, arm a1 at {UNSTABLE_SCALE:g}× the seed "
          f"spread (true Δ {truth_unstable:+.4f}):")
    print(rate(covered_u[:, 0], "coverage of the unstable arm's 95% interval", "93-97%"))
    print(rate(covered_u[:, 1:].ravel(), "coverage of the other arms' intervals", "93-97%"))
    print(f"  {'unstable arm given its own variance (flagged)':<58} {own[:, 0].mean():6.1%}   other arms "
          f"{own[:, 1:].mean():.1%}")
    print(f"  {'unstable arm: median half-width / its oracle':<58} "
          f"{np.median((high[:, 0] - low[:, 0]) / 2) / oracle_u:6.2f}")


def print_power(powers: list[dict], planted: float) -> None:
    print(f"\npower table: 6 arms, one with a planted Δ mean AUC of {planted:+.4f}, {len(powers)} sweeps per "
          f"row; Holm over 5 comparisons")
    print(f"  {'seeds/arm':>9}  {'median mde (80% power)':>22}  {'power at Δ 0.02':>15}  {'null FWER':>9}  "
          f"{'median seeds to decide at 0.005':>31}")
    for seeds in POWER_SEEDS:
        rows = [p[seeds] for p in powers]
        mde, found = np.median([r["mde"] for r in rows]), np.mean([r["found"] for r in rows])
        print(f"  {seeds:>9}  {mde:>22.4f}  {found:>15.0%}"
              f"  {np.mean([r['false'] for r in rows]):>9.1%}  {np.nanmedian([r['to_decide'] for r in rows]):>31.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", type=int, default=200, help="null sweeps (default: 200)")
    parser.add_argument("--unstable-sweeps", type=int, default=400, help="sweeps with one unstable arm (default: 400)")
    parser.add_argument("--power-sweeps", type=int, default=60, help="sweeps per power row (default: 60)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates per sweep (default: 200)")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="processes (default: all cores)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this many minutes and report on the sweeps done (a busy machine)")
    args = parser.parse_args(argv)
    info = machine_info()
    print_header("effect analysis calibration", info, command_line())
    started = time.perf_counter()
    done: dict[str, list] = {kind: [] for kind in SIMULATIONS}
    cpu_seconds: dict[str, list] = {kind: [] for kind in SIMULATIONS}
    counts = {"null": args.sweeps, "unstable": args.unstable_sweeps, "power": args.power_sweeps}
    with get_context("spawn").Pool(args.workers, initializer=_worker_init) as pool:
        truth_unstable, truth_se = true_delta(pool, args.workers, (1.0, SEED_SD * UNSTABLE_SCALE), (1.0, SEED_SD),
                                              TRUTH_MODELS)
        planted, planted_se = true_delta(pool, args.workers, (PLANTED_SIGNAL, SEED_SD), (1.0, SEED_SD), 20)
        print(f"truth: unstable arm Δ mean AUC {truth_unstable:+.4f} ± {truth_se:.4f}; planted Δ {planted:+.4f} "
              f"± {planted_se:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        jobs = interleaved(counts, args.n_boot)
        for finished, (kind, result, cpu) in enumerate(pool.imap_unordered(run_job, jobs), start=1):
            done[kind].append(result)
            cpu_seconds[kind].append(cpu)
            if finished % 50 == 0:
                print(f"{finished}/{len(jobs)} sweeps ({time.perf_counter() - started:.0f} s, load "
                      f"{load_average()})", flush=True)
            if args.minutes is not None and time.perf_counter() - started > 60 * args.minutes:
                print(f"--minutes {args.minutes:g} reached after {finished} of {len(jobs)} sweeps", flush=True)
                pool.terminate()
                break
    elapsed = time.perf_counter() - started
    nulls, unstable, powers = done["null"], done["unstable"], done["power"]

    if nulls:
        print_nulls(nulls, args.n_boot)
    if unstable:
        print_unstable(unstable, truth_unstable)
    if powers:
        print_power(powers, planted)
    per_sweep = ", ".join(f"{kind} {np.mean(seconds):.1f} s" for kind, seconds in cpu_seconds.items() if seconds)
    cpu_minutes = sum(map(sum, cpu_seconds.values())) / 60
    print(f"\ntotal {elapsed / 60:.1f} min on {args.workers} workers, load average at the end {load_average()}; "
          f"the sweeps took {cpu_minutes:.1f} CPU-minutes ({per_sweep} per sweep): about {cpu_minutes / 2:.0f} "
          f"minutes on 2 idle cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
