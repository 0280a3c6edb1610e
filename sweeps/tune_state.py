"""Digests of the Tune state a sweep's driver wrote, so `--resume` never unpickles a file someone else wrote.

Ray Tune saves an experiment as pickles (`tuner.pkl`, the searcher's and callbacks' `*-state-*.pkl`/`.json`, and
cloudpickle payloads inside `experiment_state-*.json`); `Tuner.restore` unpickles them, which runs any code they
hold. They live on the sweep's storage (`--storage`, else `--out`), which every trial worker and everyone with
access to the NFS folder or bucket can write. So the driver records a SHA-256 of every such file it writes, and
of `sweep.json` (whose arguments a resume obeys), on the sweep's MLflow parent run (tag `tune_state_sha256`):
the MLflow store is written by the driver only (trials never talk to it) and needs its own credentials. Before
Tune reads any of them back, every state file on the storage must match a recorded digest; a changed, replaced
or added file is refused with a one-line error.

Tune rewrites its state in a local staging folder and then uploads it in the background, so the storage may
lag a save or two behind: the last RECENT digests of each file are accepted (all written by this driver). A
resume narrows each file to the digest it verified.

Still open, both a matter of milliseconds: tuner.pkl, which Tune writes straight to the storage, is read back
for its digest just after; and a file could be swapped between this check and Tune's own read of it. Closing
them would need Tune to restore from a copy on the driver's disk.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Mapping

from mlflow import MlflowClient
from mlflow.entities import Run

from trainable.errors import ConfigError

from .record import RECORD_FILE, SweepLocation

DIGEST_TAG = "tune_state_sha256"
RECENT = 4
DIGEST_CHARS = 32            # 128 bits of SHA-256: keeps the tag within MLflow's 8000 characters for many resumes
# What Tune (2.60) unpickles on restore, and what a resume obeys: the sweep folder's top level only.
STATE_PATTERNS = ("*.pkl", "*state*.json", RECORD_FILE)


def is_state_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in STATE_PATTERNS)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


class StateDigests:
    """The digests recorded on one parent run: file name -> the last RECENT digests the driver wrote."""

    def __init__(self, client: MlflowClient, parent_run_id: str, recorded: Mapping[str, list[str]]):
        self.client = client
        self.parent_run_id = parent_run_id
        self.recorded = {name: list(values) for name, values in recorded.items()}

    @classmethod
    def load(cls, client: MlflowClient, parent_run_id: str, run: Run | None = None) -> "StateDigests | None":
        """The digests on the parent run, or None when it records none."""
        text = (run or client.get_run(parent_run_id)).data.tags.get(DIGEST_TAG)
        if text is None:
            return None
        try:
            recorded = json.loads(text)
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict) or not all(isinstance(v, list) for v in recorded.values()):
            raise ConfigError(f"parent run {parent_run_id}: tag {DIGEST_TAG} is not a digest record")
        return cls(client, parent_run_id, recorded)

    def add(self, contents: Mapping[str, bytes]) -> None:
        """Record files as this driver wrote them (name -> bytes); the tag is rewritten when anything is new."""
        changed = False
        for name, data in contents.items():
            values = self.recorded.setdefault(name, [])
            value = digest(data)
            if value not in values:
                values.append(value)
                del values[:-RECENT]
                changed = True
        if changed:
            self._save()

    def add_folder(self, folder: Path) -> None:
        """Record the state files of a local folder this driver alone writes (Tune's staging folder)."""
        self.add({path.name: path.read_bytes() for path in sorted(folder.iterdir())
                  if path.is_file() and is_state_file(path.name)})

    def verify(self, location: SweepLocation, what: str) -> dict[str, str]:
        """Check every state file in the sweep's folder against the record; name -> its verified digest."""
        verified = {}
        for name in sorted(filter(is_state_file, location.file_names())):
            value = digest(location.read_bytes(name))
            if name not in self.recorded:
                raise ConfigError(f"{what}: {location.path}/{name} was not written by this sweep's driver (no "
                                  f"digest of it on parent run {self.parent_run_id}); refusing to go on: Tune "
                                  f"would read it as pickled state, which runs code. Remove it (and find out who "
                                  f"put it there)")
            if value not in self.recorded[name]:
                raise ConfigError(f"{what}: {location.path}/{name} was changed after this sweep's driver wrote it "
                                  f"(SHA-256 {value}… is not among the digests on parent run "
                                  f"{self.parent_run_id}); refusing to go on: Tune's state is pickled (restoring it "
                                  f"runs code) and sweep.json sets the resumed sweep's arguments")
            verified[name] = value
        return verified

    def narrow(self, verified: Mapping[str, str]) -> None:
        """After a verified resume: each file keeps only the digest it was verified with."""
        self.recorded = {name: [value] for name, value in verified.items()}
        self._save()

    def _save(self) -> None:
        self.client.set_tag(self.parent_run_id, DIGEST_TAG,
                            json.dumps(self.recorded, sort_keys=True, separators=(",", ":")))


def check_restorable(client: MlflowClient, location: SweepLocation, parent_run: Run) -> None:
    """Before --resume: the sweep's state files are the driver's own; narrows the record to them."""
    what, parent_run_id = f"--resume {location.name}", parent_run.info.run_id
    digests = StateDigests.load(client, parent_run_id, parent_run)
    if digests is None:
        raise ConfigError(f"{what}: parent run {parent_run_id} records no digest of the sweep's Tune state (tag "
                          f"{DIGEST_TAG}; a sweep started before digests were kept); Tune's state is pickled and "
                          f"is not restored unchecked: start the sweep again with --name {location.name} --overwrite")
    digests.narrow(digests.verify(location, what))


def check_unchanged(client: MlflowClient, location: SweepLocation, parent_run_id: str) -> None:
    """Before the driver reads Tune's state back after a run (it holds pickles too)."""
    digests = StateDigests.load(client, parent_run_id) or StateDigests(client, parent_run_id, {})
    digests.verify(location, f"sweep {location.name}")


def record_written(client: MlflowClient, parent_run_id: str, contents: Mapping[str, bytes]) -> None:
    """Record files the driver itself has just written to the storage (sweep.json, tuner.pkl)."""
    digests = StateDigests.load(client, parent_run_id) or StateDigests(client, parent_run_id, {})
    digests.add(contents)
