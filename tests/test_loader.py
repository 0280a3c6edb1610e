"""BatchLoader order, coverage, weighting, batch contents and prefetch-thread shutdown; oversampling weights."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trainable.data.loader import OVERSAMPLERS, Batch, BatchLoader
from trainable.findings import NUM_FINDINGS

N, H, W = 103, 8, 8


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, H, W), dtype=np.uint8)
    labels = (rng.random((N, NUM_FINDINGS)) < 0.2).astype(np.float32)
    demographics = rng.random((N, 3)).astype(np.float32)
    return images, labels, demographics


def loader(arrays, **options) -> BatchLoader:
    settings = {"batch_size": 16, "shuffle": True, **options}
    return BatchLoader(*arrays, **settings)


def epoch_indices(batch_loader: BatchLoader, epoch: int) -> list[np.ndarray]:
    return [batch.index for batch in batch_loader.epoch(epoch)]


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "BatchLoader-prefetch"]


# --- order -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["permutation", "oversampled"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_order_is_determined_by_seed_and_epoch(arrays, prefetch, weighted):
    weights = {"weights": np.linspace(1, 5, N)} if weighted else {}
    first = epoch_indices(loader(arrays, seed=3, prefetch=prefetch, **weights), 5)
    again = epoch_indices(loader(arrays, seed=3, prefetch=prefetch, **weights), 5)   # a fresh loader, as after resume
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    next_epoch = epoch_indices(loader(arrays, seed=3, **weights), 6)
    other_seed = epoch_indices(loader(arrays, seed=4, **weights), 5)
    assert not np.array_equal(np.concatenate(first), np.concatenate(next_epoch))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))


def test_every_row_once_per_epoch_without_weights(arrays):
    batch_loader = loader(arrays)
    batches = epoch_indices(batch_loader, 0)
    assert len(batches) == len(batch_loader) == 7
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(N))
    assert all(np.all(np.diff(index) >= 0) for index in batches)      # sorted for sequential reads


def test_no_shuffle_is_sequential(arrays):
    assert np.array_equal(np.concatenate(epoch_indices(loader(arrays, shuffle=False), 0)), np.arange(N))


def test_drop_last(arrays):
    batch_loader = loader(arrays, drop_last=True)
    batches = epoch_indices(batch_loader, 0)
    assert len(batches) == len(batch_loader) == N // 16
    assert {len(index) for index in batches} == {16}


def test_weighted_draws_follow_the_weights(arrays):
    weights = np.ones(N)
    weights[:10] = 10.0                      # 10 rare rows carry 100 / 193 of the mass
    batch_loader = loader(arrays, weights=weights, batch_size=50)
    drawn = np.concatenate([np.concatenate(epoch_indices(batch_loader, epoch)) for epoch in range(20)])
    assert len(drawn) == 20 * N
    share = np.isin(drawn, np.arange(10)).mean()
    assert abs(share - 100 / 193) < 0.05
    assert len(np.unique(drawn[:N])) < N     # with replacement


# --- contents ----------------------------------------------------------------------------------------------

def test_batch_contents_match_the_arrays(arrays):
    images, labels, demographics = arrays
    for batch in loader(arrays).epoch(1):
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (len(batch.index), 1, H, W)
        assert batch.labels.dtype == torch.float32 and batch.demographics.dtype == torch.float32
        assert np.array_equal(batch.images[:, 0].numpy(), images[batch.index])
        assert np.array_equal(batch.labels.numpy(), labels[batch.index])
        assert np.array_equal(batch.demographics.numpy(), demographics[batch.index])


def test_memmap_source(arrays, tmp_path):
    images, labels, demographics = arrays
    path = tmp_path / "images.u8"
    images.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)
    batch = next(iter(BatchLoader(mapped, labels, demographics, batch_size=8, shuffle=True, pin_memory=True).epoch(0)))
    assert np.array_equal(batch.images[:, 0].numpy(), images[batch.index])


def test_batch_to_device_keeps_index(arrays):
    batch = next(iter(loader(arrays).epoch(0)))
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.index is batch.index
    assert torch.equal(moved.images, batch.images)


def test_bad_shapes_are_rejected(arrays):
    images, labels, demographics = arrays
    with pytest.raises(ValueError, match="length"):
        BatchLoader(images, labels[:-1], demographics, batch_size=4, shuffle=False)
    with pytest.raises(ValueError, match="weights"):
        BatchLoader(images, labels, demographics, batch_size=4, shuffle=False, weights=np.zeros(N))


# --- prefetch thread ---------------------------------------------------------------------------------------

def test_early_break_shuts_the_prefetch_thread(arrays):
    assert prefetch_threads() == []
    for _ in loader(arrays, batch_size=4, prefetch=2).epoch(0):
        assert len(prefetch_threads()) == 1
        break
    assert prefetch_threads() == []
    batches = loader(arrays, batch_size=4).epoch(0)
    next(batches)
    batches.close()
    assert prefetch_threads() == []


def test_exhausted_epoch_leaves_no_thread(arrays):
    list(loader(arrays).epoch(0))
    assert prefetch_threads() == []


def test_error_in_prefetch_thread_reaches_the_consumer(arrays, monkeypatch):
    batch_loader = loader(arrays)
    monkeypatch.setattr(batch_loader, "make_batch", lambda index: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        list(batch_loader.epoch(0))
    assert prefetch_threads() == []


# --- oversampling ------------------------------------------------------------------------------------------

def test_oversampler_registry():
    assert set(OVERSAMPLERS) == {"none", "rare"}
    assert OVERSAMPLERS["none"](np.zeros((4, NUM_FINDINGS)), 0.5) is None


def test_rare_weights_use_the_rarest_positive_finding():
    labels = np.zeros((10, NUM_FINDINGS), np.float32)
    labels[:5, 0] = 1            # finding 0: prevalence 0.5
    labels[0, 1] = 1             # finding 1: prevalence 0.1, row 0 also has finding 0
    weights = OVERSAMPLERS["rare"](labels, 1.0)
    assert weights[0] == pytest.approx(10.0)             # rarest of {0.5, 0.1}
    assert weights[1:5] == pytest.approx([2.0] * 4)
    assert weights[5:] == pytest.approx([2.0] * 5)      # no finding: 5 of 10 rows
    assert OVERSAMPLERS["rare"](labels, 0.5)[0] == pytest.approx(10 ** 0.5)
    assert OVERSAMPLERS["rare"](labels, 0.0) == pytest.approx(np.ones(10))
