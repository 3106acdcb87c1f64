"""Errors raised by the SRMF engine, with the process exit code each maps to.

Every message names the file, band or parameter at fault, so that the QGIS side can show it as is.
"""


class SRMFError(Exception):
    """Base class of the engine's errors. Exit code 1."""

    exit_code = 1


class InputError(SRMFError):
    """Bad input from the user: a missing or unreadable file, a wrong band, an invalid parameter.

    Exit code 2.
    """

    exit_code = 2


class ModelFileError(InputError):
    """A model file that is missing, corrupt, truncated, foreign or a pickle. Exit code 2."""


class Cancelled(SRMFError):
    """The job was cancelled (SIGINT/SIGTERM from the user or from QGIS). Exit code 130."""

    exit_code = 130
