"""Batches of cached uint8 images + labels + demographics, with optional oversampling of rare findings.

The epoch order is a pure function of (seed, epoch), so a run resumed at epoch k sees exactly the batches an
uninterrupted run sees; weighted epochs are drawn by torch's `WeightedRandomSampler` with a generator seeded from
(seed, epoch). A background thread slices the next batches out of the memmap while the trainer computes (numpy's
copy releases the GIL).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


# --- oversampling ------------------------------------------------------------------------------------------

def _uniform(labels: np.ndarray, power: float) -> np.ndarray | None:
    return None


def _rare_findings(labels: np.ndarray, power: float) -> np.ndarray:
    """Weight of an image = (1 / prevalence of its rarest positive finding) ** power; an image with no finding
    counts as the 'no finding' class, whose prevalence is the fraction of all-negative rows."""
    positive = labels > 0.5
    prevalence = positive.mean(axis=0)
    rarest = np.where(positive, prevalence, np.inf).min(axis=1)
    no_finding = ~positive.any(axis=1)
    rarest[no_finding] = no_finding.mean()
    return (1.0 / rarest) ** power


OVERSAMPLERS: dict[str, Callable[[np.ndarray, float], np.ndarray | None]] = {
    "none": _uniform,
    "rare": _rare_findings,
}


# --- batches -----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor         # uint8 (B, 1, H, W)
    labels: torch.Tensor         # float32 (B, 14)
    demographics: torch.Tensor   # float32 (B, D)
    index: np.ndarray            # row numbers in the split

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        images, labels, demographics = (tensor.to(device, non_blocking=non_blocking)
                                        for tensor in (self.images, self.labels, self.demographics))
        return Batch(images, labels, demographics, self.index)

    def __len__(self) -> int:
        return len(self.index)


_STOP_POLL_S = 0.05       # how often a blocked prefetch thread checks whether the consumer went away
_SAMPLER_STREAM = 1       # keeps the sampler's seeds apart from runtime.epoch_seeds' (same seed, same epoch)


def sampler_generator(seed: int, epoch: int) -> torch.Generator:
    """The oversampler's generator for one epoch, derived from (seed, epoch) alone, like every per-epoch stream."""
    state = np.random.SeedSequence([seed, epoch, _SAMPLER_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BatchLoader:
    """Epochs of batches over (N, H, W) uint8 images (usually the cache memmap), labels and demographics.

    With `weights`, an epoch is N draws with replacement in proportion to them (`shuffle` is then moot);
    without, a permutation, or the rows in order when shuffle=False. `prefetch` batches are prepared by a
    background thread (0: prepared on demand). `pin_memory` is ignored when no CUDA device is present.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, demographics: np.ndarray, *, batch_size: int,
                 shuffle: bool, weights: np.ndarray | None = None, seed: int = 0, drop_last: bool = False,
                 pin_memory: bool = False, prefetch: int = 2) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be a (N, H, W) uint8 array, got {images.dtype} {images.shape}")
        if not len(images) == len(labels) == len(demographics):
            raise ValueError(f"images, labels and demographics differ in length: "
                             f"{len(images)}, {len(labels)}, {len(demographics)}")
        if weights is not None and (len(weights) != len(images) or not np.all(np.isfinite(weights))
                                    or np.any(weights < 0) or not np.sum(weights) > 0):
            raise ValueError("weights must be one finite, non-negative value per image with a positive sum")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images = images
        self.labels = np.asarray(labels, np.float32)
        self.demographics = np.asarray(demographics, np.float32)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
        self.seed = seed
        self.drop_last = drop_last
        # Pinned host memory needs an accelerator; without one the flag is a no-op rather than an error.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch = prefetch

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The row numbers drawn in `epoch`, a pure function of (seed, epoch)."""
        count = len(self.images)
        if self.weights is not None:
            # torch's sampler rather than our own numpy draw: on NIH's 112,120 rows it costs 27-35 ms CPU an
            # epoch vs 26-27 ms for rng.choice(p=...) (benchmarks/oversampling.py), nothing beside an epoch of
            # training, and draws the same law (N independent draws in proportion to the weights).
            sampler = WeightedRandomSampler(self.weights, count, replacement=True,
                                            generator=sampler_generator(self.seed, epoch))
            return np.fromiter(sampler, np.int64, count)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(count) if self.shuffle else np.arange(count)

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """Each batch's row numbers, sorted so the memmap is read sequentially."""
        order = self.order(epoch)
        return [np.sort(order[start:start + self.batch_size])
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

    def make_batch(self, index: np.ndarray) -> Batch:
        height, width = self.images.shape[1:]
        images = torch.empty((len(index), 1, height, width), dtype=torch.uint8, pin_memory=self.pin_memory)
        # One gather straight into the (pinned) buffer; mode="clip" avoids numpy's extra buffered copy.
        np.take(self.images, index, axis=0, out=images.numpy().reshape(len(index), height, width), mode="clip")
        labels = torch.from_numpy(self.labels[index])
        demographics = torch.from_numpy(self.demographics[index])
        if self.pin_memory:
            labels, demographics = labels.pin_memory(), demographics.pin_memory()
        return Batch(images, labels, demographics, index)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        indices = self.batch_indices(epoch)
        if self.prefetch <= 0:
            return (self.make_batch(index) for index in indices)
        return self._prefetched(indices)

    def _prefetched(self, indices: list[np.ndarray]) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(indices, ready, stop), daemon=True,
                                  name="BatchLoader-prefetch")
        worker.start()
        try:
            for _ in indices:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Runs on exhaustion, on error, and when the consumer breaks early (generator closed).
            stop.set()
            worker.join()

    def _produce(self, indices: list[np.ndarray], ready: queue.Queue, stop: threading.Event) -> None:
        for index in indices:
            try:
                item: Batch | BaseException = self.make_batch(index)
            except BaseException as error:  # handed to the consumer, which re-raises it
                item = error
            while not stop.is_set():
                try:
                    ready.put(item, timeout=_STOP_POLL_S)
                    break
                except queue.Full:
                    continue
            if stop.is_set() or isinstance(item, BaseException):
                return
