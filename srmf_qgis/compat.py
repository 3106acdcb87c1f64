"""What differs between the QGIS versions the plugin runs on (3.22 with Qt 5 … 4.x with Qt 6), in one place.

Field types: QGIS 3.38 and later take ``QMetaType.Type`` for a ``QgsField`` (Qt 6 has no ``QVariant.Type``);
QGIS 3.22–3.36 take ``QVariant.Type``. :func:`field_type` gives the one the running QGIS takes.
"""
from __future__ import annotations

from qgis.core import Qgis

_META_NAMES = {"String": "QString"}  # QVariant.Type.String is QMetaType.Type.QString


def field_type(name: str):
    """The field type ``name`` (``"Int"``, ``"LongLong"``, ``"Double"``, ``"String"``, ``"Bool"``) for a
    ``QgsField`` of the running QGIS: ``QMetaType.Type`` from 3.38 (Qt 6 ready), else ``QVariant.Type``.

    Raises:
        AttributeError: an unknown type name.
    """
    from qgis.PyQt.QtCore import QMetaType, QVariant

    if Qgis.QGIS_VERSION_INT >= 33800:
        return getattr(QMetaType.Type, _META_NAMES.get(name, name))
    return getattr(QVariant.Type, name)  # the one place a Qt 5-only name is allowed (tests/qgis/test_qt6_readiness.py)


def gdal_open(path: str, flags: int = 0):
    """``(dataset or None, GDAL's last error message)`` for ``path``, opened with ``gdal.OpenEx`` (``flags``:
    ``gdal.OF_*``; 0 = any kind), whichever error mode the running QGIS set: QGIS 3.22 leaves GDAL's
    Python bindings returning None on failure, QGIS 3.40 turns exceptions on (``gdal.UseExceptions``),
    where the same call raises RuntimeError. Errors are not printed (CPLQuietErrorHandler)."""
    from osgeo import gdal

    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        try:
            ds = gdal.OpenEx(str(path), flags)
        except RuntimeError as e:
            return None, str(e)
        return ds, (gdal.GetLastErrorMsg() if ds is None else "")
    finally:
        gdal.PopErrorHandler()


def layer_filter(*names: str):
    """The layer filter of ``names`` (``"RasterLayer"``, ``"PolygonLayer"``, ...) OR-ed, for
    ``QgsMapLayerComboBox.setFilters``: ``Qgis.LayerFilter`` from QGIS 3.34 (QgsMapLayerProxyModel.Filter is
    deprecated there), else ``QgsMapLayerProxyModel.Filter``."""
    import functools
    import operator

    if hasattr(Qgis, "LayerFilter"):
        # Qgis.LayerFilter is an IntFlag: OR-ed members are a plain int, which sip hands to the deprecated
        # overload; Qgis.LayerFilters(...) picks the current one
        return Qgis.LayerFilters(functools.reduce(operator.or_, (getattr(Qgis.LayerFilter, n) for n in names)))
    from qgis.core import QgsMapLayerProxyModel

    return functools.reduce(operator.or_, (getattr(QgsMapLayerProxyModel.Filter, n) for n in names))
    from qgis.core import QgsMapLayerProxyModel

    value = getattr(QgsMapLayerProxyModel.Filter, names[0])
    for n in names[1:]:
        value = value | getattr(QgsMapLayerProxyModel.Filter, n)
    return value

