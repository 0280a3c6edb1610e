"""A 4-trial sweep's time to its first reported epoch: the driver builds the node's image cache before Tuner.fit
(sweeps/cache_warmup.py) vs the first trial building it under the cache's lock while the others wait (before).

    .venv/bin/python benchmarks/cache_warmup.py                  # 4 trials on a local Ray, 17 min on 2 busy cores
    .venv/bin/python benchmarks/cache_warmup.py --images 3000    # a longer cache build

Each mode runs the real ablation runner in this process (`sweeps.runner.main`: local Ray, embedded MLflow
store) on the same generated data set, with a fresh cache folder: 4 seeds of the baseline arm, 1 epoch,
--cpus-per-trial 0.5 so that all 4 trials start at once on 2 cores. The synthetic data set's PNGs are replaced
by byte copies of a few 1024 px chest-like PNGs, so that decoding costs what NIH's images cost (~6 CPU ms each).
"Before" is the same code with the driver's warm-up switched off (the runner's `warm_node_caches` replaced by a
no-op), which is exactly the former behaviour: the trials build the cache themselves. Times are taken in the
driver, from the start of the runner to the moment Tune hands it each trial's first result.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before torch loads (BENCHMARKS.md)

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import (_background, _write_png, command_line, load_average, machine_info, median,  # noqa: E402
                     print_header, work_folder)

TRIALS = 4
MODES = ("in-trial build (before)", "driver-built cache")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="about this many images (default: %(default)s)")
    parser.add_argument("--unique", type=int, default=16, help="distinct 1024 px PNGs encoded (default: 16)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each mode, in alternating order (default: %(default)s)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    return parser


def _nih_sized_pngs(data: Path, unique: int) -> int:
    """Overwrite every PNG of the data set with a byte copy of one of `unique` 1024 px chest-like PNGs."""
    originals = data / "originals"
    originals.mkdir()
    background = _background(1024)
    sources = [originals / f"{index}.png" for index in range(unique)]
    for index, path in enumerate(sources):
        _write_png(path, background, index, 0.01)
    pngs = sorted((data / "images").glob("*.png"))
    for index, path in enumerate(pngs):
        shutil.copyfile(sources[index % unique], path)
    shutil.rmtree(originals)
    return len(pngs)


def _run(mode: str, data: Path, work: Path, round_index: int) -> dict:
    from sweeps import mlflow_logger, runner
    from sweeps.ablation import Ablation

    first_results: dict[str, float] = {}
    original_on_result = mlflow_logger.MLflowTrialLogger.on_trial_result
    original_warmup = runner.warm_node_caches

    def on_trial_result(self, iteration, trials, trial, result, **info):
        first_results.setdefault(trial.trial_id, time.perf_counter())
        return original_on_result(self, iteration, trials, trial, result, **info)

    mlflow_logger.MLflowTrialLogger.on_trial_result = on_trial_result
    if mode == MODES[0]:
        runner.warm_node_caches = lambda *args, **kwargs: []
    name = f"{'before' if mode == MODES[0] else 'driver'}-{round_index + 1}"
    args = ["--data", str(data), "--out", str(work / f"out-{name}"), "--name", name, "--cache-dir",
            str(work / f"cache-{name}"), "--arms", "baseline", "--seeds", str(TRIALS), "--epochs", "1",
            "--cpus-per-trial", "0.5", "--set", "backbone=test_resnet", "--set", "pretrained=none",
            "--set", "image_size=64", "--set", "batch_size=32"]
    os.environ.pop("MLFLOW_TRACKING_URI", None)     # mlflow.set_tracking_uri in the previous run set it
    load = load_average()
    started = time.perf_counter()
    try:
        code = runner.main(Ablation, args)
    finally:
        mlflow_logger.MLflowTrialLogger.on_trial_result = original_on_result
        runner.warm_node_caches = original_warmup
    wall = time.perf_counter() - started
    reports = sorted(moment - started for moment in first_results.values())
    return {"code": code, "first": reports[0] if reports else float("nan"),
            "all": reports[-1] if len(reports) == TRIALS else float("nan"), "wall": wall, "load": load,
            "reports": reports}


def main(argv: list[str] | None = None) -> int:
    from trainable.data.synthetic import generate

    args = _parser().parse_args(argv)
    print_header("sweep time to first reported epoch, driver-built vs in-trial image cache", machine_info(),
                 command_line())
    with work_folder(args.work, keep=args.keep) as work:
        started = time.perf_counter()
        data = generate(work / "data", patients=max(1, args.images // 2), image_size=64, seed=0)
        count = _nih_sized_pngs(data, args.unique)
        print(f"data: {count} PNGs of 1024 px (byte copies of {args.unique}), generated in "
              f"{time.perf_counter() - started:.0f} s; {TRIALS} trials (test_resnet, 64 px, 1 epoch, 0.5 CPU each)")
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_index in range(args.rounds):
            for mode in (MODES if round_index % 2 == 0 else MODES[::-1]):     # the machine's load drifts
                result = _run(mode, data, work, round_index)
                results[mode].append(result)
                print(f"\nround {round_index + 1}, {mode}: exit {result['code']}, first report after "
                      f"{result['first']:.1f} s, all {TRIALS} after {result['all']:.1f} s, "
                      f"sweep {result['wall']:.1f} s "
                      f"(load at start {result['load']})", flush=True)
    print(f"\nmedian of {args.rounds} run(s)        first epoch reported   all 4 reported   whole sweep")
    for mode, runs in results.items():
        first, every, wall = (median([run[key] for run in runs]) for key in ("first", "all", "wall"))
        print(f"  {mode:26s}  {first:10.1f} s         {every:8.1f} s     {wall:7.1f} s")
    print(f"load average at the end: {load_average()}")
    return 0 if all(run["code"] == 0 for runs in results.values() for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
