"""Exceptions crossvlm raises for problems a user can fix. The CLI prints them as one clear line."""


class CrossVLMError(Exception):
    """Base class: an error in the user's input, files or configuration (not a bug)."""


class ConfigError(CrossVLMError, ValueError):
    """A configuration value or argument is invalid. The message lists every problem found."""


class ModelLoadError(CrossVLMError):
    """A model directory or hub id cannot be loaded as asked (missing files, mismatched keys)."""


class ImageTokenMismatch(CrossVLMError, ValueError):
    """The number of <|image_pad|> tokens does not match the images given."""


class DataError(CrossVLMError):
    """A data set cannot be used: unknown format, unreadable file, too many bad records."""


class CheckpointError(CrossVLMError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingError(CrossVLMError):
    """A run cannot go on (e.g. the loss stayed NaN/inf for too many steps in a row)."""
