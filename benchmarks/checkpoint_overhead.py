"""Epoch wall time with the background checkpoint writer vs the former synchronous checkpoint.

    .venv/bin/python benchmarks/checkpoint_overhead.py                      # DenseNet-121, 32 px: 6 min, 2 busy cores
    .venv/bin/python benchmarks/checkpoint_overhead.py --storage-latency 1  # + 1 s per report (a slow --storage)

A real trial (`trainable.train.train`, DenseNet-121 with Adam: the 84 MB checkpoint of the issue, at 32 px so
that a CPU epoch takes seconds) runs --epochs epochs with each mode, in alternation (--rounds). Its `report`
does what Tune's does with a checkpoint: copies the folder to a storage folder on this disk (and, with
--storage-latency S, waits S seconds more, standing in for NFS/S3 and the driver's processing of the report).
Per epoch, train.train's own timings: training, validation + metrics, and the time the loop spent on the
checkpoint (synchronous: writing + reporting; background: copying the state to the host + waiting for the
previous epoch's report). The checkpoint share is that last time over the epoch's wall time, for the epochs
that another epoch follows (a long trial's steady state); a trial's last report has no epoch to hide behind and
train() waits for it, once per trial: it is printed apart.
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
from _common import command_line, load_average, machine_info, median, print_header, work_folder  # noqa: E402

MODES = {"synchronous": False, "background": True}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="densenet121", help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--patients", type=int, default=150, help="synthetic data set size (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each mode (default: 2)")
    parser.add_argument("--storage-latency", type=float, default=0.0,
                        help="seconds added to every report, for a slow storage (default: 0, local disk only)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from trainable.config import TrialConfig
    from trainable.data.nih import DataSpec, prepare_dataset
    from trainable.data.synthetic import generate
    from trainable.train import train

    args = _parser().parse_args(argv)
    print_header("checkpoint overhead per epoch", machine_info(), command_line())
    cfg = TrialConfig(backbone=args.backbone, pretrained="none", image_size=args.image_size, epochs=args.epochs,
                      batch_size=16)
    with work_folder(args.work, keep=args.keep) as work:
        data = prepare_dataset(DataSpec(data_dir=str(generate(work / "data", patients=args.patients,
                                                               image_size=64, seed=0))), work / "split")
        sizes = data.split_sizes()
        print(f"trial: {cfg.backbone}, {cfg.image_size} px, batch {cfg.batch_size}, Adam, {args.epochs} epochs; "
              f"train {sizes['train']['images']} / val {sizes['val']['images']} images; storage latency "
              f"{args.storage_latency:g} s per report")
        storage, checkpoint_mb = work / "storage", []

        def report(metrics: dict, folder: Path) -> None:
            target = storage / f"checkpoint_{time.monotonic_ns()}"
            shutil.copytree(folder, target)             # Tune's persist_current_checkpoint, to a local folder
            checkpoint_mb.append(sum(p.stat().st_size for p in target.iterdir()) / 2**20)
            shutil.rmtree(target)
            time.sleep(args.storage_latency)

        epochs: dict[str, list[dict]] = {mode: [] for mode in MODES}     # epochs followed by another
        last: dict[str, list[dict]] = {mode: [] for mode in MODES}       # each run's last epoch
        walls: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_index in range(args.rounds):
            order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))    # load drifts
            for mode in order:
                started, load = time.perf_counter(), load_average()
                result = train(cfg, data, report, cache_dir=work / "cache", background_checkpoint=MODES[mode])
                walls[mode].append(time.perf_counter() - started)
                for timing in result.timings:
                    timing["epoch_s"] = timing["train_s"] + timing["val_s"] + timing["checkpoint_s"]
                epochs[mode] += result.timings[:-1]
                last[mode].append(result.timings[-1])
                per_epoch = ", ".join(f"{t['epoch_s']:.2f}" for t in result.timings)
                waited = ", ".join(f"{t['checkpoint_s']:.3f}" for t in result.timings)
                print(f"round {round_index + 1} {mode:11s}: epochs {per_epoch} s; checkpoint {waited} s "
                      f"(train() {walls[mode][-1]:.1f} s, load {load})", flush=True)
    print(f"\ncheckpoint: {median(checkpoint_mb):.1f} MB (weights + Adam moments + validation predictions)")
    print("epochs followed by another (the steady state of a long trial), median:")
    print("                       epoch s   train s   val s   checkpoint s   checkpoint share")
    shares = {}
    for mode, timings in epochs.items():
        epoch_s, checkpoint_s = median([t["epoch_s"] for t in timings]), median([t["checkpoint_s"] for t in timings])
        shares[mode] = checkpoint_s / epoch_s
        print(f"  {mode:11s}        {epoch_s:7.2f}   {median([t['train_s'] for t in timings]):7.2f}  "
              f"{median([t['val_s'] for t in timings]):6.2f}   {checkpoint_s:12.3f}   {100 * shares[mode]:6.2f}%")
    sync, background = (median([t["epoch_s"] for t in epochs[m]]) for m in MODES)
    print(f"\nepoch wall time: background {background:.2f} s vs synchronous {sync:.2f} s "
          f"({100 * (background / sync - 1):+.1f}%); checkpoint share {100 * shares['synchronous']:.2f}% -> "
          f"{100 * shares['background']:.2f}%")
    # the last epoch has no next epoch to hide its report behind: train() waits for it, once per trial
    print("the trial's last epoch (train() returns after its report), median checkpoint s: " + ", ".join(
        f"{mode} {median([t['checkpoint_s'] for t in last[mode]]):.3f}" for mode in MODES))
    print("whole train() call, median s: " + ", ".join(f"{mode} {median(walls[mode]):.1f}" for mode in MODES))
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
