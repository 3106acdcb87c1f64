"""pytest fixtures of the QGIS tests (defined in srmf_qgis_testing, shared with tests/ui)."""
from srmf_qgis_testing import *  # noqa: F401,F403 - fixtures and the pytest_configure hook
