"""Errors that are the user's to fix: the CLI prints their message and exits non-zero, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, files, flags). The message says what to change."""

    exit_code = 2
    same_on_every_rank = False  # True: every rank of a job meets it alike, so only rank 0 prints it


class ConfigError(UserError):
    """An impossible or unsupported configuration, found before any process group starts."""

    same_on_every_rank = True


class DataError(UserError):
    """A dataset, corpus or tokenizer file that cannot be used as given."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or from another model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint of another model (size, tokenizer, adapters) than the run's: every rank reads the
    same identity and finds the same difference."""

    same_on_every_rank = True
