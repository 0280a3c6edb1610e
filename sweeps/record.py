"""Where a sweep lives: its folder on the Tune storage (local path or URI) and the sweep.json record in it.

sweep.json holds what `--resume` needs to continue the same sweep exactly: the sweep-defining arguments, the
data fingerprint and the MLflow parent run. It sits beside Tune's own experiment state, so it travels with the
storage (NFS, s3://) rather than with the machine that started the sweep.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs
from filelock import FileLock, Timeout

from trainable.errors import ConfigError

RECORD_FILE = "sweep.json"
TUNER_FILE = "tuner.pkl"        # written by Tune when a sweep starts
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_uri(storage: str) -> bool:
    return "://" in storage


def storage_root(storage: str | None, out: Path) -> str:
    """Tune's storage_path: --storage (absolute path or URI), else the output folder."""
    if storage is None:
        return str(out.expanduser().resolve())
    if is_uri(storage):
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def default_name(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (it names a folder and the "
                          f"MLflow experiment)")
    return name


@dataclass
class SweepRecord:
    kind: str
    name: str
    arguments: dict[str, Any]                      # sweep-defining CLI arguments, secrets masked
    data: dict[str, Any] = field(default_factory=dict)     # fingerprint, synthetic, split sizes
    mlflow: dict[str, Any] = field(default_factory=dict)   # experiment_id, parent_run_id, masked tracking URI
    plan: dict[str, Any] = field(default_factory=dict)     # kind-specific: arms and seeds, or the search space
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))


@dataclass(frozen=True)
class SweepLocation:
    """A sweep's folder on the storage: `<storage>/<name>`, which is also Tune's experiment folder."""
    storage: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    def _fs(self) -> tuple[pyarrow.fs.FileSystem, str]:
        return pyarrow.fs.FileSystem.from_uri(self.path)

    def _exists(self, file_name: str) -> bool:
        fs, root = self._fs()
        return fs.get_file_info(f"{root}/{file_name}").type == pyarrow.fs.FileType.File

    def exists(self) -> bool:
        return self._exists(RECORD_FILE) or self._exists(TUNER_FILE)

    def read(self) -> SweepRecord | None:
        if not self._exists(RECORD_FILE):
            return None
        fs, root = self._fs()
        with fs.open_input_stream(f"{root}/{RECORD_FILE}") as stream:
            try:
                return SweepRecord(**json.loads(stream.readall().decode()))
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{self.path}/{RECORD_FILE}: not a sweep record ({err})") from None

    def write(self, record: SweepRecord) -> bytes:
        return self.write_text(RECORD_FILE, json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")

    def write_text(self, file_name: str, text: str) -> bytes:
        """Write a file into the sweep's folder; returns the bytes written."""
        fs, root = self._fs()
        fs.create_dir(root, recursive=True)
        data = text.encode()
        with fs.open_output_stream(f"{root}/{file_name}") as stream:
            stream.write(data)
        return data

    def file_names(self) -> list[str]:
        """Names of the files at the top of the sweep's folder."""
        fs, root = self._fs()
        return [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
                if info.type == pyarrow.fs.FileType.File]

    def read_bytes(self, file_name: str) -> bytes:
        fs, root = self._fs()
        with fs.open_input_stream(f"{root}/{file_name}") as stream:
            return stream.readall()

    def remove(self) -> None:
        fs, root = self._fs()
        if fs.get_file_info(root).type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(root)


@contextlib.contextmanager
def sweep_lock(location: SweepLocation, out: Path) -> Iterator[None]:
    """Held by the one driver running (or resuming) a sweep: a second driver of the same name is refused at once,
    before either writes anything. The lock file sits beside the sweep's folder (on the storage, so drivers on
    other machines sharing an NFS storage see it too), or in --out for an s3:// storage; the OS releases it when
    a driver dies."""
    folder = out.expanduser().resolve() if is_uri(location.storage) else Path(location.storage)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{location.name}.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"sweep {location.name!r} is being run by another driver right now (it holds {path}); "
                          f"wait for it to end (or stop it), or pick another --name") from None
    try:
        yield
    finally:
        lock.release()


def latest_sweep(storage: str, kind: str) -> str | None:
    """Name of the most recently created sweep of this kind under the storage, if any."""
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    found: list[tuple[str, str]] = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        record = SweepLocation(storage, info.base_name).read() if NAME_PATTERN.match(info.base_name) else None
        if record is not None and record.kind == kind:
            found.append((record.created, record.name))
    return max(found)[1] if found else None
