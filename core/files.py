"""Atomic output, the one writer of the partial-file contract: every file the engine writes is first
written to ``.<stem>.<random>.partial<suffix>`` beside its target and renamed onto it only when complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository (= QGIS plugin) folder: resources/ (default model, concept vocabulary) live under it."""

PARTIAL = "partial"
"""The mark in every temporary file name. ``srmf_qgis.runtime.remove_partials`` removes the files named
``.<stem>.*partial*`` beside a job's outputs after it kills a worker (a test holds the two together)."""

PathLike = Union[str, os.PathLike]


def default_file_mode() -> int:
    """0o666 less the process umask: the mode a plain ``open()`` would give (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def partial_path(final: PathLike) -> Path:
    """Create an empty temporary file beside ``final``, named ``.<stem>.<random>.partial<suffix>`` (the
    suffix kept so that GDAL picks the driver), with the mode a plain ``open()`` gives; return its path.

    Raises:
        OSError: the folder of ``final`` does not exist or is not writable.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(dir=str(final.parent), prefix=f".{final.stem}.", suffix=f".{PARTIAL}{final.suffix}")
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    return Path(tmp)


def publish(tmp: PathLike, final: PathLike) -> Path:
    """Rename a finished temporary file onto ``final`` (atomic on one file system), with the mode a plain
    ``open()`` gives (writers such as safetensors re-create the file with mode 0600)."""
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, final)
    return Path(final)


def discard(*paths: PathLike) -> None:
    """Remove temporary files (and their GDAL ``.aux.xml`` sidecars) that may or may not exist."""
    for p in paths:
        for f in (str(p), f"{p}.aux.xml"):
            with contextlib.suppress(OSError):
                os.unlink(f)


@contextlib.contextmanager
def atomic_output(final: PathLike, create: bool = True) -> Iterator[Path]:
    """``with atomic_output(path) as tmp:`` write ``tmp``; on a normal exit it replaces ``path``, on an
    exception (or cancel) it is removed and ``path`` is untouched. ``create=False``: ``tmp`` does not exist
    yet (for writers that refuse an existing file, e.g. GDAL's GeoPackage driver)."""
    tmp = partial_path(final)
    if not create:
        tmp.unlink()
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, final)


def check_writable_folder(folder: PathLike) -> None:
    """Raise OSError unless a file can really be created in ``folder`` (``os.access`` says yes to root even
    on a read-only file system, so this writes and removes a probe file)."""
    fd, probe = tempfile.mkstemp(dir=str(folder), prefix=".srmf-write-test.")
    os.close(fd)
    os.unlink(probe)
