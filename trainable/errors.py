"""Errors the user can act on: each names the file, key or value at fault and what was expected."""


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
