"""Errors the user can act on: each names the file, key or value at fault and what was expected."""
from __future__ import annotations

import errno
import sys
from typing import Callable

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
