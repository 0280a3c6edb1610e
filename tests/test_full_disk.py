"""A full disk for real: a small tmpfs mounted in a private mount namespace (`unshare`, no root needed where user
namespaces are allowed), or, where no namespace can be made, a file-size limit (RLIMIT_FSIZE) so that writes
fail with EFBIG as they would with ENOSPC. One subprocess meets it three ways:

  the image cache does not fit       one `error:` naming the folder and the bytes needed, no `.partial` left
                                     (a sparse memory-mapped file used to end in `Bus error` and stay behind)
  a sweep whose caches cannot fit    refused before Ray starts
  a trial whose --out fills up       one `error:` line, no checkpoint staging folder left
The last two need the tmpfs (a size limit leaves the disk's free space as it is, and limits every file, the
trial's temporary checkpoint too); with only the size limit they are skipped, saying so.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL_BYTES = 300 * 1024          # holds a split.csv and config.json, not a 64 px cache or a checkpoint
TINY = ["--set", "backbone=test_resnet", "--set", "pretrained=none", "--set", "batch_size=16"]

SCRIPT = r"""
import contextlib, io, json, os, sys
from pathlib import Path

small, data, roomy, mounted = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "tmpfs"
tiny = json.loads(sys.argv[5])
report = {}

def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None

def cli(main, *args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(*args)
    return code, err.getvalue()

from trainable.data.cache import open_cache
from trainable.errors import DataError
paths = sorted(str(p) for p in Path(data, "images").glob("*.png"))
try:
    open_cache(paths, image_size=64, cache_dir=small / "cache", key="k-train", workers=2, progress=False)
    report["cache"] = "built"
except DataError as err:
    report["cache"] = str(err)
report["cache_files"] = listing(small / "cache")
report["cache_bytes"] = len(paths) * 64 * 64

if mounted:
    import sweeps.runner as runner
    from sweeps.ablation import Ablation
    def tripwire(address):
        raise SystemExit("the sweep started Ray")
    runner.start_ray = tripwire
    report["sweep"] = cli(runner.main, Ablation, ["--data", data, "--out", str(roomy / "sweeps"), "--name", "full",
                                                  "--arms", "baseline", "--seeds", "1", "--epochs", "1",
                                                  "--cache-dir", str(small / "cache"), "--set", "image_size=64", *tiny])

    from trainable.__main__ import main as trial_main
    report["trial"] = cli(trial_main, ["--data", data, "--out", str(small / "out"), "--cache-dir",
                                       str(roomy / "cache"), "--set", "image_size=32", "--set", "epochs=1", *tiny])
    report["out_files"] = listing(small / "out")
print("REPORT " + json.dumps(report))
"""


def _namespace_prefix(folder: Path) -> list[str] | None:
    """A command prefix that runs its command with a SMALL_BYTES tmpfs mounted on `folder`, or None."""
    mount = f"mount -t tmpfs -o size={SMALL_BYTES} tmpfs '{folder}' && exec \"$@\""
    for unshare in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if shutil.which("unshare") is None:
            return None
        probe = subprocess.run([*unshare, "sh", "-c", mount, "sh", "true"], capture_output=True)
        if probe.returncode == 0:
            return [*unshare, "sh", "-c", mount, "sh"]
    return None


def _size_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_BYTES, SMALL_BYTES))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # so that writes past the limit fail with EFBIG


@pytest.fixture(scope="module")
def full_disk(synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("full_disk")
    small, roomy = root / "small", root / "roomy"
    small.mkdir()
    roomy.mkdir()
    prefix = _namespace_prefix(small)
    how = "tmpfs" if prefix else "rlimit"
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([*(prefix or []), sys.executable, "-c", SCRIPT, str(small), str(synthetic_dir), str(roomy),
                           how, json.dumps(TINY)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=None if prefix else _size_limit)
    print(how, done.returncode, done.stdout[-3000:], done.stderr[-3000:], sep="\n")
    reports = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and reports, f"the subprocess died (exit {done.returncode}, e.g. -7 = Bus error)"
    return how, json.loads(reports[0].removeprefix("REPORT ")), small


def _needs_tmpfs(how: str) -> None:
    if how != "tmpfs":
        pytest.skip("no mount namespace on this machine (unshare refused): a file-size limit cannot fill a disk")


def test_a_cache_that_does_not_fit_is_one_error_naming_the_folder_and_bytes_and_leaves_no_partial(full_disk):
    how, report, small = full_disk
    needed = report["cache_bytes"]
    assert needed > SMALL_BYTES
    assert report["cache"].startswith(f"{small / 'cache'}: no space for the image cache (k-train-64.u8): "
                                      f"{needed} bytes"), report["cache"]
    assert "\n" not in report["cache"] and "--cache-dir" in report["cache"]
    assert [name for name in report["cache_files"] if ".partial" in name or name.endswith(".u8")] == []


def test_a_sweep_whose_caches_cannot_fit_is_refused_before_ray_starts(full_disk):
    how, report, small = full_disk
    _needs_tmpfs(how)
    code, err = report["sweep"]
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {small / 'cache'}: no space for the image cache ("), err
    assert "bytes free" in errors[0] and "the sweep started Ray" not in err


def test_a_full_out_is_one_error_line_and_leaves_no_staging_folder(full_disk):
    how, report, small = full_disk
    _needs_tmpfs(how)
    code, err = report["trial"]
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --out {small / 'out'}: No space left on device while writing there; free space or "
                      f"choose another place"], err
    assert "Traceback" not in err
    # a fresh --out that failed before its first epoch is removed entirely, staging folders included
    assert report["out_files"] is None, report["out_files"]
