"""A trial's training throughput vs the model-bound limit (the same model fed tensors already on the device).

    .venv/bin/python benchmarks/trial_throughput.py          # CPU: ~2 minutes; CUDA: DenseNet-121, 224 px, bf16
    .venv/bin/python benchmarks/trial_throughput.py --backbone resnet18 --image-size 96 --steps 10   # other CPU model

trial:       trainable.train's own training loop (`_train_one_epoch`: BatchLoader over the decode-once cache ->
             host-to-device copy -> BatchAugment on the device (per-sample resized crop + flip + colour jitter) ->
             channels_last -> autocast forward -> loss -> backward -> step), on a cache built from PNGs;
model-bound: the same model, loss and optimizer fed one normalised batch that is already on the device (no data
             path, no per-step host synchronisation).
ratio = trial images/s / model-bound images/s; target >= 0.9 on a GPU (DenseNet-121, 224 px, bf16,
channels_last). Both are timed in alternation (--rounds), after warm-up steps, and the medians are compared.

On CUDA the defaults are DenseNet-121 at 224 px, bf16 autocast, channels_last, batch 64. Without CUDA they are
a small timm CNN (test_resnet) at 128 px, fp32, batch 32, so that the run takes minutes: a small model is the
hard case for the ratio (the data path is a larger share of each step); DenseNet-121 on 2 CPU cores trains at a
few images/s and no data path could slow it. OMP_WAIT_POLICY defaults to PASSIVE here (see BENCHMARKS.md).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # read when torch loads OpenMP: before importing torch

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import (command_line, load_average, machine_info, median, print_header,  # noqa: E402
                     trial_parts, usable_cores, work_folder)


def _parser(cuda: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="(default: %(default)s)")
    parser.add_argument("--backbone", default="densenet121" if cuda else "test_resnet",
                        help="timm backbone (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224 if cuda else 128, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 32, help="(default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32",
                        help="(default: %(default)s)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="channels_last is on by default (train.py applies it on CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (config key compile)")
    parser.add_argument("--steps", type=int, default=100 if cuda else 20, help="timed steps per measurement "
                                                                               "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=15 if cuda else 3, help="untimed steps first "
                                                                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurements of each (default: 4)")
    parser.add_argument("--work", default=None, help="folder for the generated data (default: a temp folder)")
    parser.add_argument("--keep", action="store_true")
    return parser


def _write_pngs(folder: Path, count: int, size: int) -> list[str]:
    """Random-textured PNGs at the trial's resolution (the cache build itself is measured elsewhere)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)

    def write(index: int) -> str:
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        path = folder / f"{index:06d}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        return str(path)

    with ThreadPoolExecutor(usable_cores()) as pool:
        return list(pool.map(write, range(count)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    from trainable import train as train_module
    from trainable.config import TrialConfig
    from trainable.data.cache import open_cache
    from trainable.data.loader import BatchLoader
    from trainable.runtime import autocast

    args = _parser(torch.cuda.is_available()).parse_args(argv)
    device = torch.device(args.device)
    info = machine_info()
    print_header("trial throughput", info, command_line())
    cfg = TrialConfig(backbone=args.backbone, pretrained="none", image_size=args.image_size,
                      batch_size=args.batch_size, precision=args.precision, channels_last=args.channels_last,
                      compile=args.compile, aug_hflip=True, aug_resized_crop=True, aug_color_jitter=True)
    print(f"trial: {cfg.backbone}, {cfg.image_size} px, batch {cfg.batch_size}, {cfg.precision}, "
          f"channels_last={cfg.channels_last and device.type == 'cuda'}, compile={cfg.compile}, device {device}, "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    with work_folder(args.work, keep=args.keep) as work:
        count = (args.steps + args.warmup) * args.batch_size
        started = time.perf_counter()
        paths = _write_pngs(work / "png", count, args.image_size)
        images = open_cache(paths, image_size=args.image_size, cache_dir=work / "cache", key="trial",
                            progress=False)
        print(f"cache of {count} images built in {time.perf_counter() - started:.1f} s")
        rng = np.random.default_rng(0)
        labels = (rng.random((count, 14)) < 0.15).astype(np.float32)
        demographics = np.zeros((count, 0), np.float32)

        parts = trial_parts(cfg, device, labels, work / "cache")      # the same setup as trainable.train.train
        model, forward, augment, criterion, optimizer = (parts.model, parts.forward, parts.augment, parts.criterion,
                                                         parts.optimizer)
        pin = device.type == "cuda"

        def loader(rows: slice) -> BatchLoader:
            return BatchLoader(images[rows], labels[rows], demographics[rows], batch_size=cfg.batch_size,
                               shuffle=True, seed=cfg.seed, pin_memory=pin, drop_last=True)

        warm_rows, timed_rows = slice(0, args.warmup * args.batch_size), slice(args.warmup * args.batch_size, count)

        cpu_ms = {"trial": [], "model-bound": []}

        def trial(rows: slice, epoch: int) -> float:
            data = loader(rows)
            _sync(device)
            started, cpu = time.perf_counter(), time.process_time()
            _, seen = train_module._train_one_epoch(forward, augment, criterion, optimizer, data, cfg, epoch, device)
            _sync(device)
            cpu_ms["trial"].append(1e3 * (time.process_time() - cpu) / seen)
            return seen / (time.perf_counter() - started)

        # Model-bound: one batch as the trial's augmentation would hand it to the model, already on the device.
        batch = torch.from_numpy(np.array(images[:cfg.batch_size]))[:, None].to(device)
        augment.eval()
        ready = augment(batch)
        if cfg.channels_last and device.type == "cuda":
            ready = ready.contiguous(memory_format=torch.channels_last)
        target = torch.from_numpy(labels[:cfg.batch_size]).to(device)
        demo = torch.from_numpy(demographics[:cfg.batch_size]).to(device)

        def model_bound(steps: int) -> float:
            model.train()
            _sync(device)
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                with autocast(cfg.precision, device):
                    logits = forward(ready, demo)
                loss = criterion(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            _sync(device)
            cpu_ms["model-bound"].append(1e3 * (time.process_time() - cpu) / (steps * cfg.batch_size))
            return steps * cfg.batch_size / (time.perf_counter() - started)

        trial(warm_rows, 0)
        model_bound(args.warmup)
        for figures in cpu_ms.values():             # forget the warm-up
            figures.clear()
        trial_rates, bound_rates = [], []
        for round_index in range(args.rounds):
            load = load_average()
            if round_index % 2 == 0:                         # alternate the order: load drifts
                trial_rates.append(trial(timed_rows, round_index + 1))
                bound_rates.append(model_bound(args.steps))
            else:
                bound_rates.append(model_bound(args.steps))
                trial_rates.append(trial(timed_rows, round_index + 1))
            print(f"round {round_index + 1}: trial {trial_rates[-1]:.1f} images/s "
                  f"({cpu_ms['trial'][-1]:.2f} CPU ms/image), model-bound {bound_rates[-1]:.1f} images/s "
                  f"({cpu_ms['model-bound'][-1]:.2f} CPU ms/image)  (load {load})", flush=True)

    trial_rate, bound_rate = median(trial_rates), median(bound_rates)
    ratio = trial_rate / bound_rate
    print(f"\nresult on {info['device']} ({device.type}): trial {trial_rate:.1f} images/s, model-bound "
          f"{bound_rate:.1f} images/s, ratio {ratio:.3f}"
          + ("  (target >= 0.9 on a GPU: " + ("met)" if ratio >= 0.9 else "NOT met)") if device.type == "cuda"
             else "  (the >= 0.9 target is for a GPU; this is the CPU figure)"))
    if device.type == "cpu":
        cpu_ratio = median(cpu_ms["model-bound"]) / median(cpu_ms["trial"])
        print(f"CPU time per image: trial {median(cpu_ms['trial']):.2f} ms, model-bound "
              f"{median(cpu_ms['model-bound']):.2f} ms; their ratio {cpu_ratio:.3f} is the throughput ratio on a "
              f"machine with no other load (all cores busy with this trial)")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
