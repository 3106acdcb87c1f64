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
