"""Small file helpers shared by the writers (no GDAL, no torch)."""
from __future__ import annotations

import os


def default_file_mode() -> int:
    """0o666 less the process umask: the mode a plain ``open()`` would give (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
