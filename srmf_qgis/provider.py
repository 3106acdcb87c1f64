"""The Processing provider "SRMF" (id ``srmf``): segment, finetune, evaluate, modelinfo."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider

from . import __version__
from .algorithms import ALGORITHMS
from .algorithms.base import icon


class SRMFProvider(QgsProcessingProvider):
    """Algorithms usable from the Toolbox, Model Builder, batch mode and ``qgis_process``."""

    def id(self) -> str:
        return "srmf"

    def name(self) -> str:
        return "SRMF"

    def longName(self) -> str:  # noqa: N802
        return f"SRMF semantic segmentation {__version__}"

    def icon(self):
        return icon("srmf")

    def versionInfo(self) -> str:  # noqa: N802
        return __version__

    def loadAlgorithms(self):  # noqa: N802
        for cls in ALGORITHMS:
            self.addAlgorithm(cls())

    def supportedOutputRasterLayerExtensions(self):  # noqa: N802 - the engine writes GeoTIFF
        return ["tif"]

    def defaultRasterFileExtension(self) -> str:  # noqa: N802
        return "tif"
