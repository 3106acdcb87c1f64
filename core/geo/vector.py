"""Vector layers through OGR: opening a layer of a file by name or index, finding its fields, reprojecting
geometries to a raster's CRS (traditional GIS axis order)."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union
from osgeo import gdal, ogr, osr
from core.errors import InputError
gdal.UseExceptions()
ogr.UseExceptions()
osr.UseExceptions()


def parse_vector_source(source) -> Tuple[str, Optional[str], Optional[int]]:
    """``file``, ``file|layername=NAME`` or ``file|layerid=N`` (QGIS layer sources) → (file, name, id).

    Raises:
        InputError: a ``layerid`` that is not a number.
    """
    parts = str(source).split("|")
    name, lid = None, None
    for opt in parts[1:]:
        k, _, v = opt.partition("=")
        if k.strip().lower() == "layername":
            name = v
        elif k.strip().lower() == "layerid":
            try:
                lid = int(v)
            except ValueError:
                raise InputError(f"{source}: layerid must be a number, got {v!r}")
    return parts[0], name, lid


def open_layer(vector, layer: Optional[Union[str, int]] = None, what: str = "Polygon layer"):
    """Open one layer of a vector file GDAL/OGR reads: ``layer`` by name or 0-based index, else the one
    named in a QGIS-style source (``file|layername=NAME``, ``|layerid=N``), else the first.

    Returns:
        ``(dataset, layer)`` — keep the dataset referenced while the layer is used.

    Raises:
        InputError: a missing or unreadable file, no vector layer, no such layer (the layers are listed).
    """
    p, lname, lid = parse_vector_source(vector)
    if layer is None:
        layer = lname if lname is not None else lid
    if not p.startswith("/vsi") and not os.path.exists(p):
        raise InputError(f"{what} not found: {p}")
    try:
        vds = gdal.OpenEx(p, gdal.OF_VECTOR | gdal.OF_READONLY)
    except RuntimeError as exc:
        raise InputError(f"{p} is not a vector layer GDAL/OGR can read ({exc})") from exc
    if vds is None or vds.GetLayerCount() == 0:
        raise InputError(f"{p} has no vector layer")
    names = [vds.GetLayerByIndex(i).GetName() for i in range(vds.GetLayerCount())]
    if layer is None:
        lyr = vds.GetLayerByIndex(0)
    elif isinstance(layer, int):
        if not 0 <= layer < len(names):
            raise InputError(f"{p}: no layer {layer} (layers: {', '.join(names)})")
        lyr = vds.GetLayerByIndex(layer)
    else:
        lyr = vds.GetLayerByName(str(layer))
        if lyr is None:
            raise InputError(f"{p}: no layer {layer!r} (layers: {', '.join(names)})")
    return vds, lyr


def field_names(lyr) -> List[str]:
    """The attribute field names of an OGR layer, in order."""
    defn = lyr.GetLayerDefn()
    return [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]


def find_field(lyr, name: str, vector, option: str = "") -> str:
    """The field of ``lyr`` called ``name``, as spelled in the layer (exact, else the one case-insensitive
    match); ``option`` names the parameter in the error (e.g. `` (--negative-field)``).

    Raises:
        InputError: no such field; the message lists the layer's fields.
    """
    fields = field_names(lyr)
    if name in fields:
        return name
    ci = [f for f in fields if f.lower() == str(name).lower()]
    if len(ci) == 1:
        return ci[0]
    raise InputError(f"{vector}: layer {lyr.GetName()!r} has no field {name!r}{option}; its fields are: "
                     f"{', '.join(fields) if fields else '(none)'}")


def reprojected(geom: ogr.Geometry, ct: Optional[osr.CoordinateTransformation], vector, fid,
                target: str) -> ogr.Geometry:
    """A copy of ``geom`` transformed by ``ct`` (or just copied when ``ct`` is None).

    Raises:
        InputError: the feature cannot be reprojected (named by layer and FID, and ``target``).
    """
    g = geom.Clone()
    if ct is not None:
        try:
            g.Transform(ct)
        except RuntimeError as exc:
            raise InputError(f"{vector}: feature {fid} cannot be reprojected to {target} ({exc})") from exc
    return g


def traditional(srs: Optional[osr.SpatialReference]) -> Optional[osr.SpatialReference]:
    """A copy of ``srs`` with the traditional GIS axis order (x = easting/longitude), or None."""
    if srs is None:
        return None
    s = srs.Clone()
    s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return s


_POLYGONAL = {ogr.wkbPolygon, ogr.wkbMultiPolygon}


def repaired_polygon(geom: ogr.Geometry) -> Tuple[Optional[ogr.Geometry], bool]:
    """A polygon geometry that GEOS accepts: ``(geom, False)`` when ``geom`` is valid, else
    ``(GEOS make-valid's polygonal part, True)`` — a self-intersecting ring (a "bow tie") becomes the
    areas it encloses, a hole outside its shell a separate polygon — or ``(None, True)`` when nothing with
    an area is left (a ring collapsed to a line or a point). Non-polygon geometries (points, lines) are
    returned as they are.

    Why: GDAL's rasteriser fills rings by the even-odd rule and does not look at validity, so an invalid
    polygon burns pixels its author did not mean (overlapping rings cancel out), and GEOS predicates
    (intersection with cells) fail or disagree on it. (issue 13)
    """
    flat = ogr.GT_Flatten(geom.GetGeometryType())
    if flat not in _POLYGONAL or geom.IsValid():
        return geom, False
    try:
        fixed = geom.MakeValid()
    except RuntimeError:
        fixed = None
    if fixed is None or fixed.IsEmpty():
        return None, True
    ftype = ogr.GT_Flatten(fixed.GetGeometryType())
    if ftype in _POLYGONAL:
        return fixed, True
    out = ogr.Geometry(ogr.wkbMultiPolygon)  # a collection: keep its polygons (lines and points have no area)
    for i in range(fixed.GetGeometryCount()):
        part = fixed.GetGeometryRef(i)
        t = ogr.GT_Flatten(part.GetGeometryType())
        if t == ogr.wkbPolygon:
            out.AddGeometry(part)
        elif t == ogr.wkbMultiPolygon:
            for j in range(part.GetGeometryCount()):
                out.AddGeometry(part.GetGeometryRef(j))
    return (out, True) if out.GetGeometryCount() else (None, True)


class GeometryRepairs:
    """The invalid polygons met while reading a layer (:func:`repaired_polygon`): ``repaired`` and
    ``unusable`` feature ids. :meth:`check` refuses unusable ones; :meth:`message` is the warning."""

    def __init__(self, vector):
        self.vector = vector
        self.repaired: List[int] = []
        self.unusable: List[int] = []

    def fix(self, geom: ogr.Geometry, fid: int) -> Optional[ogr.Geometry]:
        """``geom`` valid (repaired and counted when it was not), or None (counted as unusable)."""
        g, changed = repaired_polygon(geom)
        if g is None:
            self.unusable.append(int(fid))
        elif changed:
            self.repaired.append(int(fid))
        return g

    def check(self) -> None:
        """Raises InputError naming the features whose polygons have no area once made valid."""
        if self.unusable:
            ids = ", ".join(str(i) for i in self.unusable[:20]) + (" …" if len(self.unusable) > 20 else "")
            raise InputError(f"{self.vector}: {len(self.unusable)} polygon(s) are invalid and enclose no area once "
                             f"repaired (a ring collapsed to a line or point): feature id(s) {ids}. Fix or delete "
                             "them (QGIS: Vector > Geometry Tools > Check Validity / Fix Geometries).")

    def message(self) -> Optional[str]:
        """The warning (count and the first feature ids), or None when every polygon was valid."""
        if not self.repaired:
            return None
        ids = ", ".join(str(i) for i in self.repaired[:20]) + (" …" if len(self.repaired) > 20 else "")
        return (f"{self.vector}: {len(self.repaired)} invalid polygon(s) (self-intersecting rings, holes outside "
                f"their shell) were repaired with GEOS make-valid before use: feature id(s) {ids}")

    def summary(self) -> Optional[dict]:
        """``{"repaired": n, "feature_ids": [...]}`` for a result, or None."""
        return {"repaired": len(self.repaired), "feature_ids": self.repaired[:100]} if self.repaired else None
