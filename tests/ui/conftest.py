"""pytest fixtures of the UI tests: the same as the QGIS tests' (tests/qgis/srmf_qgis_testing.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qgis"))

from srmf_qgis_testing import *  # noqa: E402,F401,F403 - fixtures and the pytest_configure hook
