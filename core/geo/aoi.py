"""Area of interest (issue 15, part 1): segment only a part of a raster, as Deepness's "from polygon" and
ArcGIS's processing extent and mask do.

``--extent xmin,ymin,xmax,ymax[,CRS]`` (the CRS as ``EPSG:n`` or anything GDAL reads; default: the
raster's) and ``--mask POLYGONS`` (any OGR layer, any CRS; ``file|layername=NAME``) give the area. The job
then runs on a virtual subset of the raster (GDAL VRT, no copy): the pixel window that covers the area's
bounding box (the extent, intersected with the mask's polygons when both are given), on the raster's own
pixel grid — so only windows that touch it are read and run, and the outputs cover that box, aligned with
the input (same CRS, same pixel size and phase). With a mask, pixels outside its polygons are nodata (255)
and windows that hold none of the polygons' pixels are skipped. An extent or mask in another CRS is
reprojected (its corners and edges densified, ``OCTTransformBounds``; polygons feature by feature).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from osgeo import gdal, ogr, osr

from core.errors import InputError
from core.geo.vector import traditional as _traditional

gdal.UseExceptions()
ogr.UseExceptions()
osr.UseExceptions()


def parse_extent(text) -> Tuple[Tuple[float, float, float, float], Optional[str]]:
    """``"xmin,ymin,xmax,ymax[,CRS]"`` (QGIS writes ``xmin,xmax,ymin,ymax [EPSG:n]`` — also accepted when the
    CRS is given in brackets) → ``((xmin, ymin, xmax, ymax), CRS text or None)``.

    Raises:
        InputError: not four numbers, or an empty box (min ≥ max), naming ``--extent``.
    """
    raw = str(text).strip()
    crs = None
    qgis_order = False
    if raw.endswith("]") and "[" in raw:  # QGIS's processing extent string: "xmin,xmax,ymin,ymax [EPSG:4326]"
        raw, crs = raw[:raw.rindex("[")].strip(), raw[raw.rindex("[") + 1:-1].strip()
        qgis_order = True
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) == 5 and not qgis_order:
        parts, crs = parts[:4], parts[4]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise InputError(f"--extent must be xmin,ymin,xmax,ymax[,CRS] (got {text!r})")
    xmin, ymin, xmax, ymax = (vals[0], vals[2], vals[1], vals[3]) if qgis_order else vals
    if not (xmin < xmax and ymin < ymax):
        raise InputError(f"--extent is empty: xmin must be below xmax and ymin below ymax (got {text!r})")
    return (xmin, ymin, xmax, ymax), crs or None


@dataclass
class AreaOfInterest:
    """The pixel window ``(x0, y0, width, height)`` of the raster that covers the area, and the mask's
    polygons in the raster's CRS (an in-memory OGR layer, or None). ``source``: what was asked, for logs."""

    window: Tuple[int, int, int, int]
    mask_ds: Optional[object]
    source: str

    @property
    def mask_layer(self):
        return None if self.mask_ds is None else self.mask_ds.GetLayer(0)

    def describe(self, W: int, H: int) -> str:
        x0, y0, w, h = self.window
        share = 100.0 * w * h / max(1, W * H)
        return (f"area of interest ({self.source}): pixels {x0}..{x0 + w - 1} x {y0}..{y0 + h - 1}, {w} x {h} px "
                f"({share:.1f} % of the raster)" + ("; outside the mask's polygons is nodata" if self.mask_ds else ""))

    def subset(self, ds):
        """A virtual dataset of ``ds`` over :attr:`window` (no copy, no resampling: the input's own grid);
        the metadata of ``ds`` (e.g. that its colours come from a palette) is kept."""
        x0, y0, w, h = self.window
        sub = gdal.Translate("", ds, format="VRT", srcWin=[x0, y0, w, h])
        for key, value in (ds.GetMetadata() or {}).items():
            sub.SetMetadataItem(key, value)
        return sub

    def masked(self, reader, grid_ds):
        """``reader`` (a strip reader of a raster on ``grid_ds``'s grid) with the pixels outside the mask's
        polygons made invalid; ``reader`` itself without a mask."""
        return reader if self.mask_ds is None else _MaskedReader(reader, self.mask_layer, grid_ds)


class _MaskedReader:
    """A strip reader whose validity is also the mask's polygons, rasterised strip by strip (pixel centres
    inside, GDAL's rasteriser) on the grid of ``grid_ds``."""

    def __init__(self, reader, layer, grid_ds):
        self.reader, self.layer = reader, layer
        self.masked = True
        self.width, self.height = grid_ds.RasterXSize, grid_ds.RasterYSize
        self.gt = grid_ds.GetGeoTransform()
        self.srs = grid_ds.GetSpatialRef()

    def inside(self, y0: int, rows: int) -> np.ndarray:
        """bool (rows, width): pixels of rows ``y0..`` inside a mask polygon."""
        gt = self.gt
        mem = gdal.GetDriverByName("MEM").Create("", self.width, rows, 1, gdal.GDT_Byte)
        mem.SetGeoTransform((gt[0] + y0 * gt[2], gt[1], gt[2], gt[3] + y0 * gt[5], gt[4], gt[5]))
        if self.srs is not None:
            mem.SetSpatialRef(self.srs)
        xs = [gt[0] + c * gt[1] + r * gt[2] for c in (0, self.width) for r in (y0, y0 + rows)]
        ys = [gt[3] + c * gt[4] + r * gt[5] for c in (0, self.width) for r in (y0, y0 + rows)]
        self.layer.SetSpatialFilterRect(min(xs), min(ys), max(xs), max(ys))  # only the strip's polygons
        try:
            gdal.RasterizeLayer(mem, [1], self.layer, burn_values=[1])
        finally:
            self.layer.SetSpatialFilter(None)
        band = mem.GetRasterBand(1)
        out = band.ReadAsArray() > 0
        band = mem = None
        return out

    def read(self, y0: int, rows: int):
        data, valid = self.reader.read(y0, rows)
        inside = self.inside(y0, min(rows, self.height - y0))
        return data, inside if valid is None else (valid & inside)


def area_of_interest(ds, path, extent=None, mask=None, log=None) -> Optional[AreaOfInterest]:
    """The area of interest of ``ds`` (opened from ``path``) from ``--extent`` and ``--mask``, or None when
    neither is given.

    Raises:
        InputError: a raster without georeferencing, an extent or mask in no CRS GDAL knows, a mask with no
            polygon, an area that does not overlap the raster (both extents named).
    """
    if extent is None and mask is None:
        return None
    gt = ds.GetGeoTransform(can_return_null=True)
    if gt is None:
        raise InputError(f"{path} has no georeferencing, so --extent/--mask cannot be placed on it")
    dst = _traditional(ds.GetSpatialRef())
    boxes, source = [], []
    mask_ds = None
    if extent is not None:
        (xmin, ymin, xmax, ymax), crs = parse_extent(extent)
        boxes.append(_to_raster_crs((xmin, ymin, xmax, ymax), crs, dst, "--extent"))
        source.append(f"extent {xmin:.10g},{ymin:.10g},{xmax:.10g},{ymax:.10g}" + (f" {crs}" if crs else ""))
    if mask is not None:
        mask_ds, box = _mask_polygons(mask, dst, log)
        boxes.append(box)
        source.append(f"mask {mask}")
    box = (max(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), min(b[3] for b in boxes))
    window = _pixel_window(box, gt, ds.RasterXSize, ds.RasterYSize)
    if window is None:
        raise InputError(f"The area of interest ({'; '.join(source)}; in the raster's CRS "
                         f"{tuple(round(v, 6) for v in box)}) does not overlap {path} (its extent "
                         f"{_extent(gt, ds.RasterXSize, ds.RasterYSize)}); check the coordinates and their CRS")
    return AreaOfInterest(window, mask_ds, "; ".join(source))


def _to_raster_crs(box, crs: Optional[str], dst, what: str):
    """``box`` (xmin, ymin, xmax, ymax) in ``crs`` (None: the raster's) → the raster's CRS (bounds of the
    transformed box, edges densified)."""
    if crs is None or dst is None:
        return box
    src = osr.SpatialReference()
    try:
        src.SetFromUserInput(crs)
    except RuntimeError:
        raise InputError(f"{what}: {crs!r} is not a CRS GDAL knows (e.g. EPSG:4326)") from None
    src.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    if src.IsSame(dst):
        return box
    ct = osr.CoordinateTransformation(src, dst)
    try:
        return tuple(ct.TransformBounds(box[0], box[1], box[2], box[3], 21))
    except RuntimeError as exc:
        raise InputError(f"{what}: cannot be reprojected from {crs} to the raster's CRS ({exc})") from None


def _mask_polygons(mask, dst, log):
    """The mask's polygons in the raster's CRS (an in-memory layer, repaired where invalid) and their
    bounding box. Raises InputError: no polygon."""
    from core.geo.failures import reading
    from core.geo.vector import GeometryRepairs, open_layer, reprojected

    vds, lyr = open_layer(mask, what="Mask layer")
    src = _traditional(lyr.GetSpatialRef())
    ct = osr.CoordinateTransformation(src, dst) if src is not None and dst is not None and not src.IsSame(dst) else None
    mem = ogr.GetDriverByName("Memory").CreateDataSource("srmf_mask")
    out = mem.CreateLayer("mask", srs=dst, geom_type=ogr.wkbMultiPolygon)
    repairs = GeometryRepairs(mask)
    with reading(mask, "mask layer"):
        for feat in lyr:
            geom = feat.GetGeometryRef()
            if geom is None or geom.IsEmpty() or ogr.GT_Flatten(geom.GetGeometryType()) not in (
                    ogr.wkbPolygon, ogr.wkbMultiPolygon):
                continue
            geom = repairs.fix(geom, feat.GetFID())
            if geom is None:
                continue
            f = ogr.Feature(out.GetLayerDefn())
            f.SetGeometry(reprojected(geom, ct, mask, feat.GetFID(), "the raster's CRS"))
            out.CreateFeature(f)
    repairs.check()
    if repairs.message() and log:
        log(repairs.message(), "warning")
    if out.GetFeatureCount() == 0:
        raise InputError(f"{mask}: the mask layer holds no polygon")
    xmin, xmax, ymin, ymax = out.GetExtent()
    vds = None
    return mem, (xmin, ymin, xmax, ymax)


def _pixel_window(box, gt, W: int, H: int) -> Optional[Tuple[int, int, int, int]]:
    """The pixel window ``(x0, y0, w, h)`` of the raster covering ``box`` (in its CRS), clipped to it; None
    when they do not overlap."""
    inv = gdal.InvGeoTransform(gt)
    pts = [gdal.ApplyGeoTransform(inv, x, y) for x in (box[0], box[2]) for y in (box[1], box[3])]
    cs, rs = [p[0] for p in pts], [p[1] for p in pts]
    eps = 1e-9
    x0, x1 = max(0, int(math.floor(min(cs) + eps))), min(W, int(math.ceil(max(cs) - eps)))
    y0, y1 = max(0, int(math.floor(min(rs) + eps))), min(H, int(math.ceil(max(rs) - eps)))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def _extent(gt, W: int, H: int) -> List[float]:
    xs = [gt[0] + c * gt[1] + r * gt[2] for c in (0, W) for r in (0, H)]
    ys = [gt[3] + c * gt[4] + r * gt[5] for c in (0, W) for r in (0, H)]
    return [round(min(xs), 6), round(min(ys), 6), round(max(xs), 6), round(max(ys), 6)]
