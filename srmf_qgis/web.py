"""Web map layers (XYZ tiles and WMS) as GDAL sources for the engine (issue 15, part 2).

QGIS reads WMS, WMTS and XYZ layers through its "wms" data provider; the engine reads rasters through GDAL,
whose WMS driver reads the same services from a *service description* (a ``<GDAL_WMS>`` XML file, GDAL's
"WMS -- Web Map Services" driver documentation). :func:`web_source` writes that file for a layer, a
processing extent and a resolution:

- **XYZ** (``type=xyz&url=…/{z}/{x}/{y}.png``): GDAL's TMS mini-driver on the EPSG:3857 tile grid of 256 px
  tiles at the zoom level whose ground pixel at the extent's centre is the finest not coarser than the
  resolution (``zmax`` caps it; the engine then resamples to the resolution). The dataset is the whole world
  at that level; the extent goes to the engine as ``--extent`` (only the windows that touch it are read).
  ``{-y}`` (TMS row order) is supported; ``{q}`` quadkeys and ``{s}`` sub-domains are refused by name.
- **WMS** (``url``, ``layers``, ``styles``, ``format``, ``crs``): GDAL's WMS mini-driver (version 1.1.1, no
  axis-order ambiguity), a data window that is the extent itself at the resolution (in the layer's CRS).
- **WMTS** (``url`` = the capabilities document, ``layers``, ``tileMatrixSet``, ``styles``): GDAL's WMTS driver
  (a ``<GDAL_WMTS>`` description) at the tile matrix chosen as for XYZ (GDAL lists the matrices); the extent goes
  to the engine as ``--extent`` in the tile matrix set's CRS.

Four bands are asked for (the fourth is alpha: tiles that are missing — HTTP 204/404 — or transparent are
nodata, not black pixels); tiles are cached on disk (``<Cache>``, under the QGIS profile) so a second run over
the same area downloads nothing. This module never imports torch (the guard test checks it).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import List, Optional, Tuple
from urllib.parse import unquote
from xml.sax.saxutils import escape

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsDistanceArea, QgsPointXY,
                       QgsProcessingException, QgsProject, QgsRectangle)

from .layers import safe_name

WEB_PROVIDER = "wms"  # QGIS's provider key of WMS, WMTS and XYZ layers
MERCATOR_HALF_WORLD = 20037508.342789244  # EPSG:3857 metres from the origin to the edge of the tile grid
TILE = 256
MAX_ZOOM = 24
TIMEOUT_S = 30
MAX_CONNECTIONS = 4


def is_web_layer(layer) -> bool:
    """True for a raster layer of QGIS's "wms" provider (WMS, WMTS or XYZ)."""
    return layer is not None and layer.providerType() == WEB_PROVIDER


def source_params(layer) -> List[Tuple[str, str]]:
    """The ``key=value`` pairs of a "wms" provider layer's source, in their order, percent-decoded."""
    out = []
    for part in layer.source().split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        out.append((unquote(key), unquote(value)))
    return out


def kind(layer) -> str:
    """``"xyz"``, ``"wmts"`` or ``"wms"`` for a "wms" provider layer."""
    params = dict(source_params(layer))
    if params.get("type") == "xyz":
        return "xyz"
    if params.get("tileMatrixSet") or "wmts" in params.get("url", "").lower():
        return "wmts"
    return "wms"


def metres_per_unit(crs: QgsCoordinateReferenceSystem, point: QgsPointXY) -> float:
    """Ground metres per unit of ``crs`` at ``point`` (on the CRS's ellipsoid; geographic CRSs: degrees of
    longitude and latitude averaged; Web Mercator: cos(latitude))."""
    da = QgsDistanceArea()
    da.setSourceCrs(crs, QgsProject.instance().transformContext())
    da.setEllipsoid(crs.ellipsoidAcronym() or "EPSG:7030")
    step = 1e-5 if crs.isGeographic() else 1.0
    east = da.measureLine(point, QgsPointXY(point.x() + step, point.y()))
    north = da.measureLine(point, QgsPointXY(point.x(), point.y() + step))
    return 0.5 * (east + north) / step


def xyz_zoom(centre_3857: QgsPointXY, resolution_m: float, zmin: int = 0, zmax: int = MAX_ZOOM) -> int:
    """The tile level whose ground pixel at ``centre_3857`` is the finest not coarser than ``resolution_m``
    metres, within ``zmin..zmax``."""
    ground = metres_per_unit(QgsCoordinateReferenceSystem("EPSG:3857"), centre_3857)
    level0 = 2 * MERCATOR_HALF_WORLD / TILE * ground  # ground metres per pixel at level 0
    z = int(math.ceil(math.log2(level0 / resolution_m) - 1e-9))
    return max(zmin, min(zmax, z))


def web_source(layer, extent: QgsRectangle, resolution_m: float, folder: str, cache_dir: Optional[str] = None
               ) -> Tuple[str, str, str]:
    """Write the GDAL service description of the web layer ``layer`` for ``extent`` (in the layer's CRS — for a
    WMS, the CRS of its source, ``crs=``) at
    ``resolution_m`` metres per pixel into ``folder``.

    Returns:
        ``(path of the .xml, the engine's --extent text "xmin,ymin,xmax,ymax,CRS", a sentence for the log)``.

    Raises:
        QgsProcessingException: a WMTS service GDAL cannot read, an XYZ address with placeholders GDAL cannot fill, an empty
            extent, a resolution that is not positive, or an extent too large for one WMS request grid.
    """
    if not (resolution_m and resolution_m > 0 and math.isfinite(resolution_m)):
        raise QgsProcessingException(f"The web layer '{layer.name()}' needs a processing resolution in metres "
                                     f"(got {resolution_m!r}).")
    if extent is None or extent.isEmpty():
        raise QgsProcessingException(f"The web layer '{layer.name()}' covers the whole world: choose a processing "
                                     "extent (or a mask layer) to segment.")
    what = kind(layer)
    cache = cache_dir or os.path.join(folder, "srmf-web-cache")
    build = {"xyz": _xyz, "wmts": _wmts}.get(what, _wms)
    xml, extent_arg, note = build(layer, extent, resolution_m, cache)
    name = hashlib.sha1(xml.encode()).hexdigest()[:12]
    path = os.path.join(folder, f"{safe_name(layer.name(), 'web', 40)}-{name}.xml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(xml)
    return path, extent_arg, note


def _common(cache: str) -> str:
    return (f"<BandsCount>4</BandsCount><Cache><Path>{escape(cache)}</Path></Cache>"
            f"<MaxConnections>{MAX_CONNECTIONS}</MaxConnections><Timeout>{TIMEOUT_S}</Timeout>"
            "<ZeroBlockHttpCodes>204,404</ZeroBlockHttpCodes><UserAgent>SRMF for QGIS (GDAL WMS driver)</UserAgent>")


def _xyz(layer, extent: QgsRectangle, resolution_m: float, cache: str):
    params = dict(source_params(layer))
    url = params.get("url", "")
    for bad in ("{q}", "{s}", "{quadkey}", "{usr}"):
        if bad in url:
            raise QgsProcessingException(f"The XYZ layer '{layer.name()}' has {bad} in its address ({url}); SRMF "
                                         "reads addresses with {x}, {y} (or {-y}) and {z} only.")
    if not all(p in url for p in ("{x}", "{z}")) or not ("{y}" in url or "{-y}" in url):
        raise QgsProcessingException(f"The XYZ layer '{layer.name()}' has no {{x}}/{{y}}/{{z}} in its address ({url}).")
    y_origin = "bottom" if "{-y}" in url else "top"
    server = url.replace("{x}", "${x}").replace("{-y}", "${y}").replace("{y}", "${y}").replace("{z}", "${z}")
    to_3857 = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:3857"), QgsProject.instance())
    area = to_3857.transformBoundingBox(extent)
    zmin, zmax = int(params.get("zmin") or 0), int(params.get("zmax") or MAX_ZOOM)
    z = xyz_zoom(area.center(), resolution_m, zmin, zmax)
    h = MERCATOR_HALF_WORLD
    xml = (f"<GDAL_WMS><Service name=\"TMS\"><ServerUrl>{escape(server)}</ServerUrl></Service>"
           f"<DataWindow><UpperLeftX>{-h!r}</UpperLeftX><UpperLeftY>{h!r}</UpperLeftY><LowerRightX>{h!r}</LowerRightX>"
           f"<LowerRightY>{-h!r}</LowerRightY><TileLevel>{z}</TileLevel><TileCountX>1</TileCountX>"
           f"<TileCountY>1</TileCountY><YOrigin>{y_origin}</YOrigin></DataWindow>"
           f"<Projection>EPSG:3857</Projection><BlockSizeX>{TILE}</BlockSizeX><BlockSizeY>{TILE}</BlockSizeY>"
           + _common(cache) + "</GDAL_WMS>")
    ground = 2 * h / (TILE * 2 ** z) * metres_per_unit(QgsCoordinateReferenceSystem("EPSG:3857"), area.center())
    extent_arg = f"{area.xMinimum()!r},{area.yMinimum()!r},{area.xMaximum()!r},{area.yMaximum()!r},EPSG:3857"
    note = (f"web layer '{layer.name()}' (XYZ): tile level {z} ({ground:.3g} m pixels at the extent's centre), "
            f"processed at {resolution_m:g} m; tiles cached in {cache}")
    return xml, extent_arg, note


def _wmts(layer, extent: QgsRectangle, resolution_m: float, cache: str):
    """GDAL's WMTS driver (a ``<GDAL_WMTS>`` description) at the tile matrix whose ground pixel at the extent's
    centre is the finest not coarser than ``resolution_m``: GDAL reads the capabilities (here, in QGIS's
    process, to list the matrices: the full-resolution dataset and its overviews, one per coarser matrix)."""
    from .compat import gdal_open

    params = dict(source_params(layer))
    url, name, tms = params.get("url", ""), params.get("layers", ""), params.get("tileMatrixSet", "")
    style, fmt = params.get("styles", ""), params.get("format", "image/png")
    conn = f"WMTS:{url},layer={name}" + (f",tilematrixset={tms}" if tms else "") + (f",style={style}" if style else "")
    ds, reason = gdal_open(conn)
    if ds is None:
        raise QgsProcessingException(f"The WMTS layer '{layer.name()}': GDAL cannot read its service {url} ({reason}).")
    crs = QgsCoordinateReferenceSystem()
    crs.createFromWkt(ds.GetProjectionRef())
    area = QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance()).transformBoundingBox(extent)
    ground = metres_per_unit(crs, area.center())
    band, p0 = ds.GetRasterBand(1), abs(ds.GetGeoTransform()[1])
    n = band.GetOverviewCount()
    levels = [(p0, n)] + [(p0 * ds.RasterXSize / band.GetOverview(k).XSize, n - 1 - k) for k in range(n)]
    fine_enough = [lv for lv in levels if lv[0] * ground <= resolution_m * (1 + 1e-9)]
    pixel, zoom = max(fine_enough) if fine_enough else min(levels)
    xml = (f"<GDAL_WMTS><GetCapabilitiesUrl>{escape(url)}</GetCapabilitiesUrl><Layer>{escape(name)}</Layer>"
           + (f"<Style>{escape(style)}</Style>" if style else "")
           + (f"<TileMatrixSet>{escape(tms)}</TileMatrixSet>" if tms else "")
           + f"<ZoomLevel>{zoom}</ZoomLevel><Format>{escape(fmt)}</Format><BandsCount>4</BandsCount>"
           f"<Cache><Path>{escape(cache)}</Path></Cache><ZeroBlockHttpCodes>204,404</ZeroBlockHttpCodes>"
           "<UserAgent>SRMF for QGIS (GDAL WMTS driver)</UserAgent></GDAL_WMTS>")
    check, reason = gdal_open(xml)
    if check is None or abs(abs(check.GetGeoTransform()[1]) - pixel) > 1e-6 * pixel:
        raise QgsProcessingException(f"The WMTS layer '{layer.name()}': its tile matrix {zoom} is not the one GDAL "
                                     f"listed ({reason or 'another pixel size'}); export the area to a GeoTIFF.")
    extent_arg = f"{area.xMinimum()!r},{area.yMinimum()!r},{area.xMaximum()!r},{area.yMaximum()!r},{crs.authid()}"
    note = (f"web layer '{layer.name()}' (WMTS {name}): tile matrix {zoom} ({pixel * ground:.3g} m pixels at the "
            f"extent's centre), processed at {resolution_m:g} m; tiles cached in {cache}")
    return xml, extent_arg, note


MAX_WMS_SIDE = 200_000  # pixels a side of the WMS data window (the engine reads it strip by strip)


def _wms(layer, extent: QgsRectangle, resolution_m: float, cache: str):
    pairs = source_params(layer)
    params = dict(pairs)
    url = params.get("url", "")
    if not url:
        raise QgsProcessingException(f"The WMS layer '{layer.name()}' has no server address in its source.")
    layers = ",".join(v for k, v in pairs if k == "layers")
    styles = ",".join(v for k, v in pairs if k == "styles")
    crs = params.get("crs") or layer.crs().authid()
    fmt = params.get("format") or "image/png"
    per_unit = metres_per_unit(QgsCoordinateReferenceSystem(crs), extent.center())
    step = resolution_m / per_unit  # CRS units per pixel
    width = max(1, int(round(extent.width() / step)))
    height = max(1, int(round(extent.height() / step)))
    if max(width, height) > MAX_WMS_SIDE:
        raise QgsProcessingException(f"The extent is {width} x {height} px at {resolution_m:g} m on the WMS layer "
                                     f"'{layer.name()}': choose a smaller extent or a coarser resolution.")
    x0, y1 = extent.xMinimum(), extent.yMaximum()
    x1, y0 = x0 + width * step, y1 - height * step  # whole pixels of exactly `step`
    server = url if url.endswith(("?", "&")) else url + ("&" if "?" in url else "?")
    xml = (f"<GDAL_WMS><Service name=\"WMS\"><Version>1.1.1</Version><ServerUrl>{escape(server)}</ServerUrl>"
           f"<SRS>{escape(crs)}</SRS><ImageFormat>{escape(fmt)}</ImageFormat><Transparent>TRUE</Transparent>"
           f"<Layers>{escape(layers)}</Layers><Styles>{escape(styles)}</Styles></Service>"
           f"<DataWindow><UpperLeftX>{x0!r}</UpperLeftX><UpperLeftY>{y1!r}</UpperLeftY><LowerRightX>{x1!r}</LowerRightX>"
           f"<LowerRightY>{y0!r}</LowerRightY><SizeX>{width}</SizeX><SizeY>{height}</SizeY></DataWindow>"
           f"<Projection>{escape(crs)}</Projection><BlockSizeX>512</BlockSizeX><BlockSizeY>512</BlockSizeY>"
           + _common(cache) + "</GDAL_WMS>")
    note = (f"web layer '{layer.name()}' (WMS {layers}): {width} x {height} px of {resolution_m:g} m in {crs}; "
            f"tiles cached in {cache}")
    return xml, f"{x0!r},{y0!r},{x1!r},{y1!r},{crs}", note

