"""Errors the user can act on: each names the file, key or value at fault and what was expected."""
from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable, NoReturn

# A full disk, a full quota, or a file-size limit: each means "no room for this file here".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UserError(Exception):
    """Bad input; CLIs print its message on one line and exit non-zero."""


class ConfigError(UserError, ValueError):
    """An unknown config key or a value outside its registry or range."""


class DataError(UserError):
    """A data-set file or folder that is missing, malformed or inconsistent."""


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite; the trial ends as failed with this reason."""


class DeviceUnavailable(RuntimeError):
    """A trial was given GPUs but its node has no usable CUDA device (a node problem: retried, maybe elsewhere)."""


# Failures that come out the same on every attempt: retrying them only repeats the error.
DETERMINISTIC_FAILURES: tuple[type[BaseException], ...] = (UserError, TrialDiverged)


def out_of_space(err: OSError, where: str) -> UserError | None:
    """A full disk met while writing `where` (e.g. "--out runs") as a one-line UserError; None for other errors."""
    if err.errno not in NO_SPACE_ERRNOS:
        return None
    return UserError(f"{where}: {err.strerror} while writing there; free space or choose another place")


def exit_code_of(body: Callable[[], int], where: Callable[[], str]) -> int:
    """A CLI's exit code: body()'s, or 2 after one `error:` line for a UserError or a full disk met while writing
    `where()` (e.g. "--out runs"); any other error propagates."""
    try:
        return body()
    except OSError as err:
        full = out_of_space(err, where())
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def exit_promptly(code: int) -> NoReturn:
    """End a CLI's process with `code` now, its output flushed, without the interpreter's teardown: once torch,
    Ray and MLflow are loaded that frees their objects one by one (garbage collection, MLflow's pydantic schemas)
    for 3-4 s after the work is done. For a script's last line only: atexit handlers do not run, so a Ray this
    process still holds is shut down first (the sweeps shut theirs down already; MLflow here logs synchronously)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
