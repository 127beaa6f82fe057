"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Bad input the user can fix: the message names the file/key/host and what was expected."""

    exit_code = 2


class ConfigError(UserError):
    """settings.yaml or a --set override is invalid."""


class DataError(UserError):
    """A dataset file or folder is missing, corrupt, or not what the loader expects."""


class TrainingError(UserError):
    """A run cannot start or continue (e.g. incompatible checkpoint, no training data)."""
