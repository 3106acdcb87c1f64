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
