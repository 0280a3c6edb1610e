"""Helpers shared by the benchmarks: machine description, generated PNGs, timing, process-tree memory and CPU.

Memory and CPU figures come from /proc (Linux), so the benchmarks need nothing beyond the project's venv.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MIB = 1024 * 1024


# --- the machine --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict:
    import PIL
    import torch
    import torchvision
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1) if hasattr(os, "sysconf") else None,
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "pillow": PIL.__version__, "numpy": np.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)",
    }
    return info


def print_header(title: str, info: dict, command: str | None = None) -> None:
    print(f"== {title} ==")
    if command:
        print(f"command: {command}")
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, device: {info['device']}")
    print(f"software: python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
          f"pillow {info['pillow']}, numpy {info['numpy']}")
    print(f"date: {info['date_utc']}, load average (1/5/15 min) at start: {info['load_average_1_5_15']}")


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        script = Path("benchmarks") / script.name
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


# --- a trial's parts -----------------------------------------------------------------------------------------

@dataclass
class TrialParts:
    model: Any          # torch.nn.Module; `forward` is it, or its compiled wrapper
    forward: Any
    augment: Any        # trainable.data.augment.BatchAugment
    criterion: Any
    optimizer: Any


def trial_parts(cfg: Any, device: Any, labels: np.ndarray, cache_dir: Path) -> TrialParts:
    """Model (on `device`, channels_last on CUDA when asked), augmentation, loss and optimizer as
    trainable.train.train builds them for a training split with these labels; compiled when cfg.compile."""
    import torch

    from trainable.backends import compile_model
    from trainable.data.augment import BatchAugment
    from trainable.losses import LabelStats, create_loss
    from trainable.models import create_model, input_stats
    from trainable.optim import create_optimizer

    torch.manual_seed(cfg.seed)
    model = create_model(cfg).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    mean, std = input_stats(model)
    augment = BatchAugment(cfg, mean=mean, std=std).to(device)
    criterion = create_loss(cfg, LabelStats.from_labels(labels)).to(device)
    forward = compile_model(model, cache_dir) if cfg.compile else model
    return TrialParts(model, forward, augment, criterion, create_optimizer(cfg, model, criterion))


# --- work folders -------------------------------------------------------------------------------------------

@contextmanager
def work_folder(path: str | None, *, keep: bool = False, prefix: str = "cxr-bench-") -> Iterator[Path]:
    """The given folder (created; what the benchmark writes there is removed afterwards unless keep) or a fresh
    temporary one (always removed unless keep)."""
    if path is None:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        folder = Path(path) / f"{prefix}{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if keep:
            print(f"kept work folder {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


# --- generated chest-X-ray-like PNGs ------------------------------------------------------------------------

def _background(size: int) -> np.ndarray:
    """A smooth chest-like picture in [0, 1]: body, two dark lungs, heart, spine (smooth areas compress well,
    as in real radiographs; the noise added per image sets the file size)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")

    def ellipse(cy, cx, ry, rx):
        return np.exp(-np.maximum(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 - 1, 0) * 8)

    body = 0.55 * ellipse(0.52, 0.5, 0.50, 0.44)
    lungs = ellipse(0.45, 0.32, 0.30, 0.15) + ellipse(0.45, 0.68, 0.30, 0.15)
    ribs = 0.06 * np.sin(2 * np.pi * (9 * y + 4 * (x - 0.5) ** 2)) * lungs
    heart = 0.2 * ellipse(0.6, 0.54, 0.11, 0.12)
    spine = 0.12 * ellipse(0.5, 0.5, 0.6, 0.03)
    return np.clip(0.08 + body - 0.28 * lungs + ribs + heart + spine, 0, 1).astype(np.float32)


def _write_png(path: Path, background: np.ndarray, seed: int, noise: float) -> int:
    from PIL import Image
    rng = np.random.default_rng(seed)
    image = background * rng.uniform(0.9, 1.1) + rng.normal(0.0, noise, background.shape).astype(np.float32)
    shift = tuple(rng.integers(-20, 21, 2))
    pixels = (np.clip(np.roll(image, shift, axis=(0, 1)), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)      # Pillow's default zlib level, 8-bit grayscale like NIH's PNGs
    return path.stat().st_size


def generate_pngs(folder: Path, count: int, *, unique: int, size: int = 1024, noise: float = 0.01,
                  seed: int = 0) -> tuple[list[str], float]:
    """`count` size x size 8-bit grayscale PNGs (about 0.5 MB each at 1024 px, like NIH's). Encoding is slow
    (~0.1 s per image), so `unique` images are encoded and the rest are byte copies of them under their own
    names: every file is still read and decoded on its own. Returns the paths and the mean file size."""
    folder.mkdir(parents=True, exist_ok=True)
    unique = max(1, min(unique, count))
    background = _background(size)
    originals = [folder / f"{index:06d}.png" for index in range(unique)]
    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:     # Pillow releases the GIL while encoding
        sizes = list(pool.map(lambda item: _write_png(item[1], background, seed + item[0], noise),
                              enumerate(originals)))
    paths = list(originals)
    for index in range(unique, count):
        target = folder / f"{index:06d}.png"
        shutil.copyfile(originals[index % unique], target)
        paths.append(target)
    mean_size = float(np.mean([sizes[index % unique] for index in range(count)]))
    return [str(path) for path in paths], mean_size


# --- timing -------------------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def repeat_until(run: Callable[[], float], *, min_repeats: int, min_seconds: float) -> list[float]:
    """Call run() (which returns one figure) at least min_repeats times and for at least min_seconds."""
    figures, started = [], time.perf_counter()
    while len(figures) < min_repeats or time.perf_counter() - started < min_seconds:
        figures.append(run())
    return figures


# --- process-tree memory and CPU (Linux /proc) --------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int | None = None) -> list[int]:
    """pid (default: this process) and all its descendants."""
    root = pid or os.getpid()
    if not os.path.isdir("/proc"):
        return [root]
    children = _children_map()
    tree, stack = [], [root]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def _status_kib(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    name, value = line.split(":", 1)
                    values[name] = int(value.split()[0])
    except OSError:
        pass
    return values


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of the given live processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / TICKS


class MemorySampler:
    """Samples this process and its descendants every `interval` s in a background thread and keeps peaks (MiB):
    tree_pss (proportional set size summed over the tree: shared pages counted once), self_rss, self_anon
    (private, anonymous memory: what grows when data is loaded into RAM) and self_file (file-backed pages
    mapped, e.g. the touched part of a memory-mapped cache: page cache, shared, reclaimable)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = {"tree_pss": 0.0, "self_rss": 0.0, "self_anon": 0.0, "self_file": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="MemorySampler")

    def sample(self) -> None:
        me = os.getpid()
        status = _status_kib(me)
        tree = process_tree(me)
        pss = sum(_pss_kib(pid) for pid in tree)
        current = {"tree_pss": pss / 1024, "self_rss": status.get("VmRSS", 0) / 1024,
                   "self_anon": status.get("RssAnon", 0) / 1024, "self_file": status.get("RssFile", 0) / 1024}
        for key, value in current.items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result line in the output:\n" + text[-2000:])
