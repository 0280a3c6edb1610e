"""Errors the user can act on: each names the file, key or value at fault and what was expected."""


class UserError(Exception):
    """Bad input; CLIs print its message on one line and exit non-zero."""


class ConfigError(UserError, ValueError):
    """An unknown config key or a value outside its registry or range."""


class DataError(UserError):
    """A data-set file or folder that is missing, malformed or inconsistent."""


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite; the trial ends as failed with this reason."""
