"""Decode-once cache: decoding of every PNG mode, reuse, rebuilds, interrupted and failed builds, concurrency."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainable.data import cache
from trainable.data.cache import decode_image, open_cache
from trainable.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(pixels)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    image.save(path, format="PNG")
    return path


def gradient(size: int = SIZE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def make_pngs(folder: Path, count: int, size: int = SIZE) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [str(write_png(folder / f"{i:03d}.png", gradient(size, seed=i))) for i in range(count)]


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with PIL's rounding, computed independently in numpy."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def cache_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.endswith(".lock"))


# --- decoding ----------------------------------------------------------------------------------------------

def test_grayscale_png_decodes_exactly(tmp_path):
    pixels = gradient()
    assert np.array_equal(decode_image(write_png(tmp_path / "l.png", pixels), SIZE), pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_png_decodes_to_luma(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels = rgb if mode == "RGB" else np.dstack([rgb, np.full((SIZE, SIZE), 255, np.uint8)])
    decoded = decode_image(write_png(tmp_path / "c.png", pixels), SIZE)
    assert np.abs(decoded.astype(int) - luma(rgb)).max() <= 1


def test_palette_png_decodes_to_luma_of_its_colours(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "p.png"
    Image.fromarray(rgb).quantize(colors=16).save(path)
    palette_colours = np.asarray(Image.open(path).convert("RGB"))
    assert Image.open(path).mode == "P"
    assert np.abs(decode_image(path, SIZE).astype(int) - luma(palette_colours)).max() <= 1


def test_la_and_bilevel_png_decode(tmp_path):
    pixels = gradient()
    la = np.dstack([pixels, np.full_like(pixels, 255)])
    assert np.array_equal(decode_image(write_png(tmp_path / "la.png", la), SIZE), pixels)
    bits = pixels > 127
    assert np.array_equal(decode_image(write_png(tmp_path / "one.png", bits), SIZE), bits * np.uint8(255))


def test_sixteen_bit_png_scales_full_range(tmp_path):
    values = np.random.default_rng(3).integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
    values[0, 0] = 65535
    path = write_png(tmp_path / "i16.png", values)
    assert Image.open(path).mode.startswith("I")
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    assert np.abs(decode_image(path, SIZE).astype(int) - expected).max() <= 1


def test_sixteen_bit_png_holding_eight_bit_values_keeps_them(tmp_path):
    pixels = gradient()
    path = write_png(tmp_path / "i16small.png", pixels.astype(np.uint16))
    assert np.array_equal(decode_image(path, SIZE), pixels)


def test_resize_matches_pil_bilinear(tmp_path):
    big = np.asarray(Image.fromarray(gradient(8)).resize((128, 128), Image.Resampling.BICUBIC))
    path = write_png(tmp_path / "big.png", big)
    expected = np.asarray(Image.fromarray(big).resize((24, 24), Image.Resampling.BILINEAR))
    decoded = decode_image(path, 24)
    assert decoded.shape == (24, 24) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected).mean() < 2.0


def test_no_progress_bar_in_piped_output(tmp_path, capsys):
    """A Ray trial's output is a pipe into Tune's console: a bar there would land inside the progress table."""
    paths = make_pngs(tmp_path / "png", 3, size=32)
    open_cache(paths, image_size=SIZE, cache_dir=tmp_path / "c", key="k", workers=1)     # progress on: the default
    captured = capsys.readouterr()
    assert "caching" not in captured.err + captured.out


# --- reuse and rebuild -------------------------------------------------------------------------------------

def test_cache_rows_match_decoded_images_and_are_read_only(tmp_path):
    paths = make_pngs(tmp_path / "png", 5, size=32)
    array = open_cache(paths, image_size=SIZE, cache_dir=tmp_path / "c", key="k", workers=1, progress=False)
    assert isinstance(array, np.memmap) and array.shape == (5, SIZE, SIZE) and array.dtype == np.uint8
    assert not array.flags.writeable
    for row, path in enumerate(paths):
        assert np.array_equal(array[row], decode_image(path, SIZE))


def test_second_open_reuses_without_decoding(tmp_path, monkeypatch):
    paths = make_pngs(tmp_path / "png", 4)
    folder = tmp_path / "c"
    first = np.array(open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False))
    data = folder / f"k-{SIZE}.u8"
    before = data.stat()

    def must_not_decode(*args):
        raise AssertionError("cache was rebuilt")
    monkeypatch.setattr(cache, "decode_image", must_not_decode)
    second = open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    after = data.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(first, second)


def test_changed_path_list_rebuilds(tmp_path):
    paths = make_pngs(tmp_path / "png", 4)
    folder = tmp_path / "c"
    open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    reordered = paths[::-1]
    array = open_cache(reordered, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert np.array_equal(array[0], decode_image(reordered[0], SIZE))
    shorter = open_cache(paths[:2], image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert shorter.shape == (2, SIZE, SIZE)


def test_other_size_gets_its_own_cache(tmp_path):
    paths = make_pngs(tmp_path / "png", 3, size=32)
    folder = tmp_path / "c"
    small = open_cache(paths, image_size=8, cache_dir=folder, key="k", workers=1, progress=False)
    large = open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert small.shape == (3, 8, 8) and large.shape == (3, SIZE, SIZE)
    assert cache_files(folder) == ["k-16.json", "k-16.u8", "k-8.json", "k-8.u8"]


def test_empty_path_list_gives_empty_array(tmp_path):
    array = open_cache([], image_size=SIZE, cache_dir=tmp_path / "c", key="k", progress=False)
    assert array.shape == (0, SIZE, SIZE)


def test_unsafe_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="key"):
        open_cache(["x.png"], image_size=SIZE, cache_dir=tmp_path, key="../escape", progress=False)


# --- interrupted builds ------------------------------------------------------------------------------------

def test_leftovers_without_manifest_are_rebuilt(tmp_path):
    paths = make_pngs(tmp_path / "png", 3)
    folder = tmp_path / "c"
    folder.mkdir()
    size = 3 * SIZE * SIZE
    (folder / f"k-{SIZE}.u8").write_bytes(b"\xff" * size)          # renamed into place, manifest never written
    (folder / f"k-{SIZE}.u8.partial-1-abc").write_bytes(b"\x00" * 10)    # a second builder's stale temp file
    array = open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert np.array_equal(array[1], decode_image(paths[1], SIZE))
    assert cache_files(folder) == ["k-16.json", "k-16.u8"]


def test_manifest_with_wrong_data_size_is_rebuilt(tmp_path):
    paths = make_pngs(tmp_path / "png", 3)
    folder = tmp_path / "c"
    open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    data = folder / f"k-{SIZE}.u8"
    data.write_bytes(data.read_bytes()[:100])
    array = open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert np.array_equal(array[2], decode_image(paths[2], SIZE))


def _build_script(paths: list[str], folder: Path, *, start: Path, counter: Path, delay: float) -> str:
    """A child process that announces itself, waits for `start`, then builds the cache with a slowed, counted
    decode (workers=1 keeps the decoding in this process, where the patch applies)."""
    return textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from trainable.data import cache
        original = cache.decode_image
        def counted(path, size):
            with open({str(counter)!r}, "a") as log:
                log.write(path + "\\n")
            time.sleep({delay})
            return original(path, size)
        cache.decode_image = counted
        start = Path({str(start)!r})
        start.with_name(f"{{start.name}}.ready-{{os.getpid()}}").touch()
        while not start.exists():
            time.sleep(0.01)
        cache.open_cache({paths!r}, image_size={SIZE}, cache_dir={str(folder)!r}, key="k", workers=1,
                         progress=False)
    """)


def _spawn(script: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env)


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_killed_build_is_never_read_as_valid(tmp_path):
    paths = make_pngs(tmp_path / "png", 40)
    folder, start = tmp_path / "c", tmp_path / "start"
    start.touch()
    child = _spawn(_build_script(paths, folder, start=start, counter=tmp_path / "decoded.log", delay=0.1))
    _wait_for(lambda: list(folder.glob(f"k-{SIZE}.u8.partial*")), "the child to start building")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (folder / f"k-{SIZE}.json").exists()
    array = open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert np.array_equal(array[-1], decode_image(paths[-1], SIZE))
    assert cache_files(folder) == ["k-16.json", "k-16.u8"]


def test_concurrent_opens_build_once(tmp_path):
    paths = make_pngs(tmp_path / "png", 10)
    folder, start, counter = tmp_path / "c", tmp_path / "start", tmp_path / "decoded.log"
    children = [_spawn(_build_script(paths, folder, start=start, counter=counter, delay=0.05)) for _ in range(2)]
    _wait_for(lambda: len(list(tmp_path.glob("start.ready-*"))) == 2, "both children to be ready")
    start.touch()                                           # release both at once
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    assert len(counter.read_text().splitlines()) == len(paths)
    array = open_cache(paths, image_size=SIZE, cache_dir=folder, key="k", workers=1, progress=False)
    assert np.array_equal(array[3], decode_image(paths[3], SIZE))


def test_parallel_build_matches_inline_build(tmp_path):
    paths = make_pngs(tmp_path / "png", 2 * cache.IMAGES_PER_TASK + 3, size=24)
    inline = open_cache(paths, image_size=SIZE, cache_dir=tmp_path / "a", key="k", workers=1, progress=False)
    pooled = open_cache(paths, image_size=SIZE, cache_dir=tmp_path / "b", key="k", workers=2, progress=False)
    assert np.array_equal(np.asarray(inline), np.asarray(pooled))


# --- bad input ---------------------------------------------------------------------------------------------

def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    write_png(path, gradient(64))
    path.write_bytes(path.read_bytes()[:200])


def _jpeg(path: Path) -> None:
    Image.fromarray(gradient()).save(path, format="JPEG")


def _garbage_after_signature(path: Path) -> None:
    path.write_bytes(cache.PNG_SIGNATURE + b"not really a png at all")


BAD_FILES = {
    "zero-byte": (_zero_byte, "empty file"),
    "truncated": (_truncated, "corrupt or truncated"),
    "jpeg-as-png": (_jpeg, "not a PNG"),
    "garbage": (_garbage_after_signature, "corrupt or truncated"),
    "missing": (lambda path: None, "not found"),
}


def _open_with_bad_file(tmp_path: Path, kind: str, *, count: int, workers: int) -> tuple[Path, str]:
    paths = make_pngs(tmp_path / "png", count)
    bad = tmp_path / "png" / "bad.png"
    make_bad, message = BAD_FILES[kind]
    make_bad(bad)
    paths.insert(count // 2, str(bad))
    with pytest.raises(DataError, match=message) as error:
        open_cache(paths, image_size=SIZE, cache_dir=tmp_path / "c", key="k", workers=workers, progress=False)
    return tmp_path / "c", str(error.value)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_raises_naming_it_and_leaves_no_cache(tmp_path, kind):
    folder, message = _open_with_bad_file(tmp_path, kind, count=3, workers=1)
    assert str(tmp_path / "png" / "bad.png") in message and "\n" not in message
    assert cache_files(folder) == []


def test_bad_file_in_worker_process_raises_and_leaves_no_cache(tmp_path):
    folder, message = _open_with_bad_file(tmp_path, "truncated", count=2 * cache.IMAGES_PER_TASK, workers=2)
    assert str(tmp_path / "png" / "bad.png") in message
    assert cache_files(folder) == []
