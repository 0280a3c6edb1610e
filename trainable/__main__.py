"""Run one trial from the shell, for debugging a configuration without Ray or MLflow.

    python -m trainable --data DIR --preset chexnet_replica --set backbone=test_resnet --set image_size=64 \
        --set epochs=2 --out OUT

writes OUT/metrics.jsonl (one JSON line per epoch), OUT/split.csv, OUT/config.json, OUT/val_predictions.npz,
OUT/thresholds.json and OUT/checkpoints/epoch_NNN/ (resume with --resume OUT/checkpoints/epoch_NNN).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# Before torch loads: spinning OpenMP waits collapse CPU throughput on a shared node (see BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backends import CUBLAS_WORKSPACE_ENV, DETERMINISTIC_CUBLAS_WORKSPACE  # noqa: E402 - torch-free

# Before the first cuBLAS call: deterministic=true needs a fixed workspace (trainable/backends.py).
os.environ.setdefault(CUBLAS_WORKSPACE_ENV, DETERMINISTIC_CUBLAS_WORKSPACE)

from .config import TrialConfig, parse_overrides
from .errors import UserError, out_of_space
from .data.options import add_data_arguments, data_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainable", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="NIH ChestX-ray14 folder (Data_Entry CSV + images)")
    parser.add_argument("--out", required=True, help="output folder for this trial")
    parser.add_argument("--preset", default="chexnet_replica",
                        help="starting configuration from search_spaces/presets.yaml (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, repeatable (e.g. --set backbone=resnet50 --set lr=3e-4)")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT_DIR",
                        help="continue from a checkpoint folder written by an earlier run (OUT/checkpoints/epoch_NNN)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    add_data_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    from search_spaces import load_preset   # an entry point may use any layer; no library module of trainable does
    from .backbones import check_pretrained, warnings_for
    from .train import load_checkpoint

    cfg: TrialConfig = load_preset(args.preset).replace(**parse_overrides(args.set))
    out = Path(args.out)
    fresh = not out.exists() or not any(out.iterdir())
    if not fresh and not (args.overwrite or args.resume):
        raise UserError(f"--out {out} is not empty; pass --overwrite (or --resume) to write into it")
    # Everything that can be checked without data comes first; then a failure before the first epoch removes
    # what this run wrote, so fixing the input and re-running the same command just works.
    if args.resume:
        try:
            resume_epoch = load_checkpoint(args.resume, cfg)["progress"]["next_epoch"] - 1
        except UserError as err:
            raise UserError(f"--resume {err}") from None
    else:
        check_pretrained(cfg)
        resume_epoch = None
    for warning in warnings_for(cfg):
        print(warning, file=sys.stderr)
    reported: list[int] = []
    try:
        _run_trial(args, cfg, out, resume_epoch, reported)
    except OSError as err:
        full = out_of_space(err, f"--out {out}")
        if full is None:
            raise
        if fresh and not reported:
            shutil.rmtree(out, ignore_errors=True)
        raise full from None
    except UserError:
        if fresh and not reported:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_trial(args: argparse.Namespace, cfg: TrialConfig, out: Path, resume_epoch: int | None,
               reported: list[int]) -> None:
    from .data.cache import check_cache_space
    from .data.nih import prepare_dataset, write_text_atomically
    from .runtime import default_cache_dir
    from .train import copy_checkpoint, train

    if args.overwrite and not args.resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    data = prepare_dataset(data_spec(args), out)
    write_text_atomically(out / "config.json", cfg.to_json())
    label = " (SYNTHETIC data)" if data.synthetic else ""
    print(f"data{label}: fingerprint {data.fingerprint}, split sizes {data.split_sizes()}")
    for note in data.notes():
        print(note)

    check_cache_space(args.cache_dir or default_cache_dir(),
                      [(f"{data.fingerprint}-{split}", data.subset(split)["path"].tolist(), cfg.image_size)
                       for split in ("train", "val")])
    metrics_path = out / "metrics.jsonl"
    lines = [] if resume_epoch is None else _read_metrics(metrics_path)
    # a resumed run keeps the lines of the epochs it does not repeat; each epoch rewrites the file whole
    kept = [line for line, metrics in lines if metrics["epoch"] <= resume_epoch]
    if resume_epoch is not None:
        write_text_atomically(metrics_path, "".join(kept))

    def report(metrics: dict, checkpoint: Path) -> None:
        destination = out / "checkpoints" / f"epoch_{metrics['epoch']:03d}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        copy_checkpoint(checkpoint, destination)
        for name in ("val_predictions.npz", "thresholds.json"):
            shutil.copyfile(checkpoint / name, out / name)
        kept.append(json.dumps({"synthetic_data": data.synthetic, **metrics}) + "\n")
        write_text_atomically(metrics_path, "".join(kept))     # a full disk cannot leave half a line
        reported.append(metrics["epoch"])
        print(f"epoch {metrics['epoch']}: val_loss {metrics['val_loss']:.4f} "
              f"val_auc_mean {metrics['val_auc_mean']:.4f} val_f1_mean {metrics['val_f1_mean']:.4f}", flush=True)

    train(cfg, data, report, cache_dir=args.cache_dir, resume_from=args.resume)


def _read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, parsed) per line of an earlier run's metrics.jsonl; a line that is not an epoch's JSON object (cut
    short by a kill or a full disk, or edited) is a UserError naming it."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            metrics = json.loads(line)
            int(metrics["epoch"])
        except (ValueError, TypeError, KeyError):
            raise UserError(f"--resume: {path} line {number} is not an epoch's JSON object ({line.strip()[:60]!r}, "
                            f"cut short?); expected one JSON object with an 'epoch' per line: delete or repair the "
                            f"line") from None
        parsed.append((line if line.endswith("\n") else line + "\n", metrics))
    return parsed


if __name__ == "__main__":
    sys.exit(main())
