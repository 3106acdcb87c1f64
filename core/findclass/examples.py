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


def _is_negative(value) -> bool:
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
    from osgeo import gdal, ogr, osr
    from scipy import ndimage

    from core.geo.vector import reprojected
    from core.geo.vector import open_layer, traditional

    if max_per_polygon < 1:
        raise InputError(f"--max-per-polygon must be at least 1 (got {max_per_polygon})")
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
    gt = ds.GetGeoTransform(can_return_null=True) or (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    cgt = grid.geotransform(gt)
    inv = gdal.InvGeoTransform(cgt)
    rng = np.random.default_rng(seed)
    mem_drv = gdal.GetDriverByName("MEM")
    ogr_drv = ogr.GetDriverByName("Memory")
    polygons: List[ExamplePolygon] = []
    lyr.ResetReading()
    for feat in lyr:
        geom = feat.GetGeometryRef()
        if geom is None or geom.IsEmpty():
            info["no_geometry"] += 1
            continue
        g = reprojected(geom, ct, vector, feat.GetFID(), f"the CRS of {raster_name}")
        negative = False
        if negative_field:
            idx = feat.GetFieldIndex(negative_field)
            negative = feat.IsFieldSetAndNotNull(idx) and _is_negative(feat.GetField(idx))
        minx, maxx, miny, maxy = g.GetEnvelope()
        corners = [gdal.ApplyGeoTransform(inv, x, y) for x in (minx, maxx) for y in (miny, maxy)]
        cs = [p[0] for p in corners]
        rs = [p[1] for p in corners]
        c0, c1 = max(0, int(math.floor(min(cs))) - 1), min(grid.cols, int(math.ceil(max(cs))) + 1)
        r0, r1 = max(0, int(math.floor(min(rs))) - 1), min(grid.rows, int(math.ceil(max(rs))) + 1)
        mask = None
        if c1 > c0 and r1 > r0:
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
                gdal.RasterizeLayer(mds, [1], vl, burn_values=[1],
                                    options=["ALL_TOUCHED=TRUE"] if all_touched else [])
                band = mds.GetRasterBand(1)
                m = band.ReadAsArray().astype(bool)
                band = None
                mds = None
                vsrc = None
                if m.any():
                    mask = m
                    break
        if mask is None:
            info["outside"].append(int(feat.GetFID()))
            continue
        note = ""
        eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
        if not eroded.any():
            eroded = mask
            note = "too small to erode by one cell: all its cells are used"
        rr, cc = np.nonzero(eroded)
        cells = np.stack([rr + r0, cc + c0], 1).astype(np.int64)
        if len(cells) > max_per_polygon:
            pick = np.sort(rng.choice(len(cells), max_per_polygon, replace=False))
            cells = cells[pick]
            info["capped"] += 1
            note = (note + "; " if note else "") + f"capped at {max_per_polygon} of {len(rr)} cells"
        ar, ac = np.nonzero(mask)
        covered = np.stack([ar + r0, ac + c0], 1).astype(np.int64)
        polygons.append(ExamplePolygon(int(feat.GetFID()), bool(negative), cells, covered, note))
        info["negative" if negative else "positive"] += 1
        info["support_cells"] += len(cells)
    vds = None
    rep = reporter
    if info["outside"] and rep is not None:
        rep.warning(f"{vector}: {len(info['outside'])} example polygon(s) fall outside {raster_name} and are "
                    f"skipped (feature ids {', '.join(map(str, info['outside'][:20]))})")
    if not polygons:
        W, H = ds.RasterXSize, ds.RasterYSize
        rext = (gt[0], gt[0] + gt[1] * W, gt[3] + gt[5] * H, gt[3])
        raise InputError(f"{vector}: none of the {n_features} example polygon(s) falls on {raster_name} "
                         f"(raster extent {tuple(round(v, 6) for v in rext)} in its CRS"
                         f"{', polygons reprojected to it' if ct is not None else ''}); check the layer's CRS")
    if not any(not p.negative for p in polygons):
        raise InputError(f"{vector}: every example polygon on {raster_name} is a negative example "
                         f"(--negative-field {negative_field}); give at least one positive example")
    return polygons, info
