"""The reference of an accuracy assessment, read strip by strip on the prediction's grid: a class raster
(values or colours mapped to classes, resampled nearest when on another grid) or polygons with a class field."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple
import numpy as np
from osgeo import gdal, ogr, osr
from core.errors import InputError
gdal.UseExceptions()
ogr.UseExceptions()
osr.UseExceptions()
from core.classtable import IGNORE
from core.geo.failures import reading
from core.geo.vector import GeometryRepairs, find_field, open_layer, parse_vector_source, reprojected, traditional
from core.classtable import colour_rgb

_STRIP_PIXELS = 1 << 22  # pixels per strip (4 Mpx: a few tens of MB of working arrays)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _valid(band, arr: np.ndarray, x: int, y: int, w: int, h: int) -> Optional[np.ndarray]:
    """Validity mask (bool) of a block of a band from its nodata value or mask band; None = all valid."""
    flags = band.GetMaskFlags()
    if flags & gdal.GMF_ALL_VALID:
        return None
    if flags & gdal.GMF_NODATA:
        nd = band.GetNoDataValue()
        if nd is None:
            return None
        if isinstance(nd, float) and math.isnan(nd):
            return ~np.isnan(arr)
        return arr != nd
    return band.GetMaskBand().ReadAsArray(x, y, w, h) > 0


def _is_integer_type(dt) -> bool:
    return dt in (gdal.GDT_Byte, gdal.GDT_UInt16, gdal.GDT_Int16, gdal.GDT_UInt32, gdal.GDT_Int32) or \
        dt == getattr(gdal, "GDT_Int8", -1) or dt == getattr(gdal, "GDT_Int64", -1) or \
        dt == getattr(gdal, "GDT_UInt64", -1)


def _open_raster(path, what: str):
    from core.geo.raster import open_raster

    try:
        return open_raster(path)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from exc


def _is_id(v, cid: int) -> bool:
    """A field value that is the class id (a number, or text of digits)."""
    if isinstance(v, str):
        return v.strip().isdigit() and int(v.strip()) == cid
    try:
        return float(v) == float(cid)
    except (TypeError, ValueError):
        return False


def _same_value(a, b) -> bool:
    """Field/raster value ``a`` equals class-table value ``b`` (numbers by value, text case-insensitive)."""
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


class _ValueMapper:
    """Maps reference raster values to class indices (0..K-1, 255 = ignore)."""

    def __init__(self, pairs: List[Tuple[float, int]], dtype):
        self.pairs = pairs
        self.lut = None
        self.offset = 0
        if dtype in (gdal.GDT_Byte, gdal.GDT_UInt16, gdal.GDT_Int16) or dtype == getattr(gdal, "GDT_Int8", -1):
            self.offset = 32768 if dtype in (gdal.GDT_Int16,) or dtype == getattr(gdal, "GDT_Int8", -1) else 0
            self.lut = np.full(65536, IGNORE, dtype=np.uint8)
            for v, idx in pairs:
                if float(v).is_integer() and 0 <= int(v) + self.offset < 65536:
                    self.lut[int(v) + self.offset] = idx

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        if self.lut is not None:
            return self.lut[arr.astype(np.int64) + self.offset] if self.offset else self.lut[arr]
        out = np.full(arr.shape, IGNORE, dtype=np.uint8)
        for v, idx in self.pairs:
            out[arr == v] = idx
        return out


def _grid(ds):
    gt = ds.GetGeoTransform(can_return_null=True)
    srs = ds.GetSpatialRef()
    return gt, srs


def _same_gt(a, b) -> bool:
    """Two geotransforms describe the same grid (origin within 0.001 px, pixel size within 1e-6)."""
    px = max(abs(a[1]), abs(a[5]), 1e-12)
    return all(abs(a[i] - b[i]) <= 1e-3 * px for i in (0, 3)) and \
        all(abs(a[i] - b[i]) <= 1e-6 * px for i in (1, 2, 4, 5))


class _RasterReference:
    """A class-raster reference on the prediction's grid (warped nearest when the grids differ)."""

    def __init__(self, path, pred_ds, classes: List[dict], ignore: list, rep):
        self.path = str(path)
        self.src = _open_raster(path, "reference")
        self.ds = self.src
        self.alpha = None
        W, H = pred_ds.RasterXSize, pred_ds.RasterYSize
        rw, rh = self.src.RasterXSize, self.src.RasterYSize
        pgt, psrs = _grid(pred_ds)
        rgt, rsrs = _grid(self.src)
        georef = pgt is not None and rgt is not None and psrs is not None and rsrs is not None
        if (rw, rh) != (W, H) or (georef and not (_same_gt(pgt, rgt) and psrs.IsSame(rsrs))):
            if not georef:
                missing = [n for n, (g, s) in (("prediction", (pgt, psrs)), ("reference", (rgt, rsrs)))
                           if g is None or s is None]
                raise InputError(
                    f"The reference {self.path} is {rw} x {rh} px and the prediction is {W} x {H} px, and the "
                    f"{' and the '.join(missing)} {'have' if len(missing) > 1 else 'has'} no CRS, so they "
                    "cannot be aligned; give both rasters a CRS and geotransform, or rasters of the same size")
            if abs(pgt[2]) > 0 or abs(pgt[4]) > 0:
                raise InputError(f"The prediction's geotransform is rotated; resample the reference "
                                 f"{self.path} onto it first (gdalwarp)")
            xmin, ymax = pgt[0], pgt[3]
            xmax, ymin = pgt[0] + W * pgt[1], pgt[3] + H * pgt[5]
            self.ds = gdal.Warp("", self.src, format="VRT", dstSRS=psrs.ExportToWkt(),
                                outputBounds=(min(xmin, xmax), min(ymin, ymax), max(xmin, xmax), max(ymin, ymax)),
                                width=W, height=H, resampleAlg="near", dstAlpha=True)
            self.alpha = self.ds.RasterCount
            rep.log(f"reference {self.path} ({rw} x {rh} px) resampled (nearest) onto the prediction's grid")
        elif pgt is None or rgt is None or psrs is None or rsrs is None:
            rep.log(f"reference {self.path}: same size as the prediction; assumed to be on the same grid "
                    "(one of them has no CRS or geotransform)")
        n_bands = self.src.RasterCount
        self.rgb = n_bands >= 3
        self.ignore = ignore
        self.unknown: Dict[Any, int] = {}
        dtype = self.src.GetRasterBand(1).DataType
        if self.rgb:
            pairs = []
            for idx, c in enumerate(classes):
                cols = [v for v in (c["values"] or []) if colour_rgb(v)] or ([c["colour"]] if colour_rgb(c["colour"]) else [])
                for col in cols:
                    r, g, b = colour_rgb(col)
                    pairs.append(((r << 16) | (g << 8) | b, idx))
            if not pairs:
                raise InputError(f"The reference {self.path} has {n_bands} bands (a colour-coded mask) but the "
                                 "class table has no colours to decode it; give --classes with a 'colour' or "
                                 "'value' \"#RRGGBB\" per class")
            self.colour_map = dict(pairs)
            self.mapper = None
            rep.log(f"reference {self.path}: {n_bands} bands, decoded as RGB colours of the classes")
        else:
            if n_bands > 1:
                rep.warning(f"reference {self.path} has {n_bands} bands; band 1 is used")
            pairs = []
            for idx, c in enumerate(classes):
                vals = c["values"] if c["values"] is not None else [c["id"]]
                for v in vals:
                    try:
                        pairs.append((float(v), idx))
                    except (TypeError, ValueError):
                        raise InputError(f"class {c['name']!r}: value {v!r} is not a number, but the reference "
                                         f"{self.path} is a single-band class raster")
            self.mapper = _ValueMapper(pairs, dtype)

    def read(self, y0: int, rows: int) -> np.ndarray:
        """Class indices uint8 (rows, W) of rows ``y0..y0+rows`` (255: nodata or no class). Raises
        ReadError: GDAL cannot read them (a truncated or damaged reference), naming the file."""
        with reading(self.path, "reference raster"):
            return self._read(y0, rows)

    def _read(self, y0: int, rows: int) -> np.ndarray:
        W = self.ds.RasterXSize
        if self.rgb:
            bands = [self.ds.GetRasterBand(b) for b in (1, 2, 3)]
            arrs = [b.ReadAsArray(0, y0, W, rows) for b in bands]
            valid = None
            for b, a in zip(bands, arrs):
                v = _valid(b, a, 0, y0, W, rows)
                if v is not None:
                    valid = v if valid is None else (valid | v)  # nodata only when nodata in every band
            code = (arrs[0].astype(np.int64) << 16) | (arrs[1].astype(np.int64) << 8) | arrs[2].astype(np.int64)
            ids = np.full(code.shape, IGNORE, dtype=np.uint8)
            for col, idx in self.colour_map.items():
                ids[code == col] = idx
            raw = code
        else:
            band = self.ds.GetRasterBand(1)
            raw = band.ReadAsArray(0, y0, W, rows)
            valid = _valid(band, raw, 0, y0, W, rows)
            ids = self.mapper(raw)
            if raw.dtype.kind in "ui":
                ids[raw == IGNORE] = IGNORE
        if self.alpha is not None:
            inside = self.ds.GetRasterBand(self.alpha).ReadAsArray(0, y0, W, rows) > 0
            valid = inside if valid is None else (valid & inside)
        if valid is not None:
            ids[~valid] = IGNORE
        unknown = (ids == IGNORE) if valid is None else ((ids == IGNORE) & valid)
        if not self.rgb and raw.dtype.kind in "ui":
            unknown &= raw != IGNORE
        if unknown.any():
            vals, counts = np.unique(raw[unknown], return_counts=True)
            for v, n in zip(vals.tolist(), counts.tolist()):
                if len(self.unknown) < 1000 or v in self.unknown:
                    self.unknown[v] = self.unknown.get(v, 0) + int(n)
        return ids

    def unknown_note(self) -> Optional[str]:
        """A warning about reference values of no class (the table's ``ignore`` values excepted)."""
        fmt = (lambda v: f"#{v:06X}") if self.rgb else (lambda v: f"{v:g}" if isinstance(v, float) else str(v))
        items = sorted(((v, n) for v, n in self.unknown.items()
                        if not any(_same_value(fmt(v), i) for i in self.ignore)), key=lambda kv: -kv[1])
        if not items:
            return None
        shown = ", ".join(f"{fmt(v)} ({n} px)" for v, n in items[:10])
        more = f" and {len(items) - 10} more" if len(items) > 10 else ""
        return (f"reference {self.path}: {sum(n for _, n in items)} pixels hold values of no class and are "
                f"ignored: {shown}{more}")



def _open_reference_layer(path, field: str):
    """Open a polygon reference (``file`` or ``file|layername=NAME``) and find its class field.

    Returns:
        ``(dataset, layer, field name as spelled in the layer)`` (keep the dataset referenced).

    Raises:
        InputError: missing or unreadable file, no such layer, no such field (the fields are listed),
            an empty layer.
    """
    vds, layer = open_layer(path, what="Reference layer")
    field = find_field(layer, field, path, " (--reference-field)")
    if layer.GetFeatureCount() == 0:
        raise InputError(f"The reference layer {path} is empty (no polygons)")
    return vds, layer, field


def _check_reference(reference_path, reference_field) -> None:
    """Fail early (before any segmentation) on a missing or wrong reference. Raises InputError."""
    if reference_field is not None:
        _open_reference_layer(reference_path, reference_field)
        return
    src = parse_vector_source(str(reference_path))[0]
    if not os.path.exists(src) and not src.startswith("/vsi"):
        raise InputError(f"Reference not found: {src}")
    try:
        probe = gdal.OpenEx(src, gdal.OF_RASTER | gdal.OF_VECTOR)
    except RuntimeError as exc:
        raise InputError(f"The reference {src} is neither a raster nor a vector layer GDAL can read ({exc})") from exc
    if probe is None:
        raise InputError(f"The reference {src} is neither a raster nor a vector layer GDAL can read")
    if probe.RasterCount == 0:
        if probe.GetLayerCount() > 0:
            raise InputError(f"The reference {src} is a vector layer: give its class field with --reference-field")
        raise InputError(f"The reference {src} has neither raster bands nor vector layers")


def _class_of_value(v, classes: List[dict]) -> Optional[int]:
    """The class index of a polygon field value: explicit class-table values, then the name, then the id."""
    for idx, c in enumerate(classes):
        if c["values"] is not None and any(_same_value(v, cv) for cv in c["values"]):
            return idx
    for idx, c in enumerate(classes):
        if c["values"] is None and str(v).strip().lower() == c["name"].lower():
            return idx
    for idx, c in enumerate(classes):
        if c["values"] is None and _is_id(v, c["id"]):
            return idx
    return None


def _background_index(background, classes: List[dict]) -> int:
    """The class index of the table's ``background`` (name or id), or IGNORE when there is none.

    Raises:
        InputError: ``background`` is not one of the classes.
    """
    if background is None:
        return IGNORE
    bg = [i for i, c in enumerate(classes) if _same_value(background, c["name"]) or
          (not isinstance(background, str) and _same_value(background, c["id"]))]
    if not bg:
        raise InputError(f"class table: background {background!r} is not one of the classes "
                         f"({', '.join(c['name'] for c in classes)})")
    return bg[0]


class _PolygonReference:
    """A polygon layer + class field rasterised strip by strip onto the prediction's grid.

    Burn rule: a pixel takes the class of the polygon that contains its centre (GDAL's default, not
    ALL_TOUCHED); where polygons overlap, the later feature in the layer wins. Pixels covered by no
    polygon are ignored, or take the class table's ``background`` class.
    """

    def __init__(self, path, field: str, pred_ds, classes: List[dict], background, ignore: list, rep):
        self.path = str(path)
        self.vds, layer, field = _open_reference_layer(path, field)
        pgt, psrs = _grid(pred_ds)
        if pgt is None:
            raise InputError("The prediction has no geotransform, so polygons cannot be rasterised onto it; "
                             "give it a CRS and geotransform or use a class raster as the reference")
        self.gt = pgt
        self.W = pred_ds.RasterXSize
        transform = self._transform(layer.GetSpatialRef(), psrs, rep)
        self.background = _background_index(background, classes)
        drv = ogr.GetDriverByName("Memory")
        self.mem_ds = drv.CreateDataSource("evaluate_reference")
        self.mem = self.mem_ds.CreateLayer("reference", None, ogr.wkbUnknown)
        self.mem.CreateField(ogr.FieldDefn("cls", ogr.OFTInteger))
        self.rep, self.repairs = rep, GeometryRepairs(self.path)
        burnt, unknown = self._copy_classified(layer, field, classes, ignore, transform)
        names = ", ".join(c["name"] for c in classes)
        if unknown:
            shown = ", ".join(f"{k!r} ({n} features)" for k, n in sorted(unknown.items(), key=lambda kv: -kv[1])[:10])
            msg = (f"reference {self.path}: field {field!r} values that map to no class ({names}) are skipped: {shown}")
            if burnt == 0:
                raise InputError(f"No polygon of the reference layer {self.path} maps to a class: field {field!r} "
                                 f"holds {shown}; the classes are {names} (map field values to classes with "
                                 "'value' entries in --classes)")
            rep.warning(msg)
        if burnt == 0:
            raise InputError(f"No polygon of the reference layer {self.path} maps to a class (field {field!r}: "
                             "every value is ignored, or no polygon has a geometry)")
        self.features = burnt
        self.field = field

    def _transform(self, lsrs, psrs, rep):
        """The transformation from the layer's CRS to the prediction's, or None (same CRS, or one missing)."""
        transform = None
        if lsrs is not None and psrs is not None and not lsrs.IsSame(psrs):
            transform = osr.CoordinateTransformation(traditional(lsrs), traditional(psrs))
            rep.log(f"reference {self.path}: polygons reprojected from {_crs_name(lsrs)} to the prediction's "
                    f"{_crs_name(psrs)}")
        elif (lsrs is None) != (psrs is None):
            rep.warning(f"reference {self.path}: {'the layer' if lsrs is None else 'the prediction'} has no CRS; "
                        "the polygons are assumed to be in the prediction's coordinates")
        return transform

    def _copy_classified(self, layer, field: str, classes: List[dict], ignore: list, transform):
        """Copy every polygon whose field value maps to a class into the in-memory layer (field ``cls`` = class
        index), reprojected. Returns ``(polygons copied, {unmapped value: features})``."""
        mdefn = self.mem.GetLayerDefn()
        cache: Dict[Any, Optional[int]] = {}
        unknown: Dict[Any, int] = {}
        burnt = 0
        layer.ResetReading()
        with reading(self.path, "reference layer"):
            for feat in layer:
                burnt += self._copy_feature(feat, field, classes, ignore, transform, mdefn, cache, unknown)
        layer.ResetReading()
        self.repairs.check()
        if self.repairs.message():
            self.rep.warning(self.repairs.message())
        return burnt, unknown

    def _copy_feature(self, feat, field, classes, ignore, transform, mdefn, cache, unknown) -> int:
        """One feature of :meth:`_copy_classified`: 1 when copied, else 0 (its value counted in ``unknown``
        when it maps to no class and is not ignored). An invalid polygon is repaired (GEOS make-valid)."""
        geom = feat.GetGeometryRef()
        if geom is None or geom.IsEmpty():
            return 0
        v = feat.GetField(field) if feat.IsFieldSetAndNotNull(field) else None
        if v is None:
            unknown["NULL"] = unknown.get("NULL", 0) + 1
            return 0
        key = v if not isinstance(v, str) else v.strip()
        if key not in cache:
            cache[key] = _class_of_value(v, classes)
        idx = cache[key]
        if idx is None:
            if not any(_same_value(v, i) for i in ignore):
                unknown[key] = unknown.get(key, 0) + 1
            return 0
        geom = self.repairs.fix(geom, feat.GetFID())
        if geom is None:
            return 0
        g = reprojected(geom, transform, self.path, feat.GetFID(), "the prediction's CRS")
        out = ogr.Feature(mdefn)
        out.SetField("cls", int(idx))
        out.SetGeometry(g)
        self.mem.CreateFeature(out)
        return 1

    def read(self, y0: int, rows: int) -> np.ndarray:
        gt = self.gt
        ox, oy = gt[0] + y0 * gt[2], gt[3] + y0 * gt[5]
        sgt = (ox, gt[1], gt[2], oy, gt[4], gt[5])
        mem = gdal.GetDriverByName("MEM").Create("", self.W, rows, 1, gdal.GDT_Byte)
        mem.SetGeoTransform(sgt)
        band = mem.GetRasterBand(1)
        band.Fill(self.background)
        xs = [ox + c * gt[1] + r * gt[2] for c in (0, self.W) for r in (0, rows)]
        ys = [oy + c * gt[4] + r * gt[5] for c in (0, self.W) for r in (0, rows)]
        self.mem.SetSpatialFilterRect(min(xs), min(ys), max(xs), max(ys))
        try:
            gdal.RasterizeLayer(mem, [1], self.mem, options=["ATTRIBUTE=cls"])
        finally:
            self.mem.SetSpatialFilter(None)
        arr = band.ReadAsArray()
        band = None
        mem = None
        return arr

    def unknown_note(self) -> Optional[str]:
        return None


def _crs_name(srs) -> str:
    from core.geo.raster import crs_label

    return crs_label(srs) or "no CRS"
