"""Web map layers as inputs (issue 15, part 2): a WMS, WMTS or XYZ/TMS service read through GDAL's WMS and
WMTS drivers, strip by strip as any raster.

The QGIS plugin turns a web layer, a processing extent and a resolution into a GDAL service description
(``srmf_qgis/web.py``: a ``<GDAL_WMS>`` file with a tile cache); the engine opens it as a raster. What is
particular to a web source is handled here: it covers the world (an XYZ level is 2^z * 256 pixels a side),
so an area of interest is required; its server may drop requests, so a failed strip is read again
(``retries`` times, the pause doubling from ``retry_delay_s``: GDAL 3.6's WMS driver does not retry,
GDAL_HTTP_MAX_RETRY does not reach its tile requests); and its errors name the service, not a damaged file.
"""
from __future__ import annotations

from osgeo import gdal

from core.errors import InputError

WEB_DRIVERS = ("WMS", "WMTS")
RETRIES = 3
RETRY_DELAY_S = 1.0


def is_web(ds: gdal.Dataset) -> bool:
    """True when ``ds`` is read from a web service (GDAL's WMS or WMTS driver)."""
    driver = ds.GetDriver()
    return driver is not None and driver.ShortName in WEB_DRIVERS


def check_area(ds: gdal.Dataset, path, aoi) -> None:
    """Refuse a web source without an area of interest (``aoi`` None).

    Raises:
        InputError: naming ``path`` and the size of the whole layer.
    """
    if aoi is None and is_web(ds):
        raise InputError(f"{path} is a web map layer ({ds.RasterXSize} x {ds.RasterYSize} px at this level, the whole "
                         "world): give the area to segment (--extent, or --mask; in QGIS the processing extent)")


def retry_reads(reader, path) -> None:
    """Make a :class:`core.geo.raster.StripReader` of a web source read a failed strip again (``RETRIES``
    times, the pause doubling from ``RETRY_DELAY_S`` seconds) and name the service when it gives up."""
    reader.retries = RETRIES
    reader.retry_delay_s = RETRY_DELAY_S
    reader.name = str(path)


WEB_SOURCE = "SRMF_WEB_SOURCE"  # metadata item on the virtual subset of a web source (the driver is VRT there)


def mark(subset: gdal.Dataset) -> gdal.Dataset:
    """Tag the virtual subset of a web source (:func:`from_web` then knows it); returns it."""
    subset.SetMetadataItem(WEB_SOURCE, "YES")
    return subset


def from_web(ds: gdal.Dataset) -> bool:
    """True for a web source or the virtual subset of one (:func:`mark`)."""
    return is_web(ds) or ds.GetMetadataItem(WEB_SOURCE) == "YES"
