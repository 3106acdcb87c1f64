"""The analyst's example polygons of a new class (any CRS, optional negative field), reprojected to the raster
and turned into support cells."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple
import numpy as np
from core.errors import InputError
from core.findclass.cells import CellGrid
from core.geo.vector import find_field
_NEGATIVE_TRUE = {"1", "true", "t", "yes", "y", "negative", "neg"}


# -- example polygons ------------------------------------------------------------------------------------
@dataclass
class ExamplePolygon:
    """One example feature on the cell grid.

    Attributes:
        fid: the feature id in the layer. negative: a negative example.
        cells: int64 (n, 2) support cells (row, col): eroded by one cell, capped, at least one.
        covered: int64 (m, 2) every cell whose centre is inside the polygon (for excluding known patches).
        note: what happened (too small to erode, capped...), or "".
    """

    fid: int
    negative: bool
    cells: np.ndarray
    covered: np.ndarray
    note: str = ""


def is_negative(value) -> bool:
    """A negative-field value that marks a negative example: a true bool, a non-zero number, or one of
    ``1 true t yes y negative neg`` (any case); None is not."""
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) != 0.0
    return str(value).strip().lower() in _NEGATIVE_TRUE


def read_examples(vector, ds, grid: CellGrid, *, layer=None, negative_field: Optional[str] = None,
                  max_per_polygon: int = 400, seed: int = 0, raster_name: str = "raster",
                  reporter=None) -> Tuple[List[ExamplePolygon], dict]:
    """Rasterise example polygons on the cell grid of ``ds`` (GDAL dataset) and sample their support.

    Each feature is reprojected to the raster's CRS when the layer's CRS differs (a layer without CRS is
    taken to be in the raster's CRS), rasterised on the stride-4 grid over its own bounding box (a cell
    is in when its centre is; ALL_TOUCHED for polygons smaller than a cell), eroded by one cell (3 × 3;
    kept as is when erosion would empty it) and capped at ``max_per_polygon`` cells (seeded random
    subset). Features outside the raster are skipped with a warning.

    Returns:
        ``(polygons, info)`` with info ``{"features", "positive", "negative", "outside", "reprojected",
        "layer", "support_cells", "capped"}``.

    Raises:
        InputError: missing file/layer; an empty layer; ``negative_field`` not a field (the message lists
            the fields); no positive example; every polygon outside the raster.
    """
    from osgeo import gdal

    from core.geo.failures import reading
    from core.geo.vector import GeometryRepairs, reprojected

    if max_per_polygon < 1:
        raise InputError(f"--max-per-polygon must be at least 1 (got {max_per_polygon})")
    vds, lyr, negative_field, dst, ct, info = _open_examples(vector, layer, negative_field, ds)
    gt = ds.GetGeoTransform(can_return_null=True) or (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    cgt = grid.geotransform(gt)
    inv = gdal.InvGeoTransform(cgt)
    rng = np.random.default_rng(seed)
    polygons: List[ExamplePolygon] = []
    repairs = GeometryRepairs(vector)
    lyr.ResetReading()
    with reading(vector, "example layer"):
        for feat in lyr:
            geom = feat.GetGeometryRef()
            if geom is None or geom.IsEmpty():
                info["no_geometry"] += 1
                continue
            geom = repairs.fix(geom, feat.GetFID())
            if geom is None:
                continue
            g = reprojected(geom, ct, vector, feat.GetFID(), f"the CRS of {raster_name}")
            negative = False
            if negative_field:
                idx = feat.GetFieldIndex(negative_field)
                negative = feat.IsFieldSetAndNotNull(idx) and is_negative(feat.GetField(idx))
            mask, r0, c0 = _polygon_mask(g, grid, cgt, inv, dst)
            if mask is None:
                info["outside"].append(int(feat.GetFID()))
                continue
            cells, covered, note, capped = _support_cells(mask, r0, c0, max_per_polygon, rng)
            info["capped"] += capped
            polygons.append(ExamplePolygon(int(feat.GetFID()), bool(negative), cells, covered, note))
            info["negative" if negative else "positive"] += 1
            info["support_cells"] += len(cells)
    vds = None
    repairs.check()
    if repairs.summary():
        info["invalid_geometries"] = repairs.summary()
        if reporter is not None:
            reporter.warning(repairs.message())
    _check_examples(polygons, info, vector, ds, gt, ct is not None, negative_field, raster_name, reporter)
    return polygons, info


def _open_examples(vector, layer, negative_field: Optional[str], ds):
    """The example layer, its negative field (as the layer spells it), the raster's CRS, the transform
    to it (None: same CRS or none) and the run's counters: ``(vds, lyr, negative_field, dst, ct, info)``."""
    from osgeo import osr

    from core.geo.vector import open_layer, traditional

    vds, lyr = open_layer(vector, layer)
    n_features = lyr.GetFeatureCount()
    if n_features == 0:
        raise InputError(f"{vector}: layer {lyr.GetName()!r} has no example polygons (it is empty)")
    if negative_field:
        negative_field = find_field(lyr, negative_field, vector, " (--negative-field)")
    dst = traditional(ds.GetSpatialRef())
    src = traditional(lyr.GetSpatialRef())
    ct = None
    info = {"layer": lyr.GetName(), "features": n_features, "positive": 0, "negative": 0, "outside": [],
            "reprojected": False, "support_cells": 0, "capped": 0, "no_geometry": 0}
    if src is not None and dst is not None and not src.IsSame(dst):
        ct = osr.CoordinateTransformation(src, dst)
        info["reprojected"] = True
    return vds, lyr, negative_field, dst, ct, info


def _polygon_mask(g, grid: CellGrid, cgt, inv, dst) -> Tuple[Optional[np.ndarray], int, int]:
    """The cells of geometry ``g`` (in the raster's CRS) over its bounding box on the cell grid: a cell is
    in when its centre is, or (when that leaves none) when the polygon touches it.

    Returns:
        ``(mask bool (rows, cols) or None when the polygon covers no cell, r0, c0)``: the box's first cell.
    """
    from osgeo import gdal, ogr

    minx, maxx, miny, maxy = g.GetEnvelope()
    corners = [gdal.ApplyGeoTransform(inv, x, y) for x in (minx, maxx) for y in (miny, maxy)]
    cs = [p[0] for p in corners]
    rs = [p[1] for p in corners]
    c0, c1 = max(0, int(math.floor(min(cs))) - 1), min(grid.cols, int(math.ceil(max(cs))) + 1)
    r0, r1 = max(0, int(math.floor(min(rs))) - 1), min(grid.rows, int(math.ceil(max(rs))) + 1)
    if not (c1 > c0 and r1 > r0):
        return None, r0, c0
    mem_drv = gdal.GetDriverByName("MEM")
    ogr_drv = ogr.GetDriverByName("Memory")
    for all_touched in (False, True):
        mds = mem_drv.Create("", c1 - c0, r1 - r0, 1, gdal.GDT_Byte)
        ox, oy = gdal.ApplyGeoTransform(cgt, c0, r0)
        mds.SetGeoTransform((ox, cgt[1], cgt[2], oy, cgt[4], cgt[5]))
        if dst is not None:
            mds.SetSpatialRef(dst)
        vsrc = ogr_drv.CreateDataSource("srmf_example")
        vl = vsrc.CreateLayer("example", srs=dst, geom_type=ogr.wkbUnknown)
        of = ogr.Feature(vl.GetLayerDefn())
        of.SetGeometry(g)
        vl.CreateFeature(of)
        gdal.RasterizeLayer(mds, [1], vl, burn_values=[1], options=["ALL_TOUCHED=TRUE"] if all_touched else [])
        band = mds.GetRasterBand(1)
        m = band.ReadAsArray().astype(bool)
        band = None
        mds = None
        vsrc = None
        if m.any():
            return m, r0, c0
    return None, r0, c0


def _support_cells(mask: np.ndarray, r0: int, c0: int, max_per_polygon: int, rng):
    """A polygon's support: its mask eroded by one cell (kept whole when erosion would empty it), capped
    at ``max_per_polygon`` cells (a seeded random subset, in order).

    Returns:
        ``(cells int64 (n, 2), covered int64 (m, 2) every cell of the mask, note, capped)`` in grid cells.
    """
    from scipy import ndimage

    note = ""
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    if not eroded.any():
        eroded = mask
        note = "too small to erode by one cell: all its cells are used"
    rr, cc = np.nonzero(eroded)
    cells = np.stack([rr + r0, cc + c0], 1).astype(np.int64)
    capped = False
    if len(cells) > max_per_polygon:
        pick = np.sort(rng.choice(len(cells), max_per_polygon, replace=False))
        cells = cells[pick]
        capped = True
        note = (note + "; " if note else "") + f"capped at {max_per_polygon} of {len(rr)} cells"
    ar, ac = np.nonzero(mask)
    covered = np.stack([ar + r0, ac + c0], 1).astype(np.int64)
    return cells, covered, note, capped


def _check_examples(polygons, info: dict, vector, ds, gt, reprojected: bool, negative_field, raster_name: str,
                    rep) -> None:
    """Warn of the polygons outside the raster; raise when none is on it or all are negative."""
    if info["outside"] and rep is not None:
        rep.warning(f"{vector}: {len(info['outside'])} example polygon(s) fall outside {raster_name} and are "
                    f"skipped (feature ids {', '.join(map(str, info['outside'][:20]))})")
    if not polygons:
        W, H = ds.RasterXSize, ds.RasterYSize
        rext = (gt[0], gt[0] + gt[1] * W, gt[3] + gt[5] * H, gt[3])
        raise InputError(f"{vector}: none of the {info['features']} example polygon(s) falls on {raster_name} "
                         f"(raster extent {tuple(round(v, 6) for v in rext)} in its CRS"
                         f"{', polygons reprojected to it' if reprojected else ''}); check the layer's CRS")
    if not any(not p.negative for p in polygons):
        raise InputError(f"{vector}: every example polygon on {raster_name} is a negative example "
                         f"(--negative-field {negative_field}); give at least one positive example")
