"""A trial's resident memory at two data-set sizes: it must not grow with the number of images.

    .venv/bin/python benchmarks/memory.py                        # 500 vs 4000 images at 128 px, ~2 minutes
    .venv/bin/python benchmarks/memory.py --sizes 500,20000      # bigger spread

One synthetic data set in the NIH layout (trainable.data.synthetic) is generated at 128 px; for each size a
patient-wise subset of about that many images is prepared (trainable.data.nih), its decode-once cache built (as
a sweep's first trial does, once per node), and then one real trial runs in a fresh child process:
trainable.train.train with a tiny CNN (test_resnet), one epoch of training and validation, the DannyNet
augmentations. A sampler thread in the child records its peak memory:
  RSS        everything resident: anonymous + file-backed pages;
  anonymous  private memory (model, optimizer, batches, metadata): what would grow if the images were loaded
             into RAM;
  file       file-backed pages mapped, mostly the shared libraries plus the pages of the memory-mapped cache
             the epoch touched: page cache, shared by every trial on the node and reclaimable by the kernel.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (MemorySampler, command_line, last_json_line, load_average, machine_info,  # noqa: E402
                     print_header, work_folder)

IMAGES_PER_PATIENT = 2.37          # mean of trainable.data.synthetic.IMAGES_PER_PATIENT


def child(split_csv: str, cache_dir: str, image_size: int, batch_size: int) -> dict:
    from trainable.config import TrialConfig
    from trainable.data.nih import load_prepared
    from trainable.train import train
    with MemorySampler(interval=0.02) as memory:
        data = load_prepared(split_csv)
        cfg = TrialConfig(backbone="test_resnet", pretrained="none", image_size=image_size, epochs=1,
                          batch_size=batch_size, aug_hflip=True, aug_resized_crop=True, aug_color_jitter=True)
        started = time.perf_counter()
        result = train(cfg, data, lambda metrics, checkpoint: None, cache_dir=cache_dir)
        seconds = time.perf_counter() - started
    return {"peak_mib": memory.peak, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "train_images_per_s": result.last["train_images_per_s"]}


def prepare(data_dir: Path, work: Path, size: int, image_size: int) -> dict:
    from trainable.data.cache import open_cache
    from trainable.data.nih import DataSpec, prepare_dataset
    prepared = prepare_dataset(DataSpec(data_dir=str(data_dir), max_images=size), work / f"prepared-{size}")
    splits = {split: len(prepared.subset(split)) for split in ("train", "val", "test")}
    cache_bytes = 0
    for split in ("train", "val"):                      # the caches a trial opens, keyed as train.py keys them
        cache = open_cache(prepared.subset(split)["path"].tolist(), image_size=image_size, cache_dir=work / "cache",
                           key=f"{prepared.fingerprint}-{split}", progress=False)
        cache_bytes += cache.nbytes
    return {"split_csv": str(prepared.split_csv), "splits": splits, "images": sum(splits.values()),
            "cache_mib": cache_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,4000", help="comma-separated data-set sizes (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder for the generated data (default: a temp folder)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SPLIT_CSV", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.image_size, args.batch_size)))
        return 0

    sizes = sorted(int(size) for size in args.sizes.split(","))
    if len(sizes) < 2 or sizes[0] < 200:
        parser.error("--sizes needs at least two sizes of 200 images or more (smaller splits can be empty)")
    info = machine_info()
    print_header("trial memory vs data-set size", info, command_line())
    from trainable.data.synthetic import generate
    with work_folder(args.work, keep=args.keep, prefix="cxr-memory-") as work:
        started = time.perf_counter()
        data_dir = generate(work / "data", patients=math.ceil(max(sizes) / IMAGES_PER_PATIENT * 1.05),
                            image_size=args.image_size)
        print(f"synthetic data set generated in {time.perf_counter() - started:.0f} s")
        rows = []
        for size in sizes:
            prepared = prepare(data_dir, work, size, args.image_size)
            load = load_average()
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", prepared["split_csv"],
                                   str(work / "cache"), "--image-size", str(args.image_size), "--batch-size",
                                   str(args.batch_size)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"trial failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rows.append({**prepared, **last_json_line(done.stdout), "load": load})
            print(f"  {size} done", flush=True)

    print(f"\none trial (test_resnet, {args.image_size} px, batch {args.batch_size}, 1 epoch + validation) per size, "
          f"peak memory of the trial process:")
    print(f"  {'images':>7} {'train/val/test':>16} {'cache (MiB)':>12} {'RSS':>8} {'anonymous':>10} {'file':>8} "
          f"{'PSS':>8} {'ru_maxrss':>10}   (MiB)")
    for row in rows:
        peak, splits = row["peak_mib"], row["splits"]
        print(f"  {row['images']:>7} {splits['train']:>6}/{splits['val']}/{splits['test']:<6} "
              f"{row['cache_mib']:>12.1f} {peak['self_rss']:>8.0f} {peak['self_anon']:>10.0f} {peak['self_file']:>8.0f} "
              f"{peak['tree_pss']:>8.0f} {row['ru_maxrss_mib']:>10.0f}   ({row['seconds']:.0f} s, "
              f"load {row['load']})")
    small, large = rows[0], rows[-1]
    grow = {key: large["peak_mib"][key] - small["peak_mib"][key] for key in ("self_rss", "self_anon", "self_file")}
    print(f"\nfrom {small['images']} to {large['images']} images ({large['images'] / small['images']:.1f}x, cache "
          f"+{large['cache_mib'] - small['cache_mib']:.0f} MiB): anonymous memory {grow['self_anon']:+.0f} MiB, "
          f"file-backed {grow['self_file']:+.0f} MiB (touched cache pages: shared page cache), RSS "
          f"{grow['self_rss']:+.0f} MiB")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
