"""The GPU check: every figure BENCHMARKS.md still lacks, measured by one script on one GPU in under 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py --json gpu_check.json         # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --json gpu_check.json         # without CUDA: the CPU path, < 2 min

Steps, in this order (each prints its figures; a failing step is recorded and the next one runs):
  versions         software versions and the device
  model_bound      img/s of the model alone (one batch already on the device) at batch 64 and 128, with and
                   without cudnn.benchmark; CUDA events, after warm-up steps
  trial_loop       trainable.train._train_one_epoch (the trial's own loop: cache -> pinned copy -> DannyNet
                   augmentations on the device -> bf16 channels_last step) over a generated cache at 224 px:
                   img/s, its ratio to model_bound, host vs device ms per step
  sync_debug       host syncs per training step, counted under torch.cuda.set_sync_debug_mode("warn")
  profile          a 10-step torch.profiler run: device kernels (CPU: top-level ops) per step, and the
                   augmentation's share of a step (timed alone on the same batches)
  augment_paths    the augmentation's separable path vs its grid_sample path on the same axis-aligned crops:
                   ms per batch and the largest difference
  replica          the CheXNet replica's defaults (batch 16, fp32): img/s and the device's busy fraction
  epoch_tail       what follows each epoch: the validation pass, the metrics, the checkpoint (synchronous vs
                   the background writer), scaled to an NIH epoch
  sharing          1, 2 and 4 processes training the replica on one GPU: combined img/s vs one
  determinism      two same-seed runs compared bit for bit, with deterministic=true and with false
  peak_memory      peak GPU memory of the gpu preset's training step at batch 128 and of its evaluation batch
  compile          torch.compile (trainable.backends.compile_model): compile time with an empty and with a
                   warm inductor cache, speed-up over eager, and the graphs compiled by an epoch + evaluation
On a machine without CUDA (or with --device cpu) the same steps run where they can, with a small timm CNN at
64 px and few steps, and the rest say why they were skipped. Exit code 0 when no step failed, 1 when one did,
2 for a bad flag. The JSON (--json) holds every figure.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")          # before torch loads (BENCHMARKS.md)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call (determinism)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]
from _common import command_line, load_average, median, trial_parts, usable_cores, work_folder  # noqa: E402

from search_spaces import load_preset  # noqa: E402
from trainable import train as train_module  # noqa: E402
from trainable.backends import configure_backends  # noqa: E402
from trainable.checkpointing import EpochReporter, Predictions  # noqa: E402
from trainable.config import TrialConfig  # noqa: E402
from trainable.data.augment import BatchAugment, _resample_affine, _resample_axis_aligned  # noqa: E402
from trainable.data.cache import open_cache  # noqa: E402
from trainable.data.loader import BatchLoader  # noqa: E402
from trainable.metrics import epoch_metrics  # noqa: E402
from trainable.optim import create_scheduler  # noqa: E402
from trainable.runtime import autocast  # noqa: E402

FINDINGS_COUNT = 14
NIH_TRAIN_IMAGES = 77_872      # official split: train_val_list.txt (86,524) less a 10% patient-wise validation
NIH_VAL_IMAGES = 8_652
BUDGET_S = 450                 # steps that would start later are skipped: the whole check stays under 8 minutes


class Skip(Exception):
    """A step (or part of one) that cannot run on this machine; the message says why."""


@dataclass
class Scale:
    """How big the check runs: the real thing on CUDA, a small CPU stand-in otherwise."""
    backbone: str
    image_size: int
    batches: tuple[int, ...]
    train_batch: int            # the gpu preset's batch
    steps: int
    warmup: int
    val_images: int
    share_seconds: float
    share_processes: tuple[int, ...]
    profile_steps: int

    @classmethod
    def for_device(cls, device: torch.device, args: argparse.Namespace) -> "Scale":
        if device.type == "cuda":
            scale = cls("densenet121", 224, (64, 128), 128, 30, 10, 2048, 10.0, (1, 2, 4), 10)
        else:
            scale = cls("test_resnet", 64, (16, 32), 32, 5, 2, 256, 3.0, (), 3)
        if args.steps:
            scale.steps = args.steps
        return scale


@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    scale: Scale
    work: Path
    images: np.ndarray | None = None       # the generated cache (N, S, S) uint8
    labels: np.ndarray | None = None
    figures: dict[str, Any] = field(default_factory=dict)   # what later steps reuse (model-bound rates)
    skipped: list[str] = field(default_factory=list)         # "step: reason" of parts skipped inside a step

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def config(self, preset: str, **overrides: Any) -> TrialConfig:
        """A preset at this check's scale (no pretrained weights are fetched: speed does not depend on them)."""
        return load_preset(preset).replace(backbone=self.scale.backbone, image_size=self.scale.image_size,
                                           pretrained="none", **overrides)

    def gpu_config(self, **overrides: Any) -> TrialConfig:
        """The gpu preset (bf16, channels_last, batch 128) with the DannyNet augmentations, as a search would
        train it; on the CPU fp32 at the CPU scale."""
        values = dict(batch_size=self.scale.train_batch, aug_resized_crop=True, aug_color_jitter=True)
        if not self.cuda:
            values.update(precision="fp32", channels_last=False)
        return self.config("gpu", **{**values, **overrides})

    def skip_part(self, step: str, reason: str) -> None:
        self.skipped.append(f"{step}: {reason}")


# --- timing on the device -------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceTimer:
    """Wall time of a region on the device: CUDA events (no host sync inside the region) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> "DeviceTimer":
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._started


# --- the trial's parts ----------------------------------------------------------------------------------------

@dataclass
class Trainer:
    """Model, augmentation, loss and optimizer exactly as trainable.train.train builds them."""
    cfg: TrialConfig
    device: torch.device
    model: torch.nn.Module
    forward: torch.nn.Module
    augment: BatchAugment
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, cfg: TrialConfig, device: torch.device, labels: np.ndarray, *, compiled: bool = False,
              cache_dir: Path | None = None) -> "Trainer":
        cfg = cfg.replace(compile=compiled)
        parts = trial_parts(cfg, device, labels, cache_dir)
        return cls(cfg, device, parts.model, parts.forward, parts.augment, parts.criterion, parts.optimizer)

    def ready_batch(self, images: np.ndarray, labels: np.ndarray, batch: int) -> tuple[torch.Tensor, ...]:
        """One batch as the augmentation hands it to the model, already on the device."""
        pixels = torch.from_numpy(np.array(images[:batch]))[:, None].to(self.device)
        self.augment.eval()
        with torch.no_grad():
            ready = self.augment(pixels)
        if self.cfg.channels_last and self.device.type == "cuda":
            ready = ready.contiguous(memory_format=torch.channels_last)
        return ready, torch.from_numpy(labels[:batch]).to(self.device), torch.zeros((batch, 0), device=self.device)

    def step(self, images: torch.Tensor, labels: torch.Tensor, demographics: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg.precision, self.device):
            logits = self.forward(images, demographics)
        loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def model_bound(self, images: np.ndarray, labels: np.ndarray, batch: int, steps: int, warmup: int) -> float:
        """img/s of the model alone: the same step on one batch already on the device."""
        self.model.train()
        ready = self.ready_batch(images, labels, batch)
        for _ in range(warmup):
            self.step(*ready)
        synchronize(self.device)
        with DeviceTimer(self.device) as timer:
            for _ in range(steps):
                self.step(*ready)
        return steps * batch / timer.seconds

    def loader(self, images: np.ndarray, labels: np.ndarray, steps: int, *, drop_last: bool = True) -> BatchLoader:
        count = min(len(images), steps * self.cfg.batch_size)
        return BatchLoader(images[:count], labels[:count], np.zeros((count, 0), np.float32),
                           batch_size=self.cfg.batch_size, shuffle=True, seed=self.cfg.seed,
                           pin_memory=self.device.type == "cuda", drop_last=drop_last)

    def epoch(self, loader: BatchLoader, epoch: int = 1) -> tuple[float, int]:
        """trainable.train's own training loop over `loader`; (seconds on the device, images)."""
        synchronize(self.device)
        with DeviceTimer(self.device) as timer:
            _, seen = train_module._train_one_epoch(self.forward, self.augment, self.criterion, self.optimizer,
                                                    loader, self.cfg, epoch, self.device)
        return timer.seconds, seen


@contextlib.contextmanager
def host_step_times() -> Any:
    """Host time of each training step (the time the host needs to queue it: no sync inside), by wrapping
    trainable.train._train_step, which _train_one_epoch looks up at every step."""
    original, times = train_module._train_step, []

    def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - started)

    train_module._train_step = timed
    try:
        yield times
    finally:
        train_module._train_step = original


# --- data -----------------------------------------------------------------------------------------------------

def generated_cache(work: Path, size: int, count: int, unique: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A decode-once cache of `count` rows at `size` px built from `unique` generated PNGs (rows repeat them:
    decoding is measured elsewhere), and random labels at NIH-like prevalence."""
    from PIL import Image
    folder = work / "png"
    folder.mkdir(parents=True, exist_ok=True)
    centres = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")

    def write(index: int) -> str:
        rng = np.random.default_rng(index)
        smooth = 0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y))
        pixels = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1) * 255
        path = folder / f"{index:05d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path, compress_level=1)
        return str(path)

    with ThreadPoolExecutor(usable_cores()) as pool:
        paths = list(pool.map(write, range(unique)))
    rows = [paths[index % unique] for index in range(count)]
    images = open_cache(rows, image_size=size, cache_dir=work / "cache", key="gpu-check", progress=False)
    labels = (np.random.default_rng(0).random((count, FINDINGS_COUNT)) < 0.1).astype(np.float32)
    return images, labels


def ensure_data(check: Check) -> tuple[np.ndarray, np.ndarray]:
    if check.images is None:
        scale = check.scale
        count = max(max(scale.batches) * (scale.steps + scale.warmup), scale.val_images, 16 * 80)
        started = time.perf_counter()
        check.images, check.labels = generated_cache(check.work, scale.image_size, count)
        print(f"  (generated cache: {count} images at {scale.image_size} px in {time.perf_counter() - started:.1f} s)")
    return check.images, check.labels


# --- the steps ------------------------------------------------------------------------------------------------

def step_versions(check: Check) -> dict:
    import PIL
    import ray
    import timm
    import torchvision
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "ray": ray.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "cuda_runtime": torch.version.cuda, "cpu_cores": usable_cores(), "load_average": load_average(),
            "device": str(check.device), "backbone": check.scale.backbone, "image_size": check.scale.image_size}
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(
            props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (nvidia-smi not found)"
    return info


def step_model_bound(check: Check) -> dict:
    images, labels = ensure_data(check)
    settings = (False, True) if check.cuda else (None,)
    if not check.cuda:
        check.skip_part("model_bound", "cudnn.benchmark on/off needs CUDA (measured once, on the CPU)")
    figures = {}
    for batch in check.scale.batches:
        trainer = Trainer.build(check.gpu_config(batch_size=batch), check.device, labels)
        for benchmark in settings:
            if benchmark is not None:
                torch.backends.cudnn.benchmark = benchmark
            rate = trainer.model_bound(images, labels, batch, check.scale.steps, check.scale.warmup)
            name = f"batch{batch}" + ("" if benchmark is None else f"_benchmark_{'on' if benchmark else 'off'}")
            figures[f"{name}_images_per_s"] = round(rate, 1)
            print(f"  batch {batch}" + ("" if benchmark is None else f", cudnn.benchmark={benchmark}") +
                  f": {rate:.1f} img/s")
        del trainer
    torch.backends.cudnn.benchmark = check.cuda
    batch = check.scale.train_batch
    check.figures["model_bound"] = figures.get(f"batch{batch}_benchmark_on_images_per_s",
                                               figures.get(f"batch{batch}_images_per_s"))
    if check.cuda:
        for batch in check.scale.batches:
            on, off = (figures[f"batch{batch}_benchmark_{state}_images_per_s"] for state in ("on", "off"))
            gain = on / off
            figures[f"batch{batch}_benchmark_speedup"] = round(gain, 3)
    return figures


def _need_model_bound(check: Check) -> float:
    if "model_bound" not in check.figures:
        raise Skip("needs the model_bound step's figure")
    return check.figures["model_bound"]


def step_trial_loop(check: Check) -> dict:
    images, labels = ensure_data(check)
    bound = _need_model_bound(check)
    configure_backends(False)
    trainer = Trainer.build(check.gpu_config(), check.device, labels)
    trainer.epoch(trainer.loader(images, labels, check.scale.warmup), epoch=0)      # warm-up, cuDNN autotuning
    seconds, rates, host = [], [], []
    for epoch in (1, 2):
        with host_step_times() as times:
            elapsed, seen = trainer.epoch(trainer.loader(images, labels, check.scale.steps), epoch=epoch)
        seconds.append(elapsed / (seen / trainer.cfg.batch_size))
        rates.append(seen / elapsed)
        host.append(median(times))
    rate = median(rates)
    figures = {"images_per_s": round(rate, 1), "model_bound_images_per_s": bound,
               "ratio_to_model_bound": round(rate / bound, 3), "device_ms_per_step": round(1e3 * median(seconds), 2),
               "host_ms_per_step": round(1e3 * median(host), 2), "batch": trainer.cfg.batch_size,
               "precision": trainer.cfg.precision, "channels_last": trainer.cfg.channels_last}
    figures["host_bound"] = figures["host_ms_per_step"] >= figures["device_ms_per_step"]
    check.figures["trial_loop"] = rate
    print(f"  {rate:.1f} img/s = {rate / bound:.3f} x model-bound ({bound:.1f}); per step: device "
          f"{figures['device_ms_per_step']} ms, host {figures['host_ms_per_step']} ms")
    return figures


def step_sync_debug(check: Check) -> dict:
    if not check.cuda:
        raise Skip("torch.cuda.set_sync_debug_mode needs CUDA (on the CPU nothing waits for a device)")
    images, labels = ensure_data(check)
    trainer = Trainer.build(check.gpu_config(), check.device, labels)
    trainer.epoch(trainer.loader(images, labels, check.scale.warmup), epoch=0)
    steps = check.scale.steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _, seen = trainer.epoch(trainer.loader(images, labels, steps), epoch=1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    count = seen // trainer.cfg.batch_size
    kinds: dict[str, int] = {}
    for message in syncs:
        kinds[message.split("\n")[0][:120]] = kinds.get(message.split("\n")[0][:120], 0) + 1
    print(f"  {len(syncs)} synchronizing calls in {count} steps ({len(syncs) / count:.3f} per step; the epoch's "
          f"end and the finiteness check every {train_module.CUDA_FINITE_CHECK_EVERY} steps are expected)")
    return {"syncs": len(syncs), "steps": count, "syncs_per_step": round(len(syncs) / count, 4), "kinds": kinds}


def step_profile(check: Check) -> dict:
    from torch.profiler import ProfilerActivity, profile
    images, labels = ensure_data(check)
    trainer = Trainer.build(check.gpu_config(), check.device, labels)
    trainer.epoch(trainer.loader(images, labels, check.scale.warmup), epoch=0)
    steps = check.scale.profile_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.cuda else [])
    synchronize(check.device)
    with profile(activities=activities) as prof:
        trainer.epoch(trainer.loader(images, labels, steps), epoch=1)
        synchronize(check.device)
    events = prof.events()
    if check.cuda:
        device_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        per_step = len(device_ops) / steps
        unit = "device kernels and copies"
    else:
        device_ops = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
        per_step = len(device_ops) / steps
        unit = "top-level aten ops"
    # the augmentation's share: its device time alone on the same batches vs a whole training step
    loader = trainer.loader(images, labels, steps)
    batches = [batch.to(check.device) for batch in loader.epoch(1)]
    generator = torch.Generator().manual_seed(0)
    trainer.augment.train()
    synchronize(check.device)
    with DeviceTimer(check.device) as augment_time:
        for batch in batches:
            trainer.augment(batch.images, generator)
    step_time, _ = trainer.epoch(trainer.loader(images, labels, steps), epoch=2)
    share = augment_time.seconds / step_time
    print(f"  {per_step:.0f} {unit} per step; augmentation {1e3 * augment_time.seconds / steps:.2f} ms of "
          f"{1e3 * step_time / steps:.2f} ms per step ({100 * share:.1f}%)")
    return {"ops_per_step": per_step, "ops_counted": unit,
            "augment_ms_per_step": round(1e3 * augment_time.seconds / steps, 3),
            "step_ms": round(1e3 * step_time / steps, 3), "augment_share": round(share, 4)}


def step_augment_paths(check: Check) -> dict:
    images, labels = ensure_data(check)
    cfg = check.gpu_config(aug_color_jitter=False)
    batch = check.scale.train_batch
    augment = BatchAugment(cfg, mean=0.5, std=0.25)
    pixels = torch.from_numpy(np.array(images[:batch]))[:, None].to(check.device)
    params = augment.sample_params(batch, *pixels.shape[-2:], generator=torch.Generator().manual_seed(0))
    theta = params.theta.to(check.device)
    gain = torch.full((batch,), 1 / 255, device=check.device)
    bias = torch.zeros(batch, device=check.device)
    paths = {"separable": lambda: _resample_axis_aligned(pixels, theta, cfg.image_size, gain, bias),
             "grid_sample": lambda: _resample_affine(pixels, theta, cfg.image_size, gain, bias)}
    figures, outputs = {"batch": batch}, {}
    for name, run in paths.items():
        for _ in range(3):
            outputs[name] = run()
        repeats = 20 if check.cuda else 5
        synchronize(check.device)
        with DeviceTimer(check.device) as timer:
            for _ in range(repeats):
                run()
        figures[f"{name}_ms_per_batch"] = round(1e3 * timer.seconds / repeats, 3)
    difference = float((outputs["separable"] - outputs["grid_sample"]).abs().max())
    figures["max_abs_difference"] = difference
    figures["separable_speedup"] = round(figures["grid_sample_ms_per_batch"] / figures["separable_ms_per_batch"], 3)
    print(f"  batch {batch}: separable {figures['separable_ms_per_batch']} ms, grid_sample "
          f"{figures['grid_sample_ms_per_batch']} ms per batch ({figures['separable_speedup']}x); largest "
          f"difference {difference:.2e} (pixel values in [0, 1])")
    return figures


def _busy_fraction(events: Any) -> float:
    """Union of the device ops' intervals over the profiled span: the fraction of time the GPU was busy."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    if not intervals:
        return float("nan")
    busy, (current_start, current_end) = 0, intervals[0]
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return busy / (intervals[-1][1] - intervals[0][0])


def step_replica(check: Check) -> dict:
    if not check.cuda:
        raise Skip("the replica's GPU utilisation needs CUDA")
    from torch.profiler import ProfilerActivity, profile
    images, labels = ensure_data(check)
    cfg = check.config("chexnet_replica")
    trainer = Trainer.build(cfg, check.device, labels)
    trainer.epoch(trainer.loader(images, labels, 20), epoch=0)
    seconds, seen = trainer.epoch(trainer.loader(images, labels, 100), epoch=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.epoch(trainer.loader(images, labels, 30), epoch=2)
    busy = _busy_fraction(prof.events())
    print(f"  chexnet_replica (batch {cfg.batch_size}, {cfg.precision}): {seen / seconds:.1f} img/s, GPU busy "
          f"{100 * busy:.0f}% of the time")
    return {"images_per_s": round(seen / seconds, 1), "busy_fraction": round(busy, 3), "batch": cfg.batch_size,
            "precision": cfg.precision}


def step_epoch_tail(check: Check) -> dict:
    images, labels = ensure_data(check)
    cfg = check.gpu_config()
    trainer = Trainer.build(cfg, check.device, labels)
    count = check.scale.val_images
    loader = BatchLoader(images[:count], labels[:count], np.zeros((count, 0), np.float32),
                         batch_size=train_module.eval_batch_size(cfg), shuffle=False, pin_memory=check.cuda)
    train_module.predict_probs(trainer.forward, trainer.augment, loader, cfg, check.device, trainer.criterion)
    started = time.perf_counter()
    val_loss, probs = train_module.predict_probs(trainer.forward, trainer.augment, loader, cfg, check.device,
                                                 trainer.criterion)
    val_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    nih_labels = (rng.random((NIH_VAL_IMAGES, FINDINGS_COUNT)) < 0.1).astype(np.float32)
    started = time.perf_counter()
    _, thresholds = epoch_metrics(nih_labels, rng.random(nih_labels.shape).astype(np.float32), val_loss=val_loss)
    metrics_s = time.perf_counter() - started
    # the checkpoint of this trainer's real state (weights + optimizer moments), reported to a local "storage"
    # folder the way Tune's report copies it
    trainer.step(*trainer.ready_batch(images, labels, 2))      # the optimizer's moments exist after a step
    scheduler = create_scheduler(cfg, trainer.optimizer)
    storage = check.work / "storage"
    sizes: list[int] = []

    def report(metrics: dict, folder: Path) -> None:
        target = storage / f"checkpoint_{metrics['epoch']:06d}"
        shutil.copytree(folder, target)
        sizes.append(sum(p.stat().st_size for p in target.iterdir()))

    state = train_module._checkpoint_state(trainer.model, trainer.optimizer, scheduler, trainer.criterion,
                                           train_module.TrialProgress(), cfg)
    predictions = Predictions(np.array([f"{i}.png" for i in range(NIH_VAL_IMAGES)]), nih_labels,
                              nih_labels, thresholds)
    waits = {}
    for background in (False, True):
        reporter = EpochReporter(report, background=background)
        started = time.perf_counter()
        reporter.submit({"epoch": len(sizes) + 1}, state, predictions)
        waits["background" if background else "synchronous"] = time.perf_counter() - started
        reporter.wait()
        waits[f"{'background' if background else 'synchronous'}_total"] = time.perf_counter() - started
    per_epoch_val = val_s / count * NIH_VAL_IMAGES
    figures = {"val_images": count, "eval_batch": loader.batch_size, "val_images_per_s": round(count / val_s, 1),
               "val_s_per_nih_epoch": round(per_epoch_val, 2), "metrics_s_per_nih_epoch": round(metrics_s, 3),
               "checkpoint_mb": round(sizes[-1] / 2**20, 1),
               "checkpoint_sync_s": round(waits["synchronous"], 3),
               "checkpoint_background_loop_wait_s": round(waits["background"], 4),
               "checkpoint_background_writer_s": round(waits["background_total"], 3)}
    if "trial_loop" in check.figures:
        epoch_s = NIH_TRAIN_IMAGES / check.figures["trial_loop"]
        figures["train_s_per_nih_epoch"] = round(epoch_s, 1)
        figures["tail_share_sync"] = round((per_epoch_val + metrics_s + waits["synchronous"]) /
                                           (epoch_s + per_epoch_val + metrics_s + waits["synchronous"]), 4)
        figures["tail_share_background"] = round((per_epoch_val + metrics_s + waits["background"]) /
                                                 (epoch_s + per_epoch_val + metrics_s + waits["background"]), 4)
    print(f"  validation {count / val_s:.0f} img/s at batch {loader.batch_size} ({per_epoch_val:.1f} s per NIH "
          f"epoch), metrics {metrics_s:.2f} s, checkpoint {figures['checkpoint_mb']} MB: synchronous "
          f"{waits['synchronous']:.2f} s, background: the loop waits {waits['background']:.3f} s")
    return figures


def _share_worker(args: argparse.Namespace) -> int:
    """One process of the sharing step: the replica's model-bound loop; after its warm-up it prints `ready` and
    starts timing when a line arrives on stdin (all workers at once), for --seconds."""
    device = pick_device(args.device)
    scale = Scale.for_device(device, args)
    cfg = load_preset("chexnet_replica").replace(backbone=scale.backbone, image_size=scale.image_size,
                                                 pretrained="none")
    labels = (np.random.default_rng(0).random((cfg.batch_size, FINDINGS_COUNT)) < 0.1).astype(np.float32)
    images = np.random.default_rng(0).integers(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size), np.uint8)
    torch.backends.cudnn.benchmark = True
    trainer = Trainer.build(cfg, device, labels)
    ready = trainer.ready_batch(images, labels, cfg.batch_size)
    for _ in range(scale.warmup):
        trainer.step(*ready)
    synchronize(device)
    print("ready", flush=True)
    sys.stdin.readline()
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        for _ in range(5):
            trainer.step(*ready)
        synchronize(device)
        steps += 5
    print(json.dumps({"images_per_s": steps * cfg.batch_size / (time.perf_counter() - started)}), flush=True)
    return 0


def _run_together(workers: list[subprocess.Popen], logs: list, timeout: float) -> list[float]:
    """Wait until every worker is warmed up, start their timed loops at once, return their img/s."""
    for worker, log in zip(workers, logs):
        line = "start"
        while line and line.strip() != "ready":                    # "": EOF, the worker died while starting
            line = worker.stdout.readline()
        if not line:
            worker.wait(timeout=timeout)
            log.seek(0)
            raise RuntimeError(f"sharing worker failed ({worker.returncode}): {log.read().strip()[-500:]}")
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    rates = []
    for worker in workers:
        out, _ = worker.communicate(timeout=timeout)
        if worker.returncode != 0:
            raise RuntimeError(f"sharing worker failed ({worker.returncode})")
        rates.append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    return rates


def step_sharing(check: Check) -> dict:
    if not check.cuda:
        raise Skip("processes sharing a GPU needs CUDA (on the CPU they would only split the cores)")
    figures: dict[str, Any] = {"config": "chexnet_replica"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "share", "--device", "cuda",
               "--seconds", str(check.scale.share_seconds)]
    for processes in check.scale.share_processes:
        logs = [open(check.work / f"share-{processes}-{index}.log", "w+") for index in range(processes)]
        workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    cwd=REPO) for log in logs]
        try:
            rates = _run_together(workers, logs, timeout=300)
        finally:
            for worker, log in zip(workers, logs):
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
                log.close()
        figures[f"processes{processes}_images_per_s"] = round(sum(rates), 1)
        figures[f"processes{processes}_per_process"] = [round(rate, 1) for rate in rates]
        print(f"  {processes} process(es): {sum(rates):.1f} img/s combined ({', '.join(f'{r:.1f}' for r in rates)})")
    alone = figures["processes1_images_per_s"]
    for processes in check.scale.share_processes[1:]:
        figures[f"processes{processes}_vs_one"] = round(figures[f"processes{processes}_images_per_s"] / alone, 3)
    return figures


def _same_seed_run(check: Check, deterministic: bool, images: np.ndarray, labels: np.ndarray) -> dict:
    configure_backends(deterministic)
    cfg = check.gpu_config(deterministic=deterministic, batch_size=min(64, check.scale.train_batch))
    trainer = Trainer.build(cfg, check.device, labels)
    trainer.epoch(trainer.loader(images, labels, 10), epoch=1)
    return {key: value.detach().cpu().clone() for key, value in trainer.model.state_dict().items()}


def step_determinism(check: Check) -> dict:
    images, labels = ensure_data(check)
    figures = {}
    modes = (True, False) if check.cuda else (True,)
    if not check.cuda:
        check.skip_part("determinism", "deterministic=false differs from true only on a GPU (cuDNN's kernels)")
    for deterministic in modes:
        try:
            first, second = (_same_seed_run(check, deterministic, images, labels) for _ in range(2))
        finally:
            configure_backends(False)
        differing = [key for key in first if not torch.equal(first[key], second[key])]
        largest = max((float((first[k].float() - second[k].float()).abs().max()) for k in differing), default=0.0)
        name = "deterministic" if deterministic else "default"
        figures[f"{name}_bit_identical"] = not differing
        figures[f"{name}_tensors_differing"] = len(differing)
        figures[f"{name}_max_abs_difference"] = largest
        print(f"  deterministic={deterministic}: two same-seed runs of 10 steps "
              + ("identical bit for bit" if not differing else f"differ in {len(differing)} of {len(first)} "
                                                                f"tensors (largest {largest:.2e})"))
    return figures


def step_peak_memory(check: Check) -> dict:
    if not check.cuda:
        raise Skip("peak GPU memory needs CUDA")
    images, labels = ensure_data(check)
    cfg = check.gpu_config()
    trainer = Trainer.build(cfg, check.device, labels)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(check.device)
    trainer.epoch(trainer.loader(images, labels, 5), epoch=1)
    train_peak = torch.cuda.max_memory_allocated(check.device)
    train_reserved = torch.cuda.max_memory_reserved(check.device)
    torch.cuda.reset_peak_memory_stats(check.device)
    count = train_module.eval_batch_size(cfg)
    loader = BatchLoader(images[:count], labels[:count], np.zeros((count, 0), np.float32), batch_size=count,
                         shuffle=False, pin_memory=True)
    train_module.predict_probs(trainer.forward, trainer.augment, loader, cfg, check.device, trainer.criterion)
    eval_peak = torch.cuda.max_memory_allocated(check.device)
    gib = 2**30
    print(f"  training at batch {cfg.batch_size}: peak {train_peak / gib:.2f} GiB allocated "
          f"({train_reserved / gib:.2f} reserved); evaluation at batch {count}: peak {eval_peak / gib:.2f} GiB")
    return {"train_batch": cfg.batch_size, "train_peak_gib": round(train_peak / gib, 2),
            "train_reserved_gib": round(train_reserved / gib, 2), "eval_batch": count,
            "eval_peak_gib": round(eval_peak / gib, 2)}


def step_compile(check: Check) -> dict:
    if not check.cuda and not check.args.compile_on_cpu:
        raise Skip("no CUDA: inductor would compile C++ for minutes on 2 CPU cores (BENCHMARKS.md); "
                   "--compile-on-cpu runs it (the recompile rule is tested with dynamo's eager backend in "
                   "tests/test_gpu_ready.py)")
    from torch._dynamo.utils import counters
    images, labels = ensure_data(check)
    bound = _need_model_bound(check)
    cfg = check.gpu_config()
    inductor = check.work / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)          # empty: the cold compile
    figures: dict[str, Any] = {}
    for label in ("cold", "warm"):
        torch._dynamo.reset()
        trainer = Trainer.build(cfg, check.device, labels, compiled=True, cache_dir=check.work)
        ready = trainer.ready_batch(images, labels, cfg.batch_size)
        trainer.model.train()
        synchronize(check.device)
        started = time.perf_counter()
        trainer.step(*ready)
        synchronize(check.device)
        figures[f"first_step_s_{label}_cache"] = round(time.perf_counter() - started, 1)
    rate = trainer.model_bound(images, labels, cfg.batch_size, check.scale.steps, check.scale.warmup)
    figures.update(compiled_images_per_s=round(rate, 1), eager_images_per_s=bound,
                   speedup=round(rate / bound, 3))
    # graphs compiled by a training epoch ending in a partial batch plus an evaluation pass (expected: 2)
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer.build(cfg, check.device, labels, compiled=True, cache_dir=check.work)
    count = check.scale.steps * cfg.batch_size + 7
    loader = BatchLoader(images[:count], labels[:count], np.zeros((count, 0), np.float32), batch_size=cfg.batch_size,
                         shuffle=True, pin_memory=check.cuda, drop_last=True)
    trainer.epoch(loader, epoch=1)
    evaluation = BatchLoader(images[:300], labels[:300], np.zeros((300, 0), np.float32),
                             batch_size=train_module.eval_batch_size(cfg), shuffle=False, pin_memory=check.cuda)
    train_module.predict_probs(trainer.forward, trainer.augment, evaluation, cfg, check.device, trainer.criterion,
                               pad_to=evaluation.batch_size)
    trainer.epoch(loader, epoch=2)
    figures["graphs_after_two_epochs_and_eval"] = int(counters["stats"]["unique_graphs"])
    print(f"  first step {figures['first_step_s_cold_cache']} s with an empty inductor cache, "
          f"{figures['first_step_s_warm_cache']} s with it warm; {rate:.1f} img/s compiled vs {bound:.1f} eager "
          f"({figures['speedup']}x); {figures['graphs_after_two_epochs_and_eval']} graphs compiled (expected 2)")
    return figures


STEPS: dict[str, Callable[[Check], dict]] = {
    "versions": step_versions,
    "model_bound": step_model_bound,
    "trial_loop": step_trial_loop,
    "sync_debug": step_sync_debug,
    "profile": step_profile,
    "augment_paths": step_augment_paths,
    "replica": step_replica,
    "epoch_tail": step_epoch_tail,
    "sharing": step_sharing,
    "determinism": step_determinism,
    "peak_memory": step_peak_memory,
    "compile": step_compile,
}


# --- running --------------------------------------------------------------------------------------------------

def pick_device(choice: str) -> torch.device:
    """auto: the first GPU when CUDA is present, else the CPU; cpu: the CPU path even on a GPU machine."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise Skip("--device cuda: no CUDA device is visible to torch")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="where the figures go (default: %(default)s)")
    parser.add_argument("--only", default=None, metavar="A,B", help=f"run only these steps of: {', '.join(STEPS)}")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default: 30 on CUDA, "
                                                            "5 on the CPU)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="skip steps that would start after this many seconds (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: CUDA when present; cpu: the CPU path on any machine (default: %(default)s)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="run the compile step without CUDA too")
    parser.add_argument("--work", default=None, help="folder for the generated data (default: a temp folder)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--worker", choices=["share"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker == "share":
        return _share_worker(args)
    selected = list(STEPS) if args.only is None else [name.strip() for name in args.only.split(",")]
    unknown = [name for name in selected if name not in STEPS]
    if unknown:
        print(f"error: --only {args.only!r}: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}",
              file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)
    except Skip as reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "the CPU (no CUDA device)"
    print(f"== GPU check on {where} ==")
    print(f"command: {command_line()}")
    results: dict[str, dict] = {}
    with work_folder(args.work, keep=args.keep, prefix="cxr-gpu-check-") as work:
        check = Check(args, device, Scale.for_device(device, args), work)
        for name in selected:
            elapsed = time.perf_counter() - started
            print(f"\n[{name}] ({elapsed:.0f} s)", flush=True)
            if elapsed > args.budget_s:
                results[name] = {"status": "skipped", "reason": f"time budget of {args.budget_s:.0f} s spent"}
                print(f"  skipped: {results[name]['reason']}")
                continue
            step_started = time.perf_counter()
            try:
                figures = STEPS[name](check)
                results[name] = {"status": "ok", "figures": figures}
            except Skip as reason:
                results[name] = {"status": "skipped", "reason": str(reason)}
                print(f"  skipped: {reason}")
            except Exception as error:  # noqa: BLE001 - one failing step must not cost the others' figures
                results[name] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc()[-4000:]}
                print(f"  ERROR: {type(error).__name__}: {error}")
            results[name]["seconds"] = round(time.perf_counter() - step_started, 1)
    total = time.perf_counter() - started
    skipped = [f"{name}: {r['reason']}" for name, r in results.items() if r["status"] == "skipped"] + check.skipped
    failed = [name for name, r in results.items() if r["status"] == "error"]
    report = {"device": str(device), "seconds": round(total, 1), "command": command_line(), "steps": results,
              "skipped": skipped, "failed": failed, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{len(results) - len(failed) - sum(r['status'] == 'skipped' for r in results.values())} step(s) "
          f"measured, {len(failed)} failed, in {total:.0f} s; figures in {args.json}")
    for line in skipped:
        print(f"skipped: {line}")
    for name in failed:
        print(f"FAILED: {name}: {results[name]['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
