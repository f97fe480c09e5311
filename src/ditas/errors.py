"""Errors a user can act on: the command line prints them as one line and exits non-zero."""


class DitasError(Exception):
    """Base class of every error ditas reports to the user (bad file, bad argument, bad data)."""


class CheckpointError(DitasError):
    """A model file or folder that ditas cannot load (names the path and what was wrong)."""


class ConfigError(DitasError, ValueError):
    """An invalid configuration value (bits out of range, unknown recipe, ...)."""


class CalibrationError(DitasError):
    """Calibration met bad numbers (NaN or inf) or bad inputs; the message names layer and step."""


class InputFileError(DitasError, ValueError):
    """A file ditas reads is missing, malformed, too large or holds wrong values (names file and field)."""
