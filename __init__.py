"""SRMF for QGIS: the plugin folder (installed as ``srmf``). QGIS calls :func:`classFactory`.

The engine (``core/``, torch) never runs inside QGIS: the plugin starts it as a separate process.
"""


def classFactory(iface):  # noqa: N802 - QGIS API
    from .srmf_qgis.plugin import SRMFPlugin

    return SRMFPlugin(iface)
