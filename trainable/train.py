"""train(config, data, report): one trial's loop, with per-epoch checkpoints it can resume from exactly.

It knows nothing of Ray or MLflow: each epoch it writes a checkpoint folder and hands it, with the epoch's
metrics, to `report`. Adapters (the CLI, trainable.tune) decide where reports and checkpoints go. Checkpoints
are written and reported from a background thread while the next epoch trains (trainable.checkpointing);
resume is exact on the CPU, and on a GPU with deterministic=true (trainable.backends).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backends import compile_model, configure_backends
from .checkpoint_files import PREDICTIONS_FILE, STATE_FILE, THRESHOLDS_FILE  # noqa: F401 - re-exported
from .checkpointing import EpochReporter, Predictions, Report
from .config import TrialConfig
from .cost import TRAIN_FLOPS_PER_FORWARD, model_cost, peak_memory, reset_peak_memory
from .data.augment import BatchAugment
from .data.cache import open_cache, split_cache_key
from .data.demographics import demographic_matrix
from .data.loader import OVERSAMPLERS, BatchLoader
from .data.nih import PreparedData
from .errors import ConfigError, TrialDiverged, UserError
from .losses import LabelStats, create_loss
from .metric_names import (DEVICE_HOURS, FLOPS_PER_IMAGE, TIMING_METRICS, TRAIN_FLOPS, VAL_AUC_MEAN,  # noqa: F401
                           WALL_SECONDS)
from .metrics import epoch_metrics
from .models import create_model, input_stats
from .optim import create_optimizer, create_scheduler
from .runtime import autocast, default_cache_dir, epoch_seeds, pick_device, seed_everything

EVAL_BATCH_MIN = 256              # evaluation keeps no activations for backward: larger batches fit


def eval_batch_size(cfg: TrialConfig) -> int:
    return max(EVAL_BATCH_MIN, 2 * cfg.batch_size)


@dataclass
class SplitArrays:
    """One split as the trial consumes it: cached pixels, labels, demographic inputs and image names."""
    images: np.ndarray
    labels: np.ndarray
    demographics: np.ndarray
    names: np.ndarray

    @classmethod
    def load(cls, data: PreparedData, split: str, cfg: TrialConfig, cache_dir: Path) -> "SplitArrays":
        frame = data.subset(split)
        images = open_cache(frame["path"].tolist(), image_size=cfg.image_size, cache_dir=cache_dir,
                            key=split_cache_key(data.fingerprint, split))
        demographics = demographic_matrix(frame, cfg.demographics, age_fill=data.train_age_mean())
        return cls(images=images, labels=data.labels(split), demographics=demographics,
                   names=frame["image"].to_numpy(str))


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    # per epoch: seconds of training, of validation + metrics, and of checkpointing the loop waited for
    timings: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def train(cfg: TrialConfig, data: PreparedData, report: Report, *, cache_dir: str | Path | None = None,
          resume_from: str | Path | None = None, device: torch.device | None = None,
          background_checkpoint: bool = True) -> TrainResult:
    """Train one trial; call `report(metrics, checkpoint_dir)` after every epoch.

    `resume_from` is a checkpoint folder written by an earlier epoch: training continues at the next epoch with
    the same model, optimizer, scheduler and early-stopping state, and the same random draws. `report` runs in
    a background thread (background_checkpoint=False: in the loop, as before), always with a complete
    checkpoint, in epoch order; every report has been made when train returns.
    """
    device = device or pick_device()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    configure_backends(cfg.deterministic)
    seed_everything(cfg.seed)
    train_split = SplitArrays.load(data, "train", cfg, cache_dir)
    val_split = SplitArrays.load(data, "val", cfg, cache_dir)

    model = create_model(cfg).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cost = model_cost(model, cfg.image_size, train_split.demographics.shape[1], device)
    reset_peak_memory(device)
    mean, std = input_stats(model)
    augment = BatchAugment(cfg, mean=mean, std=std).to(device)
    criterion = create_loss(cfg, LabelStats.from_labels(train_split.labels)).to(device)
    optimizer = create_optimizer(cfg, model, criterion)
    scheduler = create_scheduler(cfg, optimizer)
    forward = compile_model(model, cache_dir) if cfg.compile else model

    weights = OVERSAMPLERS[cfg.oversample](train_split.labels, cfg.oversample_power)
    pin = device.type == "cuda"
    # A compiled model sees one training shape: the last partial batch is dropped (a fresh draw every epoch).
    drop_last = cfg.compile and len(train_split.labels) >= cfg.batch_size
    train_loader = BatchLoader(train_split.images, train_split.labels, train_split.demographics,
                               batch_size=cfg.batch_size, shuffle=True, weights=weights, seed=cfg.seed, pin_memory=pin,
                               drop_last=drop_last)
    val_loader = BatchLoader(val_split.images, val_split.labels, val_split.demographics,
                             batch_size=eval_batch_size(cfg), shuffle=False, seed=cfg.seed, pin_memory=pin)
    pad_eval_to = val_loader.batch_size if cfg.compile else None

    progress = TrialProgress()
    if resume_from is not None:
        progress = _restore(Path(resume_from), model, optimizer, scheduler, criterion, cfg)

    result = TrainResult(best_epoch=progress.best_epoch)
    reporter = EpochReporter(report, background=background_checkpoint)
    try:
        for epoch in range(progress.next_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            train_loss, seen = _train_one_epoch(forward, augment, criterion, optimizer, train_loader, cfg, epoch,
                                                device, between_steps=reporter.raise_pending)
            trained = time.perf_counter()
            val_loss, probs = predict_probs(forward, augment, val_loader, cfg, device, criterion, pad_to=pad_eval_to)
            metrics, thresholds = epoch_metrics(val_split.labels, probs, val_loss=val_loss)
            epoch_seconds = time.perf_counter() - started          # training + validation: what plan_sweep costs
            scheduler.step(val_loss)
            progress.update(epoch, metrics[VAL_AUC_MEAN])
            progress.wall_seconds += epoch_seconds
            progress.images_trained += seen
            stop = progress.should_stop(cfg.early_stop_patience)
            # early_stopped=1 on the last report of a trial that ended itself (schedulers' stops are not marked)
            metrics = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                       "train_images_per_s": seen / (trained - started), "epoch_seconds": epoch_seconds,
                       "early_stopped": float(stop and epoch < cfg.epochs), **metrics,
                       **_cost_so_far(cost, progress, device)}
            validated = time.perf_counter()
            reporter.submit(metrics, _checkpoint_state(model, optimizer, scheduler, criterion, progress, cfg),
                            Predictions(val_split.names, val_split.labels, probs, thresholds))
            result.timings.append({"train_s": trained - started, "val_s": validated - trained,
                                   "checkpoint_s": time.perf_counter() - validated})
            result.history.append(metrics)
            result.best_epoch = progress.best_epoch
            if stop:
                result.stopped_early = epoch < cfg.epochs
                break
        waited = time.perf_counter()
        reporter.wait()                      # the last report is made before train returns
        if result.timings:
            result.timings[-1]["checkpoint_s"] += time.perf_counter() - waited
    finally:
        reporter.close()
    return result


# --- one epoch ----------------------------------------------------------------------------------

# On CUDA a finiteness check every step would stall the host on the device; every this many steps it costs nothing.
CUDA_FINITE_CHECK_EVERY = 50


def _train_one_epoch(model, augment, criterion, optimizer, loader, cfg, epoch, device,
                     between_steps: Callable[[], None] | None = None) -> tuple[float, int]:
    """One epoch of training; `between_steps` runs before every step (the checkpoint writer's errors surface there)."""
    model.train()
    augment.train()
    dropout_seed, augment_seed = epoch_seeds(cfg.seed, epoch)
    torch.manual_seed(dropout_seed)  # dropout and friends
    generator = torch.Generator().manual_seed(augment_seed)
    check_every = CUDA_FINITE_CHECK_EVERY if device.type == "cuda" else 1
    total, seen = torch.zeros((), device=device), 0
    # closing(): an exception mid-epoch stops the loader's prefetch thread now, not when garbage-collected
    with contextlib.closing(loader.epoch(epoch)) as batches:
        for step, batch in enumerate(batches):
            if between_steps is not None:
                between_steps()
            batch = batch.to(device)
            loss = _train_step(model, augment, criterion, optimizer, batch, generator, cfg, device)
            if step % check_every == 0:
                _check_finite(loss, epoch, step, optimizer, cfg)
            total += loss.detach() * len(batch.labels)
            seen += len(batch.labels)
    _check_finite(total, epoch, "end", optimizer, cfg)
    return total.item() / max(seen, 1), seen


def _train_step(model, augment, criterion, optimizer, batch, generator, cfg, device) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns its loss."""
    images = augment(batch.images, generator)
    if cfg.channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(cfg.precision, device):
        logits = model(images, batch.demographics)
    loss = criterion(logits.float(), batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _check_finite(loss: torch.Tensor, epoch: int, step, optimizer, cfg: TrialConfig) -> None:
    if not torch.isfinite(loss):
        raise TrialDiverged(f"training loss became {loss.item()} at epoch {epoch}, step {step} "
                            f"(lr={optimizer.param_groups[0]['lr']:g}, loss={cfg.loss})")


@torch.no_grad()
def predict_probs(model, augment, loader, cfg, device, criterion=None, pad_to: int | None = None
                  ) -> tuple[float, np.ndarray]:
    """Probabilities for every row of `loader`, in its order, and the mean loss (NaN without a criterion).

    The one evaluation step: validation during training and test prediction in final training both use it.
    `pad_to`: a shorter batch is padded with zero rows to this size (their outputs dropped), so a compiled
    model sees one evaluation shape.
    """
    model.eval()
    augment.eval()
    losses, probs = [], []
    for batch in loader.epoch(0):
        batch = batch.to(device)
        count = len(batch)
        images, demographics = batch.images, batch.demographics
        if pad_to is not None and count < pad_to:
            images, demographics = _pad_rows(images, pad_to), _pad_rows(demographics, pad_to)
        with autocast(cfg.precision, device):
            logits = model(augment(images), demographics).float()[:count]
        if criterion is not None:
            losses.append(criterion(logits, batch.labels) * len(batch.labels))
        probs.append(torch.sigmoid(logits))
    probs_all = torch.cat(probs).cpu().numpy().astype(np.float32)
    mean_loss = float(torch.stack(losses).sum()) / len(probs_all) if losses else math.nan
    return mean_loss, probs_all


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    padded = torch.cat([tensor, tensor.new_zeros((rows - len(tensor), *tensor.shape[1:]))])
    # An empty tensor (no demographic inputs) keeps its strides: a compiled model's guards compare them too.
    return padded.as_strided(padded.shape, tensor.stride()) if tensor.numel() == 0 else padded


def _cost_so_far(cost: dict[str, float], progress: "TrialProgress", device: torch.device) -> dict[str, float]:
    """The cost metrics (trainable.metric_names) of the trial up to this epoch, resumed epochs included."""
    return {**cost, TRAIN_FLOPS: TRAIN_FLOPS_PER_FORWARD * cost[FLOPS_PER_IMAGE] * progress.images_trained,
            WALL_SECONDS: progress.wall_seconds, DEVICE_HOURS: progress.wall_seconds / 3600,   # one device a trial
            **peak_memory(device)}


# --- progress and checkpoints -------------------------------------------------------------------

@dataclass
class TrialProgress:
    next_epoch: int = 1
    best_auc: float = -math.inf
    best_epoch: int = 0
    epochs_without_gain: int = 0
    # what the trial has spent so far (a checkpoint written before these existed resumes them from 0)
    wall_seconds: float = 0.0
    images_trained: int = 0

    def update(self, epoch: int, auc_mean: float) -> None:
        self.next_epoch = epoch + 1
        if auc_mean > self.best_auc:
            self.best_auc, self.best_epoch, self.epochs_without_gain = auc_mean, epoch, 0
        else:
            self.epochs_without_gain += 1

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.epochs_without_gain >= patience


def _checkpoint_state(model, optimizer, scheduler, criterion, progress: TrialProgress, cfg: TrialConfig
                      ) -> dict:
    """What STATE_FILE holds (live tensors: the reporter copies them to the host before the next step)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            # the criterion's own learned variables (aucm's a, b, alpha) resume with the model
            "scheduler": scheduler.state_dict(), "criterion": criterion.state_dict(),
            "progress": dict(vars(progress)), "config": cfg.to_dict(),
            # randomness is re-derived from (seed, epoch): see runtime.epoch_seeds
            "rng": {"seed": cfg.seed, "next_epoch": progress.next_epoch}}


def load_checkpoint(folder: str | Path, cfg: TrialConfig) -> dict:
    """A checkpoint's state, read with weights_only=True and checked to be `cfg`'s; a clear UserError otherwise."""
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = TrialConfig.from_dict(state["config"])
        TrialProgress(**state["progress"])
    except FileNotFoundError:
        raise UserError(f"{folder}: no {STATE_FILE} there; expected a checkpoint folder written by a trial "
                        "(OUT/checkpoints/epoch_NNN)") from None
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the user's remedy is the same
        raise UserError(f"{path}: not a loadable checkpoint ({type(err).__name__}; read with weights_only=True, "
                        "which refuses pickled objects other than tensors); expected a state.pt written by a trial"
                        ) from None
    if saved != cfg:
        changed = sorted(k for k, v in saved.to_dict().items() if cfg.to_dict()[k] != v)
        raise ConfigError(f"{path}: checkpoint was written with a different config (keys {', '.join(changed)})")
    return state


def _restore(folder: Path, model, optimizer, scheduler, criterion, cfg: TrialConfig) -> TrialProgress:
    state = load_checkpoint(folder, cfg)
    model.load_state_dict(state["model"])
    criterion.load_state_dict(state.get("criterion", {}), strict="criterion" in state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return TrialProgress(**state["progress"])


def copy_checkpoint(source: Path, destination: Path) -> None:
    """Copy a checkpoint folder so that `destination` appears complete or not at all; on any failure (a full disk)
    the partial copy is removed and the OSError raised as is (shutil.copytree would wrap it without its errno)."""
    staging = destination.with_name(destination.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for entry in source.iterdir():
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, staging / entry.name)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
