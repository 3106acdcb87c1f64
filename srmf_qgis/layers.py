"""Turn QGIS layers into files the engine (GDAL/OGR in another process) can open."""
from __future__ import annotations

import os
from typing import Optional

from qgis.core import (QgsCoordinateTransformContext, QgsMapLayer, QgsProcessingException, QgsProcessingUtils,
                       QgsRasterLayer, QgsVectorFileWriter, QgsVectorLayer)

try:  # QGIS >= 3.30
    from qgis.core import Qgis

    RASTER_TYPE = Qgis.LayerType.Raster
    VECTOR_TYPE = Qgis.LayerType.Vector
except AttributeError:  # QGIS 3.22 .. 3.28
    from qgis.core import QgsMapLayerType

    RASTER_TYPE = QgsMapLayerType.RasterLayer
    VECTOR_TYPE = QgsMapLayerType.VectorLayer


def is_raster(layer) -> bool:
    return isinstance(layer, QgsRasterLayer)


def is_vector(layer) -> bool:
    return isinstance(layer, QgsVectorLayer)


def raster_source(layer: QgsRasterLayer, what: str = "input raster") -> str:
    """The GDAL dataset name of a raster layer (a file path or a GDAL connection string).

    Raises:
        QgsProcessingException: the layer is not read through GDAL (a WMS, a virtual raster, ...).
    """
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"The {what} '{layer.name()}' comes from the '{layer.providerType()}' data provider; SRMF reads rasters "
            "through GDAL. Save it as a GeoTIFF first (right-click the layer \u25b8 Export \u25b8 Save As\u2026) and use that.")
    src = layer.source()
    return os.path.abspath(src) if os.path.exists(src) else src


def vector_source(layer: QgsVectorLayer, context, feedback=None, what: str = "polygon layer") -> str:
    """A file with the layer's features for OGR in the worker: the layer's own file when it is a plain
    file-based layer with no filter, else a temporary GeoPackage with its features (same CRS)."""
    if layer.providerType() == "ogr":
        parts = layer.source().split("|")
        path = parts[0]
        options = [p for p in parts[1:] if not p.startswith("layername=") and not p.startswith("layerid=0")]
        single = True
        if len(parts) > 1 and any(p.startswith("layername=") for p in parts[1:]):
            single = len(layer.dataProvider().subLayers()) <= 1
        if os.path.isfile(path) and not options and single and not layer.subsetString():
            return os.path.abspath(path)
    target = QgsProcessingUtils.generateTempFilename(f"{safe_name(layer.name())}.gpkg")
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    opts.fileEncoding = "UTF-8"
    tctx = context.transformContext() if context is not None else QgsCoordinateTransformContext()
    res = QgsVectorFileWriter.writeAsVectorFormatV3(layer, target, tctx, opts)
    err = res[0] if isinstance(res, tuple) else res
    if err != QgsVectorFileWriter.WriterError.NoError:
        msg = res[1] if isinstance(res, tuple) and len(res) > 1 else ""
        raise QgsProcessingException(f"Could not export the {what} '{layer.name()}' for the SRMF engine: {msg}")
    if feedback is not None:
        feedback.pushInfo(f"The {what} '{layer.name()}' was exported to {target} for the engine.")
    return target


def layer_path(layer: QgsMapLayer, context, feedback=None, what: str = "layer") -> str:
    if is_raster(layer):
        return raster_source(layer, what)
    if is_vector(layer):
        return vector_source(layer, context, feedback, what)
    raise QgsProcessingException(f"The {what} '{layer.name()}' is neither a raster nor a vector layer.")


def safe_name(name: str, default: str = "layer", limit: int = 60) -> str:
    """``name`` as a file stem: letters, digits, ``-`` and ``_`` kept, anything else ``_``, at most ``limit``
    characters; ``default`` when nothing is left."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:limit] or default


def field_is_numeric(layer: QgsVectorLayer, field: str) -> Optional[bool]:
    idx = layer.fields().indexOf(field)
    if idx < 0:
        return None
    return layer.fields().at(idx).isNumeric()
