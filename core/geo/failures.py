"""GDAL failures during a run as engine errors that name the file (issue 13): a truncated or damaged
input is a :class:`~core.errors.ReadError` (exit 2), a full disk while writing a
:class:`~core.errors.WriteError` (exit 1) — never a traceback. With ``gdal.UseExceptions()`` GDAL raises
``RuntimeError`` with its own message; these helpers wrap the few places where the engine reads or writes
pixels and features, and catches the failures GDAL reports only when a dataset is
closed (its last blocks are written then), which Python would otherwise print as an "ignored" exception
and carry on from (:func:`checked_close`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from osgeo import gdal

from core.errors import SRMFError, read_error, write_error

gdal.UseExceptions()


@contextlib.contextmanager
def reading(path, what: str = "raster") -> Iterator[None]:
    """``with reading(path):`` GDAL read calls; a ``RuntimeError`` (GDAL) or ``OSError`` becomes a
    :class:`~core.errors.ReadError` naming ``path`` (the ``what``: "raster", "reference raster", ...)."""
    try:
        yield
    except SRMFError:
        raise
    except (RuntimeError, OSError) as exc:
        raise read_error(path, exc, what) from None


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """``with writing(path):`` GDAL write calls for the output ``path``; a ``RuntimeError`` (GDAL) or
    ``OSError`` becomes :func:`~core.errors.write_error` naming ``path`` (not its partial file)."""
    try:
        yield
    except SRMFError:
        raise
    except (RuntimeError, OSError) as exc:
        raise write_error(path, exc) from None


@contextlib.contextmanager
def checked_close(path) -> Iterator[None]:
    """``with checked_close(path): ds.FlushCache(); ds = None`` — close the GDAL dataset that writes the
    output ``path`` (drop every band and layer reference first) and fail if its last writes failed.

    GDAL writes the last blocks of a GeoTIFF (the last pages of a GeoPackage) on close and, under
    ``UseExceptions``, raises from the dataset's destructor, where Python cannot propagate the error: it
    prints "Exception ignored" and carries on as if the file were complete. Inside this block the
    destructor's exception is captured instead, and GDAL's last error is checked as well. (A helper
    function cannot close the dataset for its caller: the caller's references keep it alive.)

    Raises:
        WriteError / InputError: :func:`~core.errors.write_error` — the file is not complete.
    """
    captured: list = []
    gdal.ErrorReset()
    with _capture_unraisable(captured), writing(path):
        yield
    if captured:
        raise write_error(path, captured[0]) from None
    if gdal.GetLastErrorType() >= gdal.CE_Failure:
        raise write_error(path, RuntimeError(gdal.GetLastErrorMsg()))


@contextlib.contextmanager
def discarding() -> Iterator[None]:
    """``with discarding(): ds = None`` — drop a dataset whose file is being thrown away after an error:
    the failure of its last writes (the same full disk) is of no interest and is not printed."""
    with _capture_unraisable([]):
        yield


@contextlib.contextmanager
def _capture_unraisable(captured: list) -> Iterator[None]:
    """Exceptions Python cannot raise (from destructors) inside the block are appended to ``captured``
    instead of printed (``sys.unraisablehook``)."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: captured.append(unraisable.exc_value)
    try:
        yield
    finally:
        sys.unraisablehook = previous
