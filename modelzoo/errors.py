"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (params, data, flags, checkpoints): the message names what and where."""


class ConfigError(UserError):
    """A params yaml or CLI flag is invalid."""


class DataError(UserError):
    """An input genome file, label table or shard directory is invalid."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint stays loadable."""
