"""Atomic output, the one writer of the partial-file contract: every file the engine writes is first
written to ``.<stem>.<random>.partial<suffix>`` beside its target and renamed onto it only when complete."""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Union

from core.errors import io_errno, write_error

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
    """Create an empty temporary file beside ``final``, named ``.<stem>.<pid>-<random>.partial<suffix>`` (the
    suffix kept so that GDAL picks the driver), with the mode a plain ``open()`` gives; return its path.

    First removes the partial files of ``final`` that a killed run left (:func:`remove_stale_partials`).

    Raises:
        OSError: the folder of ``final`` does not exist or is not writable.
    """
    final = Path(final)
    remove_stale_partials(final)
    fd, tmp = tempfile.mkstemp(dir=str(final.parent), prefix=f".{final.stem}.{os.getpid()}-",
                               suffix=f".{PARTIAL}{final.suffix}")
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    return Path(tmp)


def _pid_alive(pid: int) -> Optional[bool]:
    """Whether process ``pid`` runs on this machine: psutil where installed, else signal 0 on POSIX; None
    where it cannot be told (Windows without psutil, where ``os.kill(pid, 0)`` would send CTRL_C)."""
    try:
        import psutil

        return bool(psutil.pid_exists(pid))
    except ImportError:
        pass
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def remove_stale_partials(final: PathLike) -> List[Path]:
    """Remove ``final``'s partial files (``.<stem>.<pid>-*.partial*``) whose writing process no longer runs —
    what a SIGKILLed or crashed run leaves; a live writer's (a concurrent run) and unknown ones are kept.
    Returns the removed paths."""
    final = Path(final)
    removed = []
    for f in final.parent.glob(f".{glob.escape(final.stem)}.*-*.{PARTIAL}*"):
        pid = f.name[len(final.stem) + 2:].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)) is False:
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
    return removed


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
    yet (for writers that refuse an existing file, e.g. GDAL's GeoPackage driver).

    Raises:
        WriteError / InputError: an I/O failure while writing (:func:`core.errors.write_error`: a full disk
            is a WriteError, exit 1), naming ``path``; other exceptions of the block as they are.
    """
    tmp = partial_path(final)
    if not create:
        tmp.unlink()
    try:
        yield tmp
        publish(tmp, final)
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError) or io_errno(exc) is not None:  # a full disk: named, no traceback
            raise write_error(final, exc) from None
        raise


def check_writable_folder(folder: PathLike) -> None:
    """Raise OSError unless a file can really be created in ``folder`` (``os.access`` says yes to root even
    on a read-only file system, so this writes and removes a probe file)."""
    fd, probe = tempfile.mkstemp(dir=str(folder), prefix=".srmf-write-test.")
    os.close(fd)
    os.unlink(probe)
