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


class ReadError(InputError):
    """An input file that exists and opened but cannot be read through: truncated, damaged, or on a
    failing disk (GDAL's read error, named with the file). Exit code 2."""


class WriteError(SRMFError):
    """An output that could not be written for a reason of the machine: the disk is full, a file-size or
    quota limit, an I/O error. Exit code 1. (An output folder the user may not write to is an
    :class:`InputError`, found before any work by the output checks.)"""


# errno values of a place the user may not (or cannot) write to, rather than of a failing machine
_USER_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "EEXIST"}


def write_error(path, exc: BaseException) -> SRMFError:
    """The engine error for a failure while writing ``path`` (an OSError, or GDAL's RuntimeError, whose
    text then names a partial file): :class:`WriteError` (exit 1) for a full disk and other failures of the
    machine, :class:`InputError` (exit 2) for a place the user may not write to. The message names
    ``path`` and says what to do; nothing of ``path`` is left by the caller (partial files are removed)."""
    import errno as _errno

    code = _errno.errorcode.get(io_errno(exc) or -1, "")
    import re

    text = (getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__).strip()
    text = re.sub(r"\S*\.partial[^\s:]*:\s*", "", text)  # GDAL names the partial file: the user knows only path
    low = text.lower()
    if code in _USER_ERRNOS:
        return InputError(f"Cannot write {path}: {text}. Choose a folder you may write to.")
    full = code in {"ENOSPC", "EDQUOT", "EFBIG"} or any(
        s in low for s in ("no space left", "file too large", "disk quota", "write error", "failed to write",
                           "writeencoded", "_tiffwriteproc", "cannot initialize empty blocks"))
    if full:
        return WriteError(f"Cannot write {path}: the disk is full or a file-size limit was reached ({text}). "
                          f"Nothing was written under that name; free some space and run again.")
    return WriteError(f"Cannot write {path}: {text}. Nothing was written under that name.")


def read_error(path, exc: BaseException, what: str = "raster") -> ReadError:
    """The :class:`ReadError` for a failure while reading ``path`` (GDAL's RuntimeError or an OSError)."""
    text = (getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__).strip()
    prefix = f"{path}, "
    if text.startswith(prefix):  # GDAL's messages often start with the file name: say it once
        text = text[len(prefix):]
    return ReadError(f"Cannot read the {what} {path}: it is truncated or damaged, or its disk failed "
                     f"(GDAL: {text}). Check the file (gdalinfo -checksum) or copy it again.")


def web_read_error(path, exc: BaseException, attempts: int) -> ReadError:
    """The :class:`ReadError` for a web map layer (GDAL's WMS/WMTS drivers) whose server did not answer or
    refused tiles, after ``attempts`` tries: names the service description ``path`` and GDAL's message (the
    tile's URL, the HTTP status), without GDAL's advice about ``<ZeroBlockHttpCodes>`` (not for analysts)."""
    import re

    text = (str(exc) or exc.__class__.__name__).strip()
    if text.startswith(f"{path}, "):
        text = text[len(f"{path}, "):]
    text = re.sub(r"\s*Add the HTTP status code to <ZeroBlockHttpCodes>.*$", "", text, flags=re.S)
    text = re.sub(r"\s+", " ", text).strip()
    return ReadError(f"Cannot read the web map layer {path}: its server did not answer or refused tiles "
                     f"({attempts} attempt{'s' if attempts != 1 else ''}; GDAL: {text}). Check the network and the "
                     "layer's address, or try again later.")


def io_errno(exc: BaseException):
    """The errno of an I/O failure: ``exc.errno`` of an OSError, or the ``(os error N)`` that Rust-backed
    writers (safetensors) put in their message; None when ``exc`` is not an I/O failure."""
    import re

    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    m = re.search(r"os error (\d+)", str(exc))
    return int(m.group(1)) if m else None
