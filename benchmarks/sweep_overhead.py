"""Ray Tune's overhead: K fixed-length trials through a local Ray Tune vs the same calls in a plain loop.

    .venv/bin/python benchmarks/sweep_overhead.py                       # ~3.5 minutes
    .venv/bin/python benchmarks/sweep_overhead.py --trial-seconds 5     # quick look (overhead weighs more)

Each trial is a function that runs for a fixed wall time (--trial-seconds, default 30) and reports --reports
times through `tune.report` (in the plain loop the same function gets a no-op report). Tune runs the K trials
with 1 CPU each, --concurrency at a time, on `ray.init(num_cpus=<cores>, include_dashboard=False)`.

    overhead ratio = wall time of Tuner.fit() / (wall time of the plain loop running the K calls one after
                     the other / concurrency)

i.e. Tune's wall time over the ideal wall time of running the trials `concurrency` at a time with zero overhead.
ray.init (once per sweep; a cluster is usually up already) is timed and printed separately and not in the ratio;
with --include-init it is. Target: <= 1.25 with 30 s trials. Trial functions sleep rather than compute, so the
comparison measures Tune's scheduling, actor start-up, reporting and bookkeeping, not contention for the cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, load_average, machine_info, print_header, usable_cores, work_folder  # noqa: E402


def fixed_length_trial(config: dict, report) -> None:
    """Runs config['seconds'] of wall time, reporting config['reports'] times at even intervals."""
    started = time.perf_counter()
    for step in range(1, config["reports"] + 1):
        deadline = started + config["seconds"] * step / config["reports"]
        while (left := deadline - time.perf_counter()) > 0:
            time.sleep(min(left, 0.5))
        report({"step": step, "value": config["x"] * step,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")})


def tune_trial(config: dict) -> None:
    from ray import tune
    fixed_length_trial(config, tune.report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="K (default: %(default)s)")
    parser.add_argument("--trial-seconds", type=float, default=30.0, help="(default: %(default)s)")
    parser.add_argument("--reports", type=int, default=5, help="tune.report calls per trial (default: 5)")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at a time (default: %(default)s)")
    parser.add_argument("--include-init", action="store_true", help="count ray.init in Tune's wall time")
    parser.add_argument("--work", default=None, help="folder for Ray's session and Tune's results "
                                                     "(default: a temp folder; removed afterwards)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    info = machine_info()
    print_header("sweep overhead", info, command_line())
    configs = [{"x": index, "seconds": args.trial_seconds, "reports": args.reports} for index in range(args.trials)]
    print(f"{args.trials} trials of {args.trial_seconds:g} s, {args.reports} reports each, {args.concurrency} at a "
          f"time with 1 CPU each")

    load = load_average()
    started = time.perf_counter()
    for config in configs:
        fixed_length_trial(config, lambda metrics: None)
    plain = time.perf_counter() - started
    print(f"plain loop: {plain:.1f} s for {args.trials} sequential calls (load at start {load})", flush=True)

    with work_folder(args.work, keep=args.keep, prefix="cxr-sweep-") as work:
        import ray
        from ray import tune
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        load = load_average()
        started = time.perf_counter()
        ray.init(num_cpus=max(args.concurrency, usable_cores()), include_dashboard=False,
                 _temp_dir=str(work / "ray"), log_to_driver=False, configure_logging=False)
        init = time.perf_counter() - started
        try:
            tuner = tune.Tuner(
                tune.with_resources(tune_trial, {"cpu": 1}),
                param_space={"x": tune.grid_search([config["x"] for config in configs]),
                             "seconds": args.trial_seconds, "reports": args.reports},
                tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrency),
                run_config=tune.RunConfig(name="sweep_overhead", storage_path=str(work / "results"), verbose=0),
            )
            started = time.perf_counter()
            results = tuner.fit()
            fit = time.perf_counter() - started
        finally:
            ray.shutdown()
        errors = [result.error for result in results if result.error]
        if errors:
            raise SystemExit(f"{len(errors)} trial(s) failed: {errors[0]}")
        reports = [result.metrics.get("step") for result in results]
        omp = sorted({str(result.metrics.get("omp_num_threads")) for result in results})

    tune_wall = fit + (init if args.include_init else 0.0)
    ideal = plain / args.concurrency
    ratio = tune_wall / ideal
    print(f"ray.init: {init:.1f} s ({'included' if args.include_init else 'not included'} in the ratio); "
          f"Tuner.fit: {fit:.1f} s (load at start {load}); every trial reached step {min(reports)}; "
          f"OMP_NUM_THREADS inside the trials: {', '.join(omp)}")
    print(f"\noverhead ratio = Tune {tune_wall:.1f} s / (plain loop {plain:.1f} s / {args.concurrency}) = {ratio:.3f}"
          f"  (target <= 1.25 with 30 s trials: {'met' if ratio <= 1.25 else 'NOT met'}); "
          f"overhead {tune_wall - ideal:.1f} s in all, {(tune_wall - ideal) / args.trials:.1f} s per trial")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
