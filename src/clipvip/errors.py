"""Errors that the command-line apps print as one line, without a traceback."""


class ClipvipError(Exception):
    """Base class: a problem with the user's input (config, checkpoint, data), not a bug."""


class ConfigError(ClipvipError):
    """A config file is missing, is not valid JSON, or holds an unknown key or a wrong type."""


class CheckpointError(ClipvipError):
    """A checkpoint does not exist, cannot be read, or does not match the model."""


class DataError(ClipvipError):
    """Annotations or videos cannot be used (malformed line, nothing readable, ...)."""
