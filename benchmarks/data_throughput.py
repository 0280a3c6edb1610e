"""Data-path throughput: the naive per-sample PNG loader vs our decode-once cache + batched augmentation.

    .venv/bin/python benchmarks/data_throughput.py              # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/data_throughput.py --images 2000 --unique 2000 --repeats 5   # bigger run

On one generated set of 1024x1024 8-bit grayscale PNGs (~0.5 MB each, like NIH's), it measures images/s,
CPU seconds per image and peak memory of
  (a)  the naive path of the reference implementations: a torch DataLoader with 2 worker processes whose
       Dataset does PIL open -> convert("RGB") -> RandomResizedCrop(224, scale=(0.7, 1)) -> RandomHorizontalFlip
       -> ColorJitter(0.2, 0.2) -> ToTensor -> Normalize, per sample, every epoch;
  (b1) the host side of our trial when augmentation runs on an accelerator: BatchLoader slicing uint8 batches
       out of the decode-once memory-mapped cache (pinned when CUDA is present), prefetched by its thread;
  (b2) our whole path on the CPU: the same batches, then BatchAugment (per-sample resized crop + flip + colour
       jitter, the DannyNet set, same parameters as (a)) to normalised float32 batches, on all cores with
       OMP_WAIT_POLICY=PASSIVE; also with 1 torch thread (what a Ray trial with 1 CPU gets: Ray sets
       OMP_NUM_THREADS to the trial's CPUs) and with all cores and libgomp's default spin-waiting, which
       collapses when other processes load the cores (idle OpenMP threads spin on CPUs others need);
  (c)  for context: torchvision v2 transforms per sample on the cached uint8 tensors (no batching, 1 thread);
and, timed separately, the cache build (decode each PNG once, resize to 224, write the memmap) with 1 thread,
with all cores as threads (our implementation) and with all cores as spawned processes (the former one).

Each path runs in its own child process so that its peak memory is its own (PSS summed over the process and
its DataLoader workers, so pages shared by fork are counted once). Throughputs are medians over repeated
epochs after an untimed warm-up epoch (for (a): the persistent workers are started, and every timed epoch
includes refilling the workers' prefetch queues, as every epoch of a real run does). The PNGs are in the page cache when
read (just written), as on a node that has read them once; a cold disk only makes (a) and the cache build
slower. Ratios: b1/a, b2/a. Targets on 2 CPU cores: b1/a >= 50, b2/a >= 15.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MemorySampler, command_line, cpu_seconds, generate_pngs, last_json_line,  # noqa: E402
                     load_average, machine_info, median, print_header, process_tree, repeat_until,
                     usable_cores, work_folder)

CACHE_KEY = "bench"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
CROP_SCALE = (0.7, 1.0)
JITTER = 0.2
TARGETS = {"b1": 50.0, "b2": 15.0}


def _paths(work: Path) -> list[str]:
    return sorted(str(path) for path in (work / "png").glob("*.png"))


def _labels(count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.random((count, 14)) < 0.1).astype(np.float32), rng.random((count, 3)).astype(np.float32)


# --- phases (each runs in its own child process) ------------------------------------------------------------

class NaiveDataset:
    """What the reference implementations do per sample: decode the 1024 px PNG, make it RGB, augment."""

    def __init__(self, paths: list[str], image_size: int) -> None:
        from torchvision import transforms
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=CROP_SCALE),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=JITTER, contrast=JITTER),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image
        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), torch.zeros(14)


def phase_naive(args, work: Path) -> dict:
    import torch
    paths = _paths(work)
    loader = torch.utils.data.DataLoader(
        NaiveDataset(paths, args.image_size), batch_size=args.batch_size, shuffle=True,
        num_workers=args.naive_workers, persistent_workers=True, pin_memory=torch.cuda.is_available())
    rates, cpu_per_image = [], []
    epoch = [0]

    def one_epoch() -> float:
        epoch[0] += 1
        tree = process_tree()                        # this process and its (persistent) workers
        started, cpu_start = time.perf_counter(), cpu_seconds(tree)
        seen = sum(len(images) for images, _ in loader)
        elapsed = time.perf_counter() - started
        cpu_per_image.append((cpu_seconds(tree) - cpu_start) / seen)
        return seen / elapsed

    with MemorySampler() as memory:
        for _ in loader:                             # warm-up epoch: starts the workers
            pass
        rates = repeat_until(one_epoch, min_repeats=args.repeats, min_seconds=0)
    del loader
    return {"images_per_s": median(rates), "all": rates, "cpu_ms_per_image": 1e3 * median(cpu_per_image),
            "peak_mib": memory.peak}


def _our_loader(args, work: Path):
    import torch
    from trainable.data.cache import open_cache
    from trainable.data.loader import BatchLoader
    cache = open_cache(_paths(work), image_size=args.image_size, cache_dir=work / "cache", key=CACHE_KEY,
                       progress=False)
    labels, demographics = _labels(len(cache))
    return BatchLoader(cache, labels, demographics, batch_size=args.batch_size, shuffle=True, seed=0,
                       pin_memory=torch.cuda.is_available(), prefetch=2)


def _augment(args):
    import dataclasses
    from types import SimpleNamespace
    from trainable.config import TrialConfig
    from trainable.data.augment import BatchAugment
    # TrialConfig's fields without its validation, which imports timm and every registry: the memory figures
    # are then those of the data path alone, comparable with (a).
    cfg = SimpleNamespace(**{field.name: field.default for field in dataclasses.fields(TrialConfig)})
    cfg.__dict__.update(aug_hflip=True, aug_resized_crop=True, aug_crop_scale_min=CROP_SCALE[0], aug_rotation=False,
                        aug_color_jitter=True, aug_brightness=JITTER, aug_contrast=JITTER, image_size=args.image_size)
    return BatchAugment(cfg, mean=GRAY_MEAN, std=GRAY_STD).train()


def _timed_epochs(args, run_epoch) -> tuple[list[float], list[float]]:
    rates, cpu_per_image = [], []
    epoch = [0]

    def one() -> float:
        epoch[0] += 1
        cpu_start, started = cpu_seconds([os.getpid()]), time.perf_counter()
        seen = run_epoch(epoch[0])
        elapsed = time.perf_counter() - started
        cpu_per_image.append((cpu_seconds([os.getpid()]) - cpu_start) / seen)
        return seen / elapsed

    run_epoch(0)                                        # warm-up: page cache, allocator, first-call costs
    rates = repeat_until(one, min_repeats=args.repeats, min_seconds=args.min_seconds)
    return rates, cpu_per_image


def phase_ours_host(args, work: Path) -> dict:
    loader = _our_loader(args, work)

    def run_epoch(epoch: int) -> int:
        seen = 0
        for batch in loader.epoch(epoch):
            seen += len(batch)
        return seen

    with MemorySampler() as memory:
        rates, cpu = _timed_epochs(args, run_epoch)
    return {"images_per_s": median(rates), "all": rates, "cpu_ms_per_image": 1e3 * median(cpu),
            "pinned": loader.pin_memory, "peak_mib": memory.peak}


def phase_ours_cpu(args, work: Path) -> dict:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    loader, augment = _our_loader(args, work), _augment(args)
    waits = []

    def run_epoch(epoch: int) -> int:
        generator = torch.Generator().manual_seed(epoch)
        seen, waited = 0, 0.0
        iterator = loader.epoch(epoch)
        while True:
            started = time.perf_counter()
            batch = next(iterator, None)
            waited += time.perf_counter() - started
            if batch is None:
                break
            images = augment(batch.images, generator)
            seen += len(images)
        waits.append(waited)
        return seen

    with MemorySampler() as memory:
        rates, cpu = _timed_epochs(args, run_epoch)
    epoch_seconds = len(loader.images) / median(rates)
    result = {"images_per_s": median(rates), "all": rates, "cpu_ms_per_image": 1e3 * median(cpu),
              "torch_threads": torch.get_num_threads(), "peak_mib": memory.peak,
              "waiting_for_batches_fraction": median(waits) / epoch_seconds}
    if args.profile:
        result["breakdown"] = _profile(args, loader, augment)
    return result


def _profile(args, loader, augment, batches: int = 8) -> dict:
    """Where the time of (b2) goes: self CPU time per torch op over a few augmented batches, and the
    batch slicing, measured on its own."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    generator = torch.Generator().manual_seed(123)
    indices = loader.batch_indices(99)[:batches]
    started = time.perf_counter()
    made = [loader.make_batch(index) for index in indices]
    slicing = (time.perf_counter() - started) / len(made)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in made:
            augment(batch.images, generator)
    table = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in table)
    top = {event.key: round(100 * event.self_cpu_time_total / total, 1) for event in table[:8]}
    return {"slice_ms_per_batch": 1e3 * slicing, "augment_ms_per_batch": total / 1e3 / len(made),
            "top_ops_percent": top}


def phase_per_sample_v2(args, work: Path) -> dict:
    import torch
    torch.set_num_threads(args.threads or 1)        # ops on one 224 px image are too small to split
    from torchvision.transforms import v2
    from trainable.data.cache import open_cache
    cache = open_cache(_paths(work), image_size=args.image_size, cache_dir=work / "cache", key=CACHE_KEY,
                       progress=False)
    tensors = torch.from_numpy(np.array(cache))[:, None]           # (N, 1, H, W) uint8 in RAM
    transform = v2.Compose([
        v2.RandomResizedCrop(args.image_size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=JITTER, contrast=JITTER),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([GRAY_MEAN], [GRAY_STD]),
    ])

    def run_epoch(epoch: int) -> int:
        order = np.random.default_rng(epoch).permutation(len(tensors))
        for start in range(0, len(order), args.batch_size):
            torch.stack([transform(tensors[i]) for i in order[start:start + args.batch_size]])
        return len(order)

    with MemorySampler() as memory:
        rates, cpu = _timed_epochs(args, run_epoch)
    return {"images_per_s": median(rates), "all": rates, "cpu_ms_per_image": 1e3 * median(cpu),
            "torch_threads": torch.get_num_threads(), "peak_mib": memory.peak}


PHASES = {"naive": phase_naive, "ours_host": phase_ours_host, "ours_cpu": phase_ours_cpu,
          "per_sample_v2": phase_per_sample_v2}


# --- cache build --------------------------------------------------------------------------------------------

def _spawn_build(paths: list[str], image_size: int, folder: Path, workers: int) -> None:
    """The former implementation: chunks decoded in a spawned process pool, written into one file."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from trainable.data import cache
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "spawn.u8"
    with open(data, "wb") as handle:
        handle.truncate(len(paths) * image_size * image_size)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(cache._decode_chunk, str(data), start, chunk, image_size)
                   for start, chunk in cache._tasks(paths)]
        for future in futures:
            future.result()


def _own_and_children_cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished (waited-for) child processes."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_cache_build(args, work: Path, paths: list[str]) -> dict:
    from trainable.data.cache import open_cache
    cores = usable_cores()
    variants = [("threads", 1), ("threads", cores)] + ([("spawn processes", cores)] if args.compare_spawn else [])
    results = {}
    for kind, workers in variants:
        folder = work / f"cache-{kind.split()[0]}-{workers}"
        load = load_average()
        started, cpu_start = time.perf_counter(), _own_and_children_cpu()
        if kind == "threads":
            open_cache(paths, image_size=args.image_size, cache_dir=folder, key=CACHE_KEY, workers=workers,
                       progress=False)
        else:
            _spawn_build(paths, args.image_size, folder, workers)
        elapsed, cpu = time.perf_counter() - started, _own_and_children_cpu() - cpu_start
        results[f"{kind} x{workers}"] = {"images_per_s": len(paths) / elapsed, "seconds": elapsed, "load": load,
                                         "cpu_ms_per_image": 1e3 * cpu / len(paths)}
        if kind == "threads" and workers == cores:
            folder.rename(work / "cache")                # the cache the phases read
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return results


# (result name, phase, environment, options). OMP_WAIT_POLICY must be set before torch starts its OpenMP pool.
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
PLAN = [
    ("naive", "naive", {}, {}),
    ("ours_host", "ours_host", {}, {}),
    ("ours_cpu", "ours_cpu", PASSIVE, {}),                      # b2: all cores, idle OpenMP threads sleep
    ("ours_cpu_1", "ours_cpu", {}, {"threads": 1, "profile": 1}),  # b2 with 1 thread (a 1-CPU Ray trial)
    ("ours_cpu_spin", "ours_cpu", {}, {}),                      # b2 with libgomp's default spin-waiting
    ("per_sample_v2", "per_sample_v2", {}, {}),
]


# --- driver -------------------------------------------------------------------------------------------------

def run_phase(name: str, args, work: Path, env: dict | None = None, **overrides) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--work-dir", str(work),
               "--images", str(args.images), "--image-size", str(args.image_size), "--batch-size",
               str(args.batch_size), "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds),
               "--naive-workers", str(args.naive_workers)]
    for key, value in overrides.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    load = load_average()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{done.stdout}\n{done.stderr}")
    result = last_json_line(done.stdout)
    result["load_at_start"] = load
    return result


def _merge(runs: list[dict]) -> dict:
    """One path's figures over rounds: median over all timed epochs, highest peaks, the first load."""
    merged = dict(runs[0])
    merged["all"] = [rate for run in runs for rate in run["all"]]
    merged["images_per_s"] = median(merged["all"])
    merged["cpu_ms_per_image"] = median([run["cpu_ms_per_image"] for run in runs])
    merged["peak_mib"] = {key: max(run["peak_mib"][key] for run in runs) for key in runs[0]["peak_mib"]}
    if "waiting_for_batches_fraction" in runs[0]:
        merged["waiting_for_batches_fraction"] = median([run["waiting_for_batches_fraction"] for run in runs])
    merged["load_at_start"] = " | ".join(run["load_at_start"].split()[0] for run in runs)
    return merged


def _fmt_peak(peak: dict) -> str:
    return (f"peak PSS {peak['tree_pss']:.0f} MiB (process tree), RSS {peak['self_rss']:.0f} MiB "
            f"(anon {peak['self_anon']:.0f}, file-backed {peak['self_file']:.0f})")


def report(results: dict, cache: dict, args, generated: dict) -> None:
    print(f"\nPNG set: {args.images} images of 1024x1024 8-bit grayscale, mean {generated['mean_mb']:.2f} MB "
          f"({generated['unique']} encoded, the rest byte copies), generated in {generated['seconds']:.0f} s")
    print(f"\ncache build ({args.images} PNGs -> {args.image_size} px uint8 memmap, timed separately):")
    for name, figures in cache.items():
        print(f"  {name:<20} {figures['images_per_s']:8.1f} images/s  ({figures['seconds']:.1f} s, "
              f"{figures['cpu_ms_per_image']:.1f} CPU ms/image, load {figures['load']})")
    naive = results["naive"]["images_per_s"]
    rows = [("a   naive DataLoader, 2 workers", "naive"), ("b1  ours, host side (slice cache)", "ours_host"),
            ("b2  ours, whole CPU path", "ours_cpu"), ("    b2 with 1 torch thread", "ours_cpu_1"),
            ("    b2 with OpenMP spin-waiting", "ours_cpu_spin"),
            ("c   per-sample v2 on cached tensors", "per_sample_v2")]
    print(f"\nthroughput at {args.image_size} px, batch {args.batch_size} (median of repeated epochs):")
    for label, key in rows:
        figures = results[key]
        threads = f", {figures['torch_threads']} torch threads" if "torch_threads" in figures else ""
        print(f"  {label:<36} {figures['images_per_s']:9.1f} images/s  x{figures['images_per_s'] / naive:6.1f} vs a  "
              f"{figures['cpu_ms_per_image']:6.2f} CPU ms/image{threads}  (1-min load {figures['load_at_start']})")
        print(f"  {'':<36} {_fmt_peak(figures['peak_mib'])}")
    b1, b2 = (results[key]["images_per_s"] / naive for key in ("ours_host", "ours_cpu"))
    b2_one = results["ours_cpu_1"]["images_per_s"] / naive
    print("\nratios (targets on 2 CPU cores: b1/a >= 50, b2/a >= 15):")
    print(f"  b1/a = {b1:.1f}  {'met' if b1 >= TARGETS['b1'] else 'NOT met'}")
    print(f"  b2/a = {b2:.1f}  {'met' if b2 >= TARGETS['b2'] else 'NOT met'}   (with 1 torch thread: {b2_one:.1f})")
    cpu_ratio = results["naive"]["cpu_ms_per_image"] / results["ours_cpu_1"]["cpu_ms_per_image"]
    print(f"  CPU time per image, a / b2 (1 thread) = {cpu_ratio:.1f}  (independent of the machine's load)")
    breakdown = results["ours_cpu_1"]["breakdown"]
    print(f"\nwhere b2's time goes (1 thread): slicing {breakdown['slice_ms_per_batch']:.1f} ms/batch (prefetch "
          f"thread, overlapped), augmentation {breakdown['augment_ms_per_batch']:.1f} ms/batch of {args.batch_size}; "
          f"the main thread waited for batches "
          f"{100 * results['ours_cpu_1']['waiting_for_batches_fraction']:.0f}% of the time")
    print("  augmentation time by op: " +
          ", ".join(f"{name} {share}%" for name, share in breakdown["top_ops_percent"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="PNGs in the set (default: %(default)s)")
    parser.add_argument("--unique", type=int, default=64,
                        help="distinct PNGs encoded; the others are byte copies (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="training resolution (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per path, at least (default: 3)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="time each fast path for at least this long (default: %(default)s)")
    parser.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of (a) (default: 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every path this many times, interleaved (default: %(default)s)")
    parser.add_argument("--no-compare-spawn", dest="compare_spawn", action="store_false",
                        help="skip the cache build with spawned processes (the former implementation)")
    parser.add_argument("--work", default=None, help="folder for the generated data (default: a temp folder); "
                                                     "removed afterwards unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:                                       # child process: one measurement, one JSON line
        print(json.dumps(PHASES[args.phase](args, Path(args.work_dir))))
        return 0

    info = machine_info()
    print_header("data throughput", info, command_line())
    with work_folder(args.work, keep=args.keep) as work:
        started = time.perf_counter()
        paths, mean_size = generate_pngs(work / "png", args.images, unique=args.unique)
        generated = {"mean_mb": mean_size / 1e6, "unique": min(args.unique, args.images),
                     "seconds": time.perf_counter() - started}
        cache = measure_cache_build(args, work, paths)
        rounds: dict[str, list[dict]] = {}
        for round_index in range(args.rounds):          # rounds interleave the paths: the load drifts
            for name, phase, env, overrides in PLAN:
                print(f"round {round_index + 1}/{args.rounds}: running {name} ...", flush=True)
                rounds.setdefault(name, []).append(run_phase(phase, args, work, env, **overrides))
        results = {name: _merge(runs) for name, runs in rounds.items()}
        report(results, cache, args, generated)
        print(f"\nload average at the end: {load_average()}")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "command": command_line(),
                                                   "generated": generated, "cache_build": cache,
                                                   "paths": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
