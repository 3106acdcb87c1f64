"""Map-ready class polygons (issue 16, part 3): ``segment --polygons PATH [--min-area M2 | --min-pixels N]
[--simplify PIXELS]``.

The class raster is vectorised with GDAL: first GDAL's sieve filter (``GDALSieveFilter``, as
``gdal_sieve.py``: 4-connected regions smaller than the minimum mapping unit are merged into their largest
neighbour; nodata stays nodata, through the band's mask), then ``GDALPolygonize`` with the same
4-connectedness. A region the sieve cannot merge — one enclosed by nodata, with no classified neighbour —
is dropped (counted in the log), so no polygon is smaller than the unit. Every polygon gets ``class_id``, ``class_name``
and ``area_m2`` (the polygon's area in the CRS's linear unit squared, converted to m²; null in a geographic
CRS, with a note). Adjacent polygons share their edges exactly (pixel edges: no gaps, no overlaps). The
GeoPackage is written under a temporary name and renamed when complete.

With ``--simplify PIXELS`` the polygons are then simplified as a coverage (:func:`simplify_coverage`: GEOS's
coverage simplification through shapely; Debian 12's GEOS 3.11 has none, shapely's wheels bundle GEOS 3.13):
the stair-steps go, shared edges stay shared, the outline of the classified area stays where it is.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from osgeo import gdal, ogr

from core.errors import InputError

gdal.UseExceptions()
ogr.UseExceptions()

LAYER = "class_polygons"


def min_pixels(ds, min_area_m2: Optional[float], min_pixels_: Optional[int], simplify: Optional[float] = None) -> int:
    """The sieve threshold in pixels: ``min_pixels_``, or ``min_area_m2`` over the pixel's area (rounded up);
    0 = no sieve. ``simplify`` (pixels) is checked here too, so that a bad value fails before any work.

    Raises:
        InputError: both given, a negative value, or an area in m² for a raster whose pixel area in metres
            is unknown (geographic CRS or no georeferencing), naming the parameter.
    """
    if simplify is not None and not (math.isfinite(simplify) and simplify >= 0):
        raise InputError(f"--simplify must be 0 or more pixels (got {simplify})")
    if min_area_m2 is not None and min_pixels_ is not None:
        raise InputError("give --min-area or --min-pixels, not both")
    if min_pixels_ is not None:
        if min_pixels_ < 0:
            raise InputError(f"--min-pixels must be 0 or more (got {min_pixels_})")
        return int(min_pixels_)
    if min_area_m2 is None:
        return 0
    if not (math.isfinite(min_area_m2) and min_area_m2 >= 0):
        raise InputError(f"--min-area must be 0 or more square metres (got {min_area_m2})")
    px = pixel_area_m2(ds)
    if px is None:
        raise InputError("--min-area needs a raster in a projected CRS (its pixels' area in m²); give --min-pixels")
    return int(math.ceil(min_area_m2 / px - 1e-9))


def pixel_area_m2(ds) -> Optional[float]:
    """The area of one pixel in m² (projected CRS), or None."""
    from core.geo.raster import pixel_size_m

    side = pixel_size_m(ds)
    return None if side is None else side * side


def write_class_polygons(class_raster, out_path, classes: Sequence[dict], threshold: int, rep=None,
                         simplify: Optional[float] = None) -> dict:
    """Sieve (``threshold`` pixels, 0 = none) and polygonise the class raster ``class_raster`` (uint8, 255 =
    nodata) into the GeoPackage ``out_path`` (layer :data:`LAYER`); with ``simplify`` (pixels, > 0), simplify
    the polygons as a coverage (:func:`simplify_coverage`).

    Returns:
        ``{"polygons": path, "features": n, "min_pixels": threshold, "simplify_pixels": simplify or 0,
        "area_note": str or None}``.

    Raises:
        WriteError / InputError: the GeoPackage cannot be written (named).
    """
    from core.files import atomic_output
    from core.geo.failures import checked_close, writing

    src = gdal.Open(str(class_raster))
    band = src.GetRasterBand(1)
    if threshold > 1:
        mem = gdal.GetDriverByName("MEM").Create("", src.RasterXSize, src.RasterYSize, 1, gdal.GDT_Byte)
        mem.SetGeoTransform(src.GetGeoTransform())
        mem.SetSpatialRef(src.GetSpatialRef())
        sieved = mem.GetRasterBand(1)
        sieved.SetNoDataValue(255)
        gdal.SieveFilter(band, band.GetMaskBand(), sieved, int(threshold), 4)
        band = sieved
    names = {int(c["id"]): str(c["name"]) for c in classes}
    px_m2 = pixel_area_m2(src)
    unit2 = None if px_m2 is None else px_m2 / _pixel_area(src)  # m² per CRS unit² (ground-scaled)
    out = Path(out_path)
    with atomic_output(out, create=False) as tmp, writing(out):
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp))
        lyr = ds.CreateLayer(LAYER, srs=src.GetSpatialRef(), geom_type=ogr.wkbPolygon)
        for name, kind in (("class_id", ogr.OFTInteger), ("class_name", ogr.OFTString), ("area_m2", ogr.OFTReal)):
            lyr.CreateField(ogr.FieldDefn(name, kind))
        lyr.StartTransaction()
        gdal.Polygonize(band, band.GetMaskBand(), lyr, 0, [], callback=None)
        lyr.CommitTransaction()
        n, dropped = _fill_fields(lyr, names, unit2, threshold * _pixel_area(src))
        simplified = bool(simplify) and simplify_coverage(lyr, simplify * math.sqrt(_pixel_area(src)), unit2)
        lyr = None
        with checked_close(out):
            ds = None
    note = None if unit2 is not None else "the CRS is not projected: area_m2 is left empty"
    if rep is not None:
        rep.log(f"class polygons: {n} polygons in {out}" + (f", none under {threshold} px (sieve)" if threshold > 1
                                                            else "")
                + (f"; {dropped} smaller region(s) enclosed by nodata dropped" if dropped else "")
                + (f"; simplified by {simplify:g} px as a coverage (shared edges kept)" if simplified else "")
                + ("; NOT simplified: the polygons are not a coverage GEOS can simplify" if simplify and not simplified
                   else "")
                + (f"; {note}" if note else ""))
    return {"polygons": str(out), "features": n, "min_pixels": int(threshold), "dropped": dropped,
            "simplify_pixels": float(simplify or 0.0) if simplified else 0.0, "area_note": note}


def simplify_coverage(lyr, tolerance: float, unit2: Optional[float]) -> bool:
    """Simplify the polygons of ``lyr`` (an OGR layer of polygons that tile the classified area, as
    GDALPolygonize writes them) as one **polygonal coverage**: GEOS's coverage simplification (Visvalingam–
    Whyatt on the shared edges, each edge simplified once for both its polygons; ``shapely.coverage_simplify``,
    GEOS >= 3.12, the one bundled with shapely's wheels), with the outline of the coverage — the raster's edge
    and the edges along nodata — kept as it is. So adjacent polygons still share their edges (no gap, no
    overlap), their union is still the classified area, and the total area is unchanged; ``area_m2`` is
    recomputed for each simplified polygon.

    Args:
        tolerance: CRS units; roughly the square root of the area of the triangles removed (one pixel's side
            removes the one-pixel stair-steps).
        unit2: m² per CRS unit², or None (a geographic CRS: ``area_m2`` stays null).

    Returns:
        True; False when the polygons are not a coverage GEOS can simplify (they are then left as they are).
    """
    import shapely

    lyr.ResetReading()
    fids, wkbs = [], []
    for f in lyr:
        fids.append(f.GetFID())
        wkbs.append(bytes(f.GetGeometryRef().ExportToWkb()))
    if not fids:
        return True
    noded = _noded(shapely.from_wkb(wkbs))
    if noded is None:
        return False
    simple = shapely.coverage_simplify(noded, tolerance, simplify_boundary=False)
    lyr.StartTransaction()
    for fid, geom in zip(fids, simple):
        if geom.is_empty or geom.geom_type != "Polygon":  # not expected of a valid coverage: keep the pixels
            continue
        f = lyr.GetFeature(fid)
        f.SetGeometry(ogr.CreateGeometryFromWkb(shapely.to_wkb(geom)))
        if unit2 is not None:
            f.SetField("area_m2", geom.area * unit2)
        lyr.SetFeature(f)
    lyr.CommitTransaction()
    return True


def _noded(geoms):
    """The polygons of ``geoms`` (a numpy array of shapely polygons that tile an area, as GDALPolygonize writes
    them) with a vertex wherever a neighbour has one on their shared edge — what GEOS's coverage operations
    require (GDALPolygonize leaves a long edge whole where the neighbour's side has a junction): all the
    boundaries are unioned (noded once), polygonized into faces, and each polygon takes the face that
    holds a point inside it. None when a polygon finds no face of its own (not a coverage)."""
    import numpy as np
    import shapely

    faces = np.asarray(shapely.get_parts(shapely.polygonize(shapely.get_parts(shapely.union_all(shapely.boundary(geoms))))))
    if not len(faces):
        return None
    face_i, geom_i = shapely.STRtree(geoms).query(shapely.point_on_surface(faces), predicate="within")
    if len(set(geom_i.tolist())) != len(geoms) or len(geom_i) != len(geoms):
        return None
    out = np.empty(len(geoms), dtype=object)
    out[geom_i] = faces[face_i]
    return out


def _pixel_area(ds) -> float:
    """The area of one pixel in the raster's CRS units squared (degrees² in a geographic CRS)."""
    gt = ds.GetGeoTransform()
    return abs(gt[1] * gt[5] - gt[2] * gt[4])


def _fill_fields(lyr, names: dict, unit2: Optional[float], min_area: float):
    """``class_name`` and ``area_m2`` of every polygon, and the polygons under ``min_area`` (CRS units²: those
    the sieve could not merge) deleted, in one transaction; returns ``(polygons kept, dropped)``."""
    lyr.StartTransaction()
    n = dropped = 0
    small = []
    lyr.ResetReading()
    for f in lyr:
        area = f.GetGeometryRef().GetArea()
        if min_area > 0 and area < min_area * (1 - 1e-9):
            small.append(f.GetFID())
            continue
        cid = f.GetField("class_id")
        f.SetField("class_name", names.get(int(cid), f"class {cid}"))
        if unit2 is not None:
            f.SetField("area_m2", area * unit2)
        lyr.SetFeature(f)
        n += 1
    for fid in small:
        lyr.DeleteFeature(fid)
        dropped += 1
    lyr.CommitTransaction()
    return n, dropped
