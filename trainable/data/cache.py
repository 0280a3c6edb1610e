"""Decode-once cache: every PNG (or JPEG) of a split decoded to grayscale uint8 at the trial's resolution, stored
in one memory-mapped array that all later trials on the node reuse.

Files in `cache_dir`, named from the caller's key and the image size (`<stem>` = `<key>-<size>`):
  <stem>.u8        raw (N, size, size) uint8 rows, row i = paths[i]
  <stem>.json      manifest: shape, dtype, count, hash of the path list, completion stamp and build id — written
                   last
  <stem>.lock      serializes builders and readers across processes
  <stem>.u8.partial-<pid>-<random>, <stem>.json.partial   in-progress files; stale ones (a killed build)
                   are removed by the next build
A cache counts as valid only when the manifest exists, matches the requested shape and path list, and the data
file has the expected size; anything else is rebuilt. Because the data file is renamed into place before the
manifest is written, an interrupted build never leaves a cache that looks valid.

`build_cache` builds (a sweep's driver runs it once per node before any trial starts, see
sweeps/cache_warmup.py); `open_cache` maps, building first only when no valid cache is there.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm.auto import tqdm

from ..errors import NO_SPACE_ERRNOS, DataError

CACHE_ENV = "CXR_CACHE_DIR"
TRIAL_SPLITS = ("train", "val")   # the splits a trial reads (trainable.train); a sweep's driver caches them first
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MANIFEST_FORMAT = 1
# Same filter as torchvision's Resize default, which every reference CheXNet implementation uses on PIL images.
RESAMPLE = Image.Resampling.BILINEAR
# Image.resize first shrinks by an integer factor with Image.reduce (box filter, fast) so that the final
# antialiased resize spans at most this factor: 1024 -> 512 -> 224 for the default 224 px.
REDUCING_GAP = 2.0
SIXTEEN_BIT_DEPTHS = (8, 10, 12, 14, 16)   # bit depths a 16-bit container is read as (see _sixteen_bit_to_uint8)
JPEG_SIGNATURE = b"\xff\xd8\xff"
# File extension -> (signature, format name) of what the file must hold; any other name must be a PNG (NIH's).
IMAGE_FORMATS: dict[str, tuple[bytes, str]] = {".jpg": (JPEG_SIGNATURE, "JPEG"), ".jpeg": (JPEG_SIGNATURE, "JPEG")}
IMAGES_PER_TASK = 32          # small tasks balance the workers and keep the progress bar moving
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def default_cache_dir() -> Path:
    """Node-local decode-once cache: $CXR_CACHE_DIR, else the user's cache folder (shared by all trials on a node)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-ablate"


def split_cache_key(fingerprint: str, split: str) -> str:
    """The cache key of one split of a prepared data set (with the image size it names the cache files)."""
    return f"{fingerprint}-{split}"


# --- decoding ----------------------------------------------------------------------------------------------

def _sixteen_bit_to_uint8(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8-bit, scaled by the bit depth the image uses: the smallest of SIXTEEN_BIT_DEPTHS
    whose range holds its maximum (8-bit data in a 16-bit container keeps its values; 12-bit data, as many
    PadChest PNGs hold, is scaled by 4095; full 16-bit data by 65535).

    Why not a fixed 65535 (torchxrayvision's PC_Dataset): that is harmless in float, but in this uint8 cache it
    leaves a 12-bit image 16 grey levels. Why not each image's own min..max: a fixed scale per bit depth keeps
    brightness comparable between images of one scanner, where a burned-in marker or a collimator edge would
    otherwise rescale every pixel of its image."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    top = values.max(initial=0)
    full_scale = next(2 ** bits - 1 for bits in SIXTEEN_BIT_DEPTHS if top <= 2 ** bits - 1)
    if full_scale == 255:
        return Image.fromarray(values.astype(np.uint8))
    return Image.fromarray(((values * 255 + full_scale // 2) // full_scale).astype(np.uint8))


def _palette_or_colour_to_uint8(image: Image.Image) -> Image.Image:
    # PIL's ITU-R 601-2 luma; alpha is dropped (NIH PNGs with alpha are opaque).
    return image.convert("L")


TO_GRAYSCALE: dict[str, Callable[[Image.Image], Image.Image]] = {
    "L": lambda image: image,
    "1": _palette_or_colour_to_uint8,
    "P": _palette_or_colour_to_uint8,
    "LA": _palette_or_colour_to_uint8,
    "RGB": _palette_or_colour_to_uint8,
    "RGBA": _palette_or_colour_to_uint8,
    "CMYK": _palette_or_colour_to_uint8,          # some JPEG encoders
    "I;16": _sixteen_bit_to_uint8,
    "I;16B": _sixteen_bit_to_uint8,
    "I;16L": _sixteen_bit_to_uint8,
    "I": _sixteen_bit_to_uint8,
}


def _image_format(path: Path) -> tuple[bytes, str]:
    return IMAGE_FORMATS.get(path.suffix.lower(), (PNG_SIGNATURE, "PNG"))


def _check_png_signature(path: Path) -> None:
    """The file starts as its name says: a JPEG for .jpg/.jpeg (MIMIC-CXR-JPG, CheXpert), else a PNG."""
    signature, kind = _image_format(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(signature))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read image file ({error.strerror or error})") from None
    if not head:
        raise DataError(f"{path}: empty file, expected a {kind} image")
    if head != signature:
        raise DataError(f"{path}: not a {kind} (wrong file signature), expected a {kind} image")


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one PNG (or JPEG, by its name) to a (image_size, image_size) grayscale uint8 array (non-square
    images are squashed, as the reference implementations' Resize((size, size)) does). Raises DataError naming
    the file."""
    path = Path(path)
    _check_png_signature(path)
    try:
        with Image.open(path) as image:
            image.load()
            to_gray = TO_GRAYSCALE.get(image.mode)
            if to_gray is None:
                raise DataError(f"{path}: unsupported {_image_format(path)[1]} mode {image.mode!r}, expected one of: "
                                f"{', '.join(TO_GRAYSCALE)}")
            gray = to_gray(image)
            if gray.size != (image_size, image_size):
                gray = gray.resize((image_size, image_size), RESAMPLE, reducing_gap=REDUCING_GAP)
            return np.asarray(gray, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: corrupt or truncated {_image_format(path)[1]} ({error})") from None


def check_png_files(paths: Sequence[str], workers: int = 16) -> None:
    """Raise DataError for the first path that is missing, empty or not a PNG (8 bytes read per file).

    Run by a sweep's driver before Ray starts: a bad file found by the trials instead would fail every one of
    them, with retries. A truncated PNG is only found when decoded, by the trial that builds the cache.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:  # I/O bound: threads overlap the reads
        for _ in pool.map(_check_png_signature, map(Path, paths)):
            pass


# --- cache files -------------------------------------------------------------------------------------------

def _paths_hash(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(os.fspath(path)) + b"\0")
    return digest.hexdigest()


class _CacheFiles:
    """The file names of one (key, size) cache."""

    def __init__(self, cache_dir: Path, key: str, image_size: int) -> None:
        stem = f"{key}-{image_size}"
        self.folder = cache_dir
        self.data = cache_dir / f"{stem}.u8"
        self.manifest = cache_dir / f"{stem}.json"
        self.lock = cache_dir / f"{stem}.lock"
        # Unique per build: orphaned workers of a killed build can only write into their own, deleted file.
        self.partial_data = cache_dir / f"{stem}.u8.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.partial_manifest = cache_dir / f"{stem}.json.partial"

    def remove_incomplete(self) -> None:
        """Drop everything but the lock: called under the lock, so leftovers are from a build that died."""
        for path in (self.manifest, self.partial_manifest, self.data,
                     *self.folder.glob(glob.escape(self.data.name) + ".partial*")):
            path.unlink(missing_ok=True)


def _expected_manifest(shape: tuple[int, int, int], paths_hash: str) -> dict:
    return {"format": MANIFEST_FORMAT, "shape": list(shape), "dtype": "uint8", "count": shape[0],
            "paths_sha256": paths_hash}


def _is_valid(files: _CacheFiles, expected: dict) -> bool:
    try:
        manifest = json.loads(files.manifest.read_text())
        data_size = files.data.stat().st_size
    except (OSError, ValueError):
        return False
    matches = all(manifest.get(name) == value for name, value in expected.items())
    return matches and manifest.get("complete") is True and data_size == int(np.prod(expected["shape"]))


def read_manifest(cache_dir: str | os.PathLike, key: str, image_size: int) -> dict | None:
    """The manifest of a (key, size) cache, or None when there is none (yet)."""
    try:
        return json.loads(_CacheFiles(Path(cache_dir), key, image_size).manifest.read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(files: _CacheFiles, expected: dict) -> None:
    # build_id tells one build from the next: a cache rebuilt in place has the same name but a new id.
    manifest = {**expected, "complete": True, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_id": uuid.uuid4().hex}
    with open(files.partial_manifest, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(files.partial_manifest, files.manifest)


# --- building ----------------------------------------------------------------------------------------------

def _decode_chunk(data_path: str, start: int, paths: Sequence[str], image_size: int) -> int:
    """Decode paths into rows start.. of the data file; runs in a worker thread (or inline for one worker)."""
    rows = np.memmap(data_path, dtype=np.uint8, mode="r+", offset=start * image_size * image_size,
                     shape=(len(paths), image_size, image_size))
    for row, path in enumerate(paths):
        rows[row] = decode_image(path, image_size)
    rows.flush()
    del rows
    return len(paths)


def _tasks(paths: Sequence[str]) -> list[tuple[int, Sequence[str]]]:
    return [(start, paths[start:start + IMAGES_PER_TASK]) for start in range(0, len(paths), IMAGES_PER_TASK)]


class _Progress:
    """The progress bar, and the caller's callback (images decoded since the last call) if there is one."""

    def __init__(self, bar: tqdm, callback: Callable[[int], None] | None) -> None:
        self.bar, self.callback = bar, callback

    def update(self, count: int) -> None:
        self.bar.update(count)
        if self.callback is not None:
            self.callback(count)


def _decode_inline(data_path: str, paths: Sequence[str], image_size: int, bar: _Progress) -> None:
    for start, chunk in _tasks(paths):
        bar.update(_decode_chunk(data_path, start, chunk, image_size))


def _decode_in_threads(data_path: str, paths: Sequence[str], image_size: int, bar: _Progress, workers: int
                       ) -> None:
    # Threads, not processes: Pillow releases the GIL while it inflates, unfilters, reduces and resizes (over
    # 95% of the time per image), so threads scale like processes without their cost: no interpreter start
    # and re-import per worker (seconds under load, which made a 2-worker spawn pool slower than 1 worker),
    # no fork of a process holding Ray or torch threads, and nothing left running after an error.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache-decode") as pool:
        pending = {pool.submit(_decode_chunk, data_path, start, chunk, image_size)
                   for start, chunk in _tasks(paths)}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    bar.update(future.result())       # re-raises a worker's DataError
        finally:
            for future in pending:
                future.cancel()                       # the pool then waits only for chunks already running


def default_workers() -> int:
    """All cores this process may run on (the affinity mask, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                            # not on Linux
        return os.cpu_count() or 1


def _reserve(path: Path, size: int) -> None:
    """Create `path` with `size` bytes allocated on disk. A sparse file would let a full disk surface as SIGBUS
    (`Bus error`, no message) at the first page the workers write through the memory map."""
    with open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno not in NO_SPACE_ERRNOS:
                raise
            raise _no_space(path.parent, size, path.name.split(".partial")[0], error.strerror) from None


def _build(files: _CacheFiles, paths: Sequence[str], image_size: int, expected: dict, workers: int,
           progress: bool, on_progress: Callable[[int], None] | None = None) -> None:
    files.remove_incomplete()
    try:
        _reserve(files.partial_data, int(np.prod(expected["shape"])))
        # disable=None: a bar on a terminal only, never in a Ray trial's piped output (it would land in Tune's table)
        with tqdm(total=len(paths), unit="img", disable=None if progress else True,
                  desc=f"caching {files.data.name}") as progress_bar:
            bar = _Progress(progress_bar, on_progress)
            if workers <= 1:
                _decode_inline(str(files.partial_data), paths, image_size, bar)
            else:
                _decode_in_threads(str(files.partial_data), paths, image_size, bar, workers)
        with open(files.partial_data, "rb+") as handle:
            os.fsync(handle.fileno())                    # data durable before the manifest vouches for it
        os.replace(files.partial_data, files.data)
        _write_manifest(files, expected)
    except BaseException:
        files.remove_incomplete()
        raise


def _empty(shape: tuple[int, int, int]) -> np.ndarray:
    # mmap cannot map an empty file, so an empty split has no files at all.
    empty = np.empty(shape, np.uint8)
    empty.flags.writeable = False
    return empty


def _request(paths: Sequence[str], image_size: int, cache_dir: str | os.PathLike, key: str
             ) -> tuple[list[str], _CacheFiles, dict]:
    if not _KEY_PATTERN.fullmatch(key):
        raise ValueError(f"cache key {key!r} must be a file-name stem of letters, digits, '.', '_' or '-'")
    paths = [os.fspath(path) for path in paths]
    files = _CacheFiles(Path(cache_dir), key, image_size)
    return paths, files, _expected_manifest((len(paths), image_size, image_size), _paths_hash(paths))


def _ensure_built(files: _CacheFiles, paths: list[str], image_size: int, expected: dict, workers: int | None,
                  progress: bool, on_progress: Callable[[int], None] | None) -> bool:
    """Under the cache's lock: build it unless a valid one is there; True when this call built it."""
    if _is_valid(files, expected):
        return False
    workers = max(1, min(workers or default_workers(), len(_tasks(paths))))
    _build(files, paths, image_size, expected, workers, progress, on_progress)
    return True


def build_cache(paths: Sequence[str], *, image_size: int, cache_dir: str | os.PathLike, key: str,
                workers: int | None = None, progress: bool = True,
                on_progress: Callable[[int], None] | None = None) -> bool:
    """Build the (key, size, paths) cache unless a valid one exists; True when this call built it.

    Same files, lock and workers as open_cache, which then only maps it; `on_progress(n)` is called as
    images are decoded (not at all for a cache that was already there).
    """
    paths, files, expected = _request(paths, image_size, cache_dir, key)
    if not paths:
        return False
    files.folder.mkdir(parents=True, exist_ok=True)
    with FileLock(files.lock):
        return _ensure_built(files, paths, image_size, expected, workers, progress, on_progress)


def cache_bytes(count: int, image_size: int) -> int:
    return count * image_size * image_size


def check_cache_space(cache_dir: str | os.PathLike, caches: Sequence[tuple[str, Sequence[str], int]]) -> None:
    """Refuse, before any trial starts, caches (key, paths, image size) that do not fit on the cache folder's disk;
    caches already built there count nothing."""
    cache_dir = Path(cache_dir)
    missing = [(key, len(paths), size) for key, paths, size in caches if paths and not _is_valid(
        _CacheFiles(cache_dir, key, size), _expected_manifest((len(paths), size, size), _paths_hash(paths)))]
    needed = sum(cache_bytes(count, size) for _, count, size in missing)
    if needed > _free_bytes(cache_dir):
        sizes = ", ".join(str(size) for size in sorted({size for _, _, size in missing}))
        images = sum(count for _, count, _ in missing)
        raise _no_space(cache_dir, needed, f"{len(missing)} cache file(s), {images} images at {sizes} px")


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(next(f for f in (folder, *folder.parents) if f.exists())).free


def _no_space(folder: Path, needed: int, what: str, reason: str | None = None) -> DataError:
    return DataError(f"{folder}: no space for the image cache ({what}): {needed} bytes ({needed / 2**20:.1f} MiB) "
                     f"needed, {_free_bytes(folder)} bytes free{f' ({reason})' if reason else ''}; free space there "
                     f"or point --cache-dir / ${CACHE_ENV} at a larger disk")


def open_cache(paths: Sequence[str], *, image_size: int, cache_dir: str | os.PathLike, key: str,
               workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Read-only (N, image_size, image_size) uint8 memmap, row i = paths[i]; built once per (key, size, paths).

    `key` names the data (fingerprint + split) and must be a plain file-name stem. Concurrent callers on one
    node serialize on a file lock: one builds, the others wait and then reuse. `workers` (decoding threads)
    defaults to all cores this process may use. An empty path list gives an empty read-only array (no files).
    """
    paths, files, expected = _request(paths, image_size, cache_dir, key)
    shape = tuple(expected["shape"])
    if not paths:
        return _empty(shape)
    files.folder.mkdir(parents=True, exist_ok=True)
    with FileLock(files.lock):
        _ensure_built(files, paths, image_size, expected, workers, progress, None)
        return np.memmap(files.data, dtype=np.uint8, mode="r", shape=shape)
