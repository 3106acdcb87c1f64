"""Candidate patches of findclass: scoring patches from the relevance map, the review order (alternating
between clusters) and the candidates.gpkg layer that the analyst reviews (status pending/accepted/rejected)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
import numpy as np
from core.errors import InputError
from core.findclass.cells import CellGrid
from core.findclass.params import CELL
from core.findclass.params import CANDIDATES_LAYER, META_LAYER, STATUSES


# -- candidates ------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """A square of ``patch`` px (``pc`` cells) of the raster: ``row``, ``col`` in patches; ``score`` the
    mean relevance of its best quarter of valid cells; ``cluster`` 0-based; ``valid`` share of valid
    cells; ``known`` share of its cells inside example polygons."""

    row: int
    col: int
    score: float
    cluster: int
    valid: float
    known: float = 0.0


class PatchScorer:
    """Collects finished rows of relevance and nearest-cluster cells into patch scores.

    ``add(r0, rel float32 (n, cols) NaN = nodata, cluster int (n, cols))``; patches are scored when
    their last cell row arrives. Memory: one row of patches of cells.
    """

    def __init__(self, grid: CellGrid, patch_cells: int, top_share: float = 0.25):
        self.grid, self.pc, self.top_share = grid, int(patch_cells), top_share
        self.rel = np.zeros((0, grid.cols), np.float32)
        self.clu = np.zeros((0, grid.cols), np.int64)
        self.r_next = 0
        self.patches: List[Patch] = []

    def add(self, r0: int, rel: np.ndarray, cluster: np.ndarray) -> None:
        """Add cell rows from ``r0`` (rows must come in order): relevance float32 (n, cols), NaN = nodata;
        nearest cluster int (n, cols). Raises RuntimeError on rows out of order."""
        if r0 != self.r_next + len(self.rel):
            raise RuntimeError(f"cell rows must come in order: got row {r0}, expected {self.r_next + len(self.rel)}")
        self.rel = np.concatenate([self.rel, rel])
        self.clu = np.concatenate([self.clu, cluster])
        while self.r_next < self.grid.rows:
            end = min(self.r_next + self.pc, self.grid.rows)
            n = end - self.r_next
            if len(self.rel) < n:
                break
            self._score_row(self.r_next // self.pc, self.rel[:n], self.clu[:n])
            self.rel, self.clu = self.rel[n:], self.clu[n:]
            self.r_next = end

    def _score_row(self, prow: int, rel: np.ndarray, clu: np.ndarray) -> None:
        for pcol, c0 in enumerate(range(0, self.grid.cols, self.pc)):
            r = rel[:, c0:c0 + self.pc].ravel()
            k = clu[:, c0:c0 + self.pc].ravel()
            ok = np.isfinite(r)
            if not ok.any():
                continue
            r, k = r[ok], k[ok]
            n_top = max(1, int(math.ceil(self.top_share * len(r))))
            top = np.argpartition(-r, n_top - 1)[:n_top]
            score = float(r[top].mean())
            cluster = int(np.bincount(k[top]).argmax())
            self.patches.append(Patch(prow, pcol, score, cluster, float(ok.mean())))


def order_candidates(patches: Sequence[Patch], top_n: int, threshold: Optional[float] = None) -> List[Patch]:
    """The review list, ``top_n`` long.

    First the patches scoring at or above ``threshold`` (all of them when it is None), the clusters taken
    in turn — each cluster's patches by descending score, the clusters ordered by their best patch — so
    that every mode of the class is shown early; a cluster leaves the rotation when its patches above
    the threshold are used up (a weak cluster does not push patches below the threshold up the list).
    Then the remaining patches by descending score.
    """
    ranked = sorted(patches, key=lambda p: (-p.score, p.row, p.col))
    above = [p for p in ranked if threshold is None or p.score >= threshold]
    rest = [p for p in ranked if not (threshold is None or p.score >= threshold)]
    queues: Dict[int, List[Patch]] = {}
    for p in above:
        queues.setdefault(p.cluster, []).append(p)
    order = sorted(queues, key=lambda c: -queues[c][0].score)
    out: List[Patch] = []
    pos = {c: 0 for c in order}
    while len(out) < top_n and any(pos[c] < len(queues[c]) for c in order):
        for c in order:
            if pos[c] < len(queues[c]) and len(out) < top_n:
                out.append(queues[c][pos[c]])
                pos[c] += 1
    out.extend(rest[:max(0, top_n - len(out))])
    return out


def _patch_ring(pt: Patch, grid: CellGrid, pc: int, gt) -> List[Tuple[float, float]]:
    from osgeo import gdal

    x0 = pt.col * pc * CELL
    y0 = pt.row * pc * CELL
    x1 = min(x0 + pc * CELL, grid.width)
    y1 = min(y0 + pc * CELL, grid.height)
    g = gt or (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return [tuple(gdal.ApplyGeoTransform(g, x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]


def write_candidates(path: str, ranked: Sequence[Patch], grid: CellGrid, pc: int, gt, srs, meta: dict,
                     name=None) -> List[dict]:
    """The candidate polygons (GeoPackage layer ``candidates``, fields rank, score, cluster 1-based, status
    ``pending``) at ``path`` (a new file), plus a one-row table ``srmf_findclass`` holding ``meta`` (the
    run's parameters, threshold and centroids, JSON) for the hand-off.

    Args:
        ranked: the review order. grid: the raster's cell grid; pc: patch size in cells. gt, srs: the
            raster's geotransform (None: pixel coordinates) and CRS (or None).

        name: the file to name in messages (``path`` is a partial file that becomes it).

    Returns:
        One dict per candidate: rank, score, cluster, patch_row/col, pixel_x/y, bounds (CRS units).

    Raises:
        WriteError / InputError: the GeoPackage cannot be written (a full disk), naming ``name``.
    """
    from osgeo import ogr

    from core.geo.failures import checked_close, writing

    with writing(name or path):
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(path)
        rows = _fill_candidates(ds, ranked, grid, pc, gt, srs, meta)
    with checked_close(name or path):
        ds = None
    return rows


def _fill_candidates(ds, ranked: Sequence[Patch], grid: CellGrid, pc: int, gt, srs, meta: dict) -> List[dict]:
    """The layers of :func:`write_candidates` in the open GeoPackage ``ds``; returns the rows."""
    from osgeo import ogr

    lyr = ds.CreateLayer(CANDIDATES_LAYER, srs=srs, geom_type=ogr.wkbPolygon)
    for name, typ in (("rank", ogr.OFTInteger), ("score", ogr.OFTReal), ("cluster", ogr.OFTInteger),
                      ("status", ogr.OFTString)):
        lyr.CreateField(ogr.FieldDefn(name, typ))
    rows = []
    lyr.StartTransaction()
    for rank, pt in enumerate(ranked, 1):
        ring = ogr.Geometry(ogr.wkbLinearRing)
        pts = _patch_ring(pt, grid, pc, gt)
        for x, y in pts:
            ring.AddPoint_2D(x, y)
        poly = ogr.Geometry(ogr.wkbPolygon)
        poly.AddGeometry(ring)
        f = ogr.Feature(lyr.GetLayerDefn())
        f.SetField("rank", rank)
        f.SetField("score", round(float(pt.score), 6))
        f.SetField("cluster", int(pt.cluster) + 1)
        f.SetField("status", "pending")
        f.SetGeometry(poly)
        lyr.CreateFeature(f)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        rows.append({"rank": rank, "score": round(float(pt.score), 6), "cluster": int(pt.cluster) + 1,
                     "patch_row": pt.row, "patch_col": pt.col, "pixel_x": pt.col * pc * CELL,
                     "pixel_y": pt.row * pc * CELL, "bounds": [min(xs), min(ys), max(xs), max(ys)]})
    lyr.CommitTransaction()
    mlyr = ds.CreateLayer(META_LAYER, geom_type=ogr.wkbNone)
    mlyr.CreateField(ogr.FieldDefn("meta", ogr.OFTString))
    f = ogr.Feature(mlyr.GetLayerDefn())
    f.SetField("meta", json.dumps(meta))
    mlyr.CreateFeature(f)
    return rows


# -- hand-off to fine-tuning -----------------------------------------------------------------------------
def read_candidates(path) -> Tuple[dict, List[dict]]:
    """The run's metadata and the candidate rows ``{"fid", "rank", "score", "cluster", "status", "wkt"}``
    of a ``candidates.gpkg``.

    Raises:
        InputError: the file is missing, not a findclass GeoPackage, or a status is not
            pending/accepted/rejected (the message lists the offending ranks).
    """
    from osgeo import gdal

    p = Path(path)
    if not p.is_file():
        raise InputError(f"Candidate layer not found: {p}")
    try:
        ds = gdal.OpenEx(str(p), gdal.OF_VECTOR | gdal.OF_READONLY)
    except RuntimeError as exc:
        raise InputError(f"{p} is not a GeoPackage OGR can read ({exc})") from exc
    lyr = ds.GetLayerByName(CANDIDATES_LAYER)
    mlyr = ds.GetLayerByName(META_LAYER)
    if lyr is None or mlyr is None:
        raise InputError(f"{p} is not a findclass output (no '{CANDIDATES_LAYER}' and '{META_LAYER}' layers)")
    mf = mlyr.GetNextFeature()
    meta = json.loads(mf.GetField("meta"))
    rows, bad = [], []
    for f in lyr:
        status = (f.GetField("status") or "").strip().lower()
        if status not in STATUSES:
            bad.append((f.GetField("rank"), f.GetField("status")))
        g = f.GetGeometryRef()
        rows.append({"fid": f.GetFID(), "rank": f.GetField("rank"), "score": f.GetField("score"),
                     "cluster": f.GetField("cluster"), "status": status,
                     "wkt": None if g is None else g.ExportToWkt()})
    srs = lyr.GetSpatialRef()
    meta["_srs_wkt"] = None if srs is None else srs.ExportToWkt()
    lyr = mlyr = None
    ds = None
    if bad:
        raise InputError(f"{p}: status must be pending, accepted or rejected; ranks "
                         + ", ".join(f"{r} ({s!r})" for r, s in bad[:20]))
    return meta, rows
