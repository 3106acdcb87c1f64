"""The QGIS side of SRMF: the Processing provider, the plugin (menus, context menu, dialogs), the
runtime that runs the engine in its own process. Nothing here imports torch (DESIGN.md)."""
from pathlib import Path


def _version() -> str:
    try:
        for line in (Path(__file__).resolve().parent.parent / "metadata.txt").read_text(encoding="utf-8").splitlines():
            if line.startswith("version="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return "0"


__version__ = _version()
