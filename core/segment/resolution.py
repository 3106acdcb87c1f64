"""Resolution-aware inference (issue 12, part 1): segment at the model's ground sample distance.

A model sees objects at the scale of its training imagery: a 0.8 m model run on 10 cm pixels sees tree
crowns the size of building blocks. Like Deepness's processing resolution and ArcGIS's cell size,
``segment --resolution auto`` (the default) processes a raster whose pixel size is more than
:data:`AUTO_FACTOR` times off the model's ``gsd_m`` on a grid of (about) that GSD over the same extent:
GDAL reads each strip resampled (``average`` when shrinking, ``bilinear`` when enlarging, through a VRT,
so nothing is copied), the network runs at the model's scale, and its averaged logits are resampled back
(bilinear) onto the input's own grid, where the class raster is written (same size, CRS and
geotransform; nodata where the input is nodata). ``native`` processes the pixels as they are; a number is
the processing GSD in metres.

Pixel size: a projected CRS gives it in its linear unit (converted to metres); a geographic CRS gives
degrees, converted at the raster's centre latitude (WGS 84 ellipsoid radii of curvature: good to a
fraction of a percent, far below the 1.5x threshold); a raster without georeferencing has none, and is
processed natively unless ``--pixel-size`` gives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from core.errors import InputError

AUTO_FACTOR = 1.5
"""``auto`` resamples when the raster's pixel size and the model's GSD differ by more than this ratio."""

MAX_ENLARGEMENT = 4.0
"""The most a raster is enlarged per side for processing (16 times its pixels): a finer ``--resolution`` is
refused before any work (it would only interpolate pixels, at 16+ times the time and temporary disk)."""

_WGS84_A = 6378137.0
_WGS84_E2 = 0.00669437999014


def parse_resolution(value) -> Union[str, float]:
    """``--resolution``: ``"auto"``, ``"native"`` or a processing GSD in metres (> 0).

    Raises:
        InputError: anything else, naming the parameter.
    """
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text in ("auto", "native"):
        return text
    try:
        metres = float(text.rstrip("m"))
    except ValueError:
        raise InputError(f"--resolution must be auto, native or a pixel size in metres (got {value!r})") from None
    if not (math.isfinite(metres) and metres > 0):
        raise InputError(f"--resolution must be a positive number of metres (got {value!r})")
    return metres


def raster_gsd_m(ds, pixel_size: Optional[float] = None) -> Optional[float]:
    """The raster's pixel size in metres (the square root of the pixel's area): ``pixel_size`` when given,
    else from the geotransform and CRS (projected: its linear unit; geographic: degrees at the centre
    latitude), else None (no georeferencing).

    Raises:
        InputError: ``pixel_size`` not a positive number (``--pixel-size``).
    """
    if pixel_size is not None:
        if not (isinstance(pixel_size, (int, float)) and math.isfinite(pixel_size) and pixel_size > 0):
            raise InputError(f"--pixel-size must be a positive number of metres (got {pixel_size!r})")
        return float(pixel_size)
    gt = ds.GetGeoTransform(can_return_null=True)
    srs = ds.GetSpatialRef()
    if gt is None or srs is None:
        return None
    area = abs(gt[1] * gt[5] - gt[2] * gt[4])
    if area <= 0:
        return None
    if srs.IsProjected():
        from core.geo.raster import pixel_size_m

        return pixel_size_m(ds)
    if srs.IsGeographic():
        lat = math.radians(gt[3] + gt[4] * ds.RasterXSize / 2 + gt[5] * ds.RasterYSize / 2)
        w = 1.0 - _WGS84_E2 * math.sin(lat) ** 2
        m_per_deg_lat = math.radians(1.0) * _WGS84_A * (1.0 - _WGS84_E2) / w ** 1.5  # meridional radius
        m_per_deg_lon = math.radians(1.0) * _WGS84_A * math.cos(lat) / math.sqrt(w)  # prime vertical
        unit = srs.GetAngularUnits() / math.radians(1.0)  # degrees per CRS unit (1 for degrees)
        return math.sqrt(area * m_per_deg_lat * m_per_deg_lon) * unit
    return None


@dataclass
class ProcessingGrid:
    """The grid the network runs on: ``width`` x ``height`` pixels over the input's extent, of about
    ``gsd_m`` metres; ``scale`` = input pixels per processing pixel along each axis (> 1: shrunk)."""

    width: int
    height: int
    gsd_m: float
    raster_gsd_m: float
    scale: float

    @property
    def resampling(self) -> str:
        """GDAL's resampling from the input to this grid: average when shrinking, bilinear when enlarging."""
        return "average" if self.scale > 1 else "bilinear"

    def describe(self, W: int, H: int) -> str:
        how = "shrunk" if self.scale > 1 else "enlarged"
        return (f"processing at {self.gsd_m:.3g} m (the raster's pixels are {self.raster_gsd_m:.3g} m): {W} x {H} px "
                f"{how} {max(self.scale, 1 / self.scale):.2f}x to {self.width} x {self.height} px "
                f"({self.resampling}), classes written back on the raster's own grid")


def processing_grid(ds, resolution, model_gsd_m: Optional[float], pixel_size: Optional[float] = None):
    """The grid to process ``ds`` on, or ``(None, why)`` to process its pixels as they are.

    Args:
        resolution: :func:`parse_resolution`'s value. model_gsd_m: the model header's ``gsd_m`` (None:
            unknown). pixel_size: ``--pixel-size`` (metres) for a raster without georeferencing.

    Returns:
        ``(ProcessingGrid or None, a sentence for the log)``.

    Raises:
        InputError: a GSD in metres for a raster whose pixel size is unknown.
    """
    res = parse_resolution(resolution)
    if res == "native":
        return None, "processing the raster's own pixels (--resolution native)"
    raster_m = raster_gsd_m(ds, pixel_size)
    if raster_m is None:
        if res == "auto":
            return None, ("processing the raster's own pixels: it has no georeferencing, so its pixel size is "
                          "unknown (give it with --pixel-size METRES to process at the model's scale)")
        raise InputError(f"--resolution {res:g} needs the raster's pixel size: it has no georeferencing; "
                         "give --pixel-size METRES")
    if res == "auto":
        if not model_gsd_m:
            return None, "processing the raster's own pixels: the model does not record its training GSD"
        ratio = raster_m / float(model_gsd_m)
        if 1 / AUTO_FACTOR <= ratio <= AUTO_FACTOR:
            return None, (f"processing the raster's own pixels ({raster_m:.3g} m, within {AUTO_FACTOR}x of the "
                          f"model's {float(model_gsd_m):.3g} m)")
        target = float(model_gsd_m)
    else:
        target = float(res)
    scale = target / raster_m
    W, H = ds.RasterXSize, ds.RasterYSize
    width, height = max(1, int(round(W / scale))), max(1, int(round(H / scale)))
    if (width, height) == (W, H):
        return None, f"processing the raster's own pixels ({raster_m:.3g} m is the asked-for resolution)"
    if 1.0 / scale > MAX_ENLARGEMENT:
        raise InputError(f"--resolution {target:g} m would enlarge the raster's {raster_m:.3g} m pixels "
                         f"{1.0 / scale:.1f}x per side ({width} x {height} px); the limit is {MAX_ENLARGEMENT:g}x "
                         "per side. Choose a coarser resolution, or native")
    grid = ProcessingGrid(width, height, target, raster_m, W / width)
    return grid, grid.describe(W, H)


def resampled_view(ds, grid: ProcessingGrid):
    """A virtual dataset (GDAL VRT in memory, no copy) of ``ds`` on ``grid``: the same extent, CRS and
    bands, ``grid.width`` x ``grid.height`` pixels, read through ``grid.resampling`` (nodata and mask bands
    are honoured by GDAL's resampling: nodata pixels do not enter an average).

    A paletted raster expanded to RGB (:func:`core.geo.raster.expand_palette`) would have its palette
    *indices* averaged by a resampling VRT (GDAL resamples a source before its colour table is applied):
    it is warped instead (the warper reads the expanded colours at full resolution and averages those),
    or, without georeferencing, read nearest-neighbour (an index is picked, never averaged).
    """
    from osgeo import gdal

    from core.geo.raster import PALETTE_EXPANDED

    if ds.GetMetadataItem(PALETTE_EXPANDED) == "YES":
        if ds.GetGeoTransform(can_return_null=True) is not None:
            return gdal.Warp("", ds, format="VRT", width=grid.width, height=grid.height,
                             resampleAlg=grid.resampling, multithread=False)
        return gdal.Translate("", ds, format="VRT", width=grid.width, height=grid.height, resampleAlg="nearest")
    return gdal.Translate("", ds, format="VRT", width=grid.width, height=grid.height,
                          resampleAlg=grid.resampling)
