"""Per-epoch checkpoints that keep the accelerator busy: the training loop only takes a host copy of the state
at the end of an epoch; a background thread writes the checkpoint folder and hands it to `report` while the
next epoch trains.

What the training loop may rely on:
  * a checkpoint folder is complete (every file written and closed) before `report` sees it, and `report`
    (Tune's persists the folder to `--storage` inside the call) returns before the folder is removed: whatever
    was reported can be resumed from, also by a process killed right after the report;
  * reports keep epoch order and at most one is in flight: epoch k+1's checkpoint waits until epoch k's
    report has returned, so the host buffers of the copy are reused only once they were written;
  * the copy is taken before the next step changes a parameter (on CUDA: device-to-host copies into pinned
    buffers queued on the training stream ahead of the next epoch's kernels, waited for by the writer, not by
    the loop), so the folder holds exactly the epoch-end state: resume stays exact;
  * whatever the writer or `report` raises (a full disk, a storage error, and Tune's stop of the trial, which
    reaches `tune.report` as SystemExit) is raised in the training thread at its next step (`raise_pending`).

The price: a Tune scheduler (ASHA) sees epoch k's result while the trial trains epoch k+1, so a trial it stops
ends at the next step of epoch k+1 instead of right after epoch k.

The idle time removed per epoch: serialising and writing the state (~84 MB for DenseNet-121 with Adam's
moments), copying it to the storage, and the driver's processing of the report (ASHA, the MLflow logger),
during all of which the synchronous loop kept the GPU idle.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint_files import PREDICTIONS_FILE, STATE_FILE, THRESHOLDS_FILE
from .findings import FINDINGS

Report = Callable[[dict, Path], None]


@dataclass
class Predictions:
    """The validation split's predictions saved with each checkpoint (the sweep's effect analysis reads them)."""
    images: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    thresholds: np.ndarray


class HostCopy:
    """Copies a (nested) state dict to host memory, into buffers reused epoch after epoch: CUDA tensors into
    pinned buffers, asynchronously (`ready()` waits for them), CPU tensors synchronously; everything else is
    deep-copied. Reused buffers matter on the CPU too: fresh 80 MB of tensors cost more in page faults than the
    copy (a 1.4 s clone vs tens of ms, BENCHMARKS.md)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._event: torch.cuda.Event | None = None

    def __call__(self, state: Any) -> Any:
        self._event = None
        copied = self._copy(state, ())
        if self._event is not None:
            self._event.record()          # on the current stream, after the copies it must wait for
        return copied

    def ready(self) -> None:
        """Block until the device-to-host copies of the last call have landed (called by the writer)."""
        if self._event is not None:
            self._event.synchronize()

    def _copy(self, value: Any, path: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value.detach(), path)
        if isinstance(value, dict):
            return {key: self._copy(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(item, (*path, index)) for index, item in enumerate(value)]
            return type(value)(items) if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _tensor(self, tensor: torch.Tensor, path: tuple) -> torch.Tensor:
        on_cuda = tensor.device.type == "cuda"
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[path] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_cuda)
        buffer.copy_(tensor, non_blocking=on_cuda)
        if on_cuda and self._event is None:
            self._event = torch.cuda.Event()
        return buffer


def write_checkpoint(folder: Path, state: dict, predictions: Predictions) -> None:
    """The checkpoint files: STATE_FILE (torch.save of `state`), PREDICTIONS_FILE and THRESHOLDS_FILE."""
    torch.save(state, folder / STATE_FILE)
    np.savez_compressed(folder / PREDICTIONS_FILE, images=predictions.images, labels=predictions.labels,
                        probs=predictions.probs, findings=np.array(FINDINGS))
    (folder / THRESHOLDS_FILE).write_text(
        json.dumps(dict(zip(FINDINGS, map(float, predictions.thresholds))), indent=2))


class EpochReporter:
    """Writes each epoch's checkpoint into a temporary folder, calls `report(metrics, folder)`, removes it.

    background=True (the default of trainable.train) does both in a thread, one epoch at a time;
    background=False does them in the caller, before `submit` returns (the former synchronous loop).
    """

    def __init__(self, report: Report, *, background: bool = True) -> None:
        self.report = report
        self.background = background
        self._copy = HostCopy()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, metrics: dict, state: dict, predictions: Predictions) -> None:
        """Checkpoint and report one epoch: waits for the previous epoch's report, copies `state` to the host
        (the only work the training loop waits for in background mode), then writes and reports."""
        self.wait()
        snapshot = self._copy(state)
        if not self.background:
            self._write_and_report(dict(metrics), snapshot, predictions)
            self.raise_pending()
            return
        self._thread = threading.Thread(target=self._write_and_report, args=(dict(metrics), snapshot, predictions),
                                        name="checkpoint-writer", daemon=True)
        self._thread.start()

    def raise_pending(self) -> None:
        """Re-raise, in the training thread, what the writer or `report` raised (cheap: call it every step)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Until the epoch in flight is written and reported; then raise what it raised, if anything."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_pending()

    def close(self) -> None:
        """Let a report in flight finish (its checkpoint is the one a retry resumes from) without raising:
        called while the training loop itself is failing."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write_and_report(self, metrics: dict, snapshot: dict, predictions: Predictions) -> None:
        try:
            self._copy.ready()
            folder = Path(tempfile.mkdtemp(prefix="cxr-checkpoint-"))
            try:
                write_checkpoint(folder, snapshot, predictions)
                self.report(metrics, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        except BaseException as error:  # noqa: BLE001 - every outcome goes back to the training thread
            self._error = error
