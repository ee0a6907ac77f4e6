"""Errors that are the user's to fix: the CLI prints their message and exits non-zero, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, files, flags). The message says what to change."""

    exit_code = 2


class ConfigError(UserError):
    """An impossible or unsupported configuration, found before any process group starts."""


class DataError(UserError):
    """A dataset, corpus or tokenizer file that cannot be used as given."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or from another model."""
