"""Accuracy assessment of a class raster against a reference (the ``evaluate`` command).

``python -m core evaluate PREDICTION REFERENCE [--reference-field FIELD] [--classes CLASSES.json]
[--model M] [--output-json P] [--output-csv P] [--overwrite] [--json]``

The reference is either a class raster or a polygon layer with a class field. Everything is computed
from one confusion matrix (rows = reference class, columns = predicted class, pixel counts), which is
accumulated strip by strip (rows of the prediction's grid), so memory is bounded by the strip.

Metrics (the usual definitions of land-cover accuracy assessment; the SRMF paper reports mIoU and
per-class IoU):

* overall accuracy ``OA = trace(C) / N``;
* Cohen's kappa ``(OA - p_e) / (1 - p_e)``, ``p_e = sum_k row_k * col_k / N^2`` (undefined → null when
  ``p_e = 1``, i.e. a single class everywhere in both rasters);
* per class ``k``: precision ``C_kk / col_k``, recall ``C_kk / row_k``, F1 ``2 C_kk / (row_k + col_k)``,
  IoU ``C_kk / (row_k + col_k - C_kk)``, support ``row_k`` (reference pixels), frequency ``row_k / N``;
  a ratio whose denominator is 0 is undefined (null in JSON, empty in CSV);
* mIoU: mean IoU over the classes present in the reference or in the prediction. A class with zero
  support AND zero predicted pixels has an undefined IoU and is left out of the mean; a class that is
  predicted but absent from the reference has IoU 0 and counts;
* tail-class mIoU: the median is taken over the reference pixel frequencies of the classes present in
  the reference (support > 0); the tail classes are those present classes whose frequency is strictly
  below that median (a class exactly at the median is not a tail class; when all frequencies are
  equal there is no tail class and tail mIoU is null). Tail mIoU is the mean IoU of the tail classes.

Ignored pixels (not counted anywhere): the prediction's nodata and the value 255; the reference's
nodata, the value 255, values that map to no class of the class table, pixels outside the reference's
extent (after resampling) and, for polygons, pixels covered by no polygon unless the class table names
a ``background`` class.

Reference rasters: one band of class values (a palette raster is read by index), or 3+ bands read as
an RGB colour-coded mask (decoded with the class colours). Grids: the same size is taken as the same
grid when either raster lacks a CRS; otherwise a reference on another grid or CRS is resampled
(nearest) onto the prediction's grid; different sizes without a CRS are refused. Polygon references
are rasterised strip by strip onto the prediction's grid (reprojected to its CRS): a pixel takes the
class of the polygon containing its centre, the later feature wins where polygons overlap.

The class table (``--classes``, the same file as fine-tuning's, :mod:`core.data`): JSON
``{"classes": [{"id"?, "name", "colour"?, "prompt"?, "value"? | "values"?}], "ignore"?: [values],
"background"?: name or id}``. ``id`` defaults to the entry's position; ``value`` (a scalar or a list)
is what the reference holds for that class (a raster value, a field value, or "#RRGGBB" for an RGB
reference), by default the id for a raster and the name (case-insensitive) or the id for a field;
``ignore`` lists reference values that mean "unlabelled" (ignored without a warning). A
model file (``.srmf``) may be given instead: its class table is used. Without ``--classes`` the classes
come from the model (``--model``), else from the prediction's category names, else the class ids that
occur in either raster.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from osgeo import gdal, ogr, osr

from .errors import InputError
from .fileutil import default_file_mode

gdal.UseExceptions()
ogr.UseExceptions()
osr.UseExceptions()

IGNORE = 255
_STRIP_PIXELS = 1 << 22  # pixels per strip (4 Mpx: a few tens of MB of working arrays)


# ------------------------------------------------------------------------------------------------
# Confusion matrix and metrics
# ------------------------------------------------------------------------------------------------
def confusion_matrix(pred: np.ndarray, ref: np.ndarray, num_classes: int, ignore: int = IGNORE,
                     out: Optional[np.ndarray] = None) -> np.ndarray:
    """Confusion matrix of class indices; rows = reference, columns = prediction.

    Streaming: call it on each block with ``out=`` the running matrix (it is added to in place and
    returned), or sum the matrices of the blocks.

    Args:
        pred, ref: integer arrays of the same shape (any shape), class indices ``0..num_classes-1``;
            a pixel that is ``ignore`` in either array is not counted.
        num_classes: K. ignore: the ignored index (255).
        out: optional int64 (K, K) matrix to accumulate into.

    Returns:
        int64 (K, K): ``C[r, p]`` = number of pixels of reference class r predicted as p.

    Raises:
        ValueError: shapes differ, or a non-ignored value is outside ``0..K-1``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    K = int(num_classes)
    keep = (pred != ignore) & (ref != ignore)
    p = pred[keep].astype(np.int64, copy=False)
    r = ref[keep].astype(np.int64, copy=False)
    if p.size and (p.min() < 0 or p.max() >= K or r.min() < 0 or r.max() >= K):
        raise ValueError(f"class index outside 0..{K - 1} (prediction {p.min()}..{p.max()}, "
                         f"reference {r.min()}..{r.max()})")
    cm = np.bincount(r * K + p, minlength=K * K).reshape(K, K).astype(np.int64, copy=False)
    if out is None:
        return cm
    out += cm
    return out


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den > 0 else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> Dict[str, Any]:
    """Accuracy metrics of a confusion matrix (see the module docstring for the exact rules).

    Args:
        cm: int (K, K), rows = reference, columns = prediction. class_names: K names.

    Returns:
        A JSON-able dict: ``overall_accuracy``, ``kappa``, ``miou``, ``tail_miou``, ``tail_classes``
        (names), ``mean_f1`` (over the same classes as mIoU), ``per_class`` (list of ``{"index",
        "name", "precision", "recall", "f1", "iou", "support", "predicted", "frequency", "tail"}``),
        ``frequencies`` (K floats), ``median_frequency``, ``pixels_evaluated``, ``confusion_matrix``
        (lists of int). Undefined values (a zero denominator) are ``None``.

    Raises:
        ValueError: ``cm`` is not square, is negative, or does not match ``class_names``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    K = cm.shape[0]
    if len(class_names) != K:
        raise ValueError(f"{len(class_names)} class names for a {K} x {K} confusion matrix")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative counts")
    n = int(cm.sum())
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    oa = _ratio(int(tp.sum()), n)
    kappa = None
    if n > 0:
        pe = float((support.astype(np.float64) * predicted.astype(np.float64)).sum()) / (float(n) * float(n))
        if pe < 1.0:
            kappa = (oa - pe) / (1.0 - pe)
    freqs = [(_ratio(int(s), n) or 0.0) for s in support]
    present = [k for k in range(K) if support[k] > 0]
    median = float(np.median([freqs[k] for k in present])) if present else None
    tail = [k for k in present if freqs[k] < median] if present else []
    per_class = []
    for k in range(K):
        s, c, t = int(support[k]), int(predicted[k]), int(tp[k])
        per_class.append({
            "index": k, "name": str(class_names[k]),
            "precision": _ratio(t, c), "recall": _ratio(t, s),
            "f1": _ratio(2 * t, s + c), "iou": _ratio(t, s + c - t),
            "support": s, "predicted": c, "frequency": freqs[k], "tail": k in tail,
        })
    return {
        "overall_accuracy": oa,
        "kappa": kappa,
        "miou": _mean([pc["iou"] for pc in per_class]),
        "tail_miou": _mean([per_class[k]["iou"] for k in tail]),
        "tail_classes": [str(class_names[k]) for k in tail],
        "mean_f1": _mean([pc["f1"] for pc in per_class]),
        "median_frequency": median,
        "frequencies": freqs,
        "per_class": per_class,
        "pixels_evaluated": n,
        "confusion_matrix": cm.tolist(),
    }


# ------------------------------------------------------------------------------------------------
# Class tables
# ------------------------------------------------------------------------------------------------
def _hex_rgb(colour) -> Optional[Tuple[int, int, int]]:
    if not isinstance(colour, str):
        return None
    c = colour.strip().lstrip("#")
    if len(c) != 6:
        return None
    try:
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    except ValueError:
        return None


def _normalise_classes(entries, source: str) -> List[dict]:
    """Check a list of class entries; ids default to the position. Raises InputError naming ``source``."""
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{source}: the class table must hold a non-empty list 'classes'")
    out, ids, names = [], set(), set()
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or not str(e.get("name", "")).strip():
            raise InputError(f"{source}: class entry {i} has no 'name' ({e!r})")
        cid = e.get("id", i)
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid <= 254:
            raise InputError(f"{source}: class {e['name']!r} has id {cid!r}; ids are whole numbers 0..254 "
                             "(255 is nodata)")
        if cid in ids:
            raise InputError(f"{source}: class id {cid} is used twice")
        name = str(e["name"]).strip()
        if name.lower() in names:
            raise InputError(f"{source}: class name {name!r} is used twice")
        ids.add(cid)
        names.add(name.lower())
        value = e.get("values", e.get("value"))
        values = None if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])
        out.append({"id": cid, "name": name, "colour": e.get("colour") or e.get("color"),
                    "values": values})
    return out


def load_class_table(classes) -> Tuple[List[dict], Optional[Union[str, int]], list, str]:
    """A class table from a JSON file, a model file (``.srmf``), or a Python list/dict.

    The same file as fine-tuning's (:mod:`core.data`): ``{"classes": [{"name", "colour", "prompt",
    "value" | "values"}], "ignore": [values that mean unlabelled]}``, plus, for polygon references,
    ``"background"``: the class (name or id) of pixels covered by no polygon.

    Returns:
        ``(classes, background, ignore, source)``: classes = ``[{"id", "name", "colour", "values"}]``;
        background = the top-level ``background`` entry (class name or id) or None; ignore = list.

    Raises:
        InputError: missing or unreadable file, invalid JSON, a bad entry (named).
    """
    if isinstance(classes, (list, tuple)):
        return _normalise_classes(list(classes), "classes"), None, [], "classes"
    if isinstance(classes, dict):
        return (_normalise_classes(classes.get("classes"), "classes"), classes.get("background"),
                _as_list(classes.get("ignore")), "classes")
    p = Path(classes)
    if not p.is_file():
        raise InputError(f"Class table not found: {p}")
    if p.suffix.lower() == ".srmf":
        from .modelfile import read_header

        return _normalise_classes(read_header(p)["classes"], str(p)), None, [], str(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"Class table {p} is not readable JSON ({exc})") from exc
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise InputError(f"Class table {p}: expected an object {{\"classes\": [...]}}")
    return _normalise_classes(data.get("classes"), str(p)), data.get("background"), _as_list(data.get("ignore")), str(p)


def _as_list(v) -> list:
    return [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])


def _classes_from_raster(ds) -> Optional[List[dict]]:
    """Classes from a class raster's category names (and colour table), or None when it has none."""
    band = ds.GetRasterBand(1)
    band.GetNoDataValue()  # GDAL 3.6 GTiff: loads the .aux.xml (PAM); GetCategoryNames() alone does not
    names = band.GetCategoryNames() or []
    ct = band.GetColorTable()
    out = []
    for i, n in enumerate(names[:255]):
        if n and str(n).strip():
            colour = None
            if ct is not None and i < ct.GetCount():
                r, g, b = ct.GetColorEntry(i)[:3]
                colour = f"#{r:02X}{g:02X}{b:02X}"
            out.append({"id": i, "name": str(n).strip(), "colour": colour, "values": None})
    return out or None


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
    from .raster import open_raster

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
                cols = [v for v in (c["values"] or []) if _hex_rgb(v)] or ([c["colour"]] if _hex_rgb(c["colour"]) else [])
                for col in cols:
                    r, g, b = _hex_rgb(col)
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


def _parse_vector_source(path: str) -> Tuple[str, Optional[str], Optional[int]]:
    """``file|layername=NAME`` or ``file|layerid=N`` (QGIS layer sources) → (file, name, id)."""
    parts = str(path).split("|")
    name, lid = None, None
    for opt in parts[1:]:
        k, _, v = opt.partition("=")
        if k.strip().lower() == "layername":
            name = v
        elif k.strip().lower() == "layerid":
            try:
                lid = int(v)
            except ValueError:
                raise InputError(f"{path}: layerid must be a number, got {v!r}")
    return parts[0], name, lid


def _traditional(srs):
    s = srs.Clone()
    s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return s


def _open_reference_layer(path, field: str):
    """Open a polygon reference (``file`` or ``file|layername=NAME``) and find its class field.

    Returns:
        ``(dataset, layer, field name as spelled in the layer)`` (keep the dataset referenced).

    Raises:
        InputError: missing or unreadable file, no such layer, no such field (the fields are listed),
            an empty layer.
    """
    src, lname, lid = _parse_vector_source(str(path))
    if not os.path.exists(src) and not src.startswith("/vsi"):
        raise InputError(f"Reference layer not found: {src}")
    try:
        vds = gdal.OpenEx(src, gdal.OF_VECTOR)
    except RuntimeError as exc:
        raise InputError(f"The reference {src} is not a vector layer GDAL can read ({exc})") from exc
    if vds is None or vds.GetLayerCount() == 0:
        raise InputError(f"The reference {src} has no vector layer (--reference-field is for polygon layers)")
    if lname is not None:
        layer = vds.GetLayerByName(lname)
        if layer is None:
            raise InputError(f"The reference {src} has no layer named {lname!r}")
    else:
        if lid is not None and not 0 <= lid < vds.GetLayerCount():
            raise InputError(f"The reference {src} has no layer {lid}")
        layer = vds.GetLayer(lid or 0)
    defn = layer.GetLayerDefn()
    fields = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    match = [f for f in fields if f == field] or [f for f in fields if f.lower() == str(field).lower()]
    if not match:
        raise InputError(f"The reference layer {path} has no field {field!r}; its fields are: "
                         f"{', '.join(fields) or '(none)'}")
    if layer.GetFeatureCount() == 0:
        raise InputError(f"The reference layer {path} is empty (no polygons)")
    return vds, layer, match[0]


def _check_reference(reference_path, reference_field) -> None:
    """Fail early (before any segmentation) on a missing or wrong reference. Raises InputError."""
    if reference_field is not None:
        _open_reference_layer(reference_path, reference_field)
        return
    src = _parse_vector_source(str(reference_path))[0]
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
        lsrs = layer.GetSpatialRef()
        transform = None
        if lsrs is not None and psrs is not None and not lsrs.IsSame(psrs):
            transform = osr.CoordinateTransformation(_traditional(lsrs), _traditional(psrs))
            rep.log(f"reference {self.path}: polygons reprojected from {_crs_name(lsrs)} to the prediction's "
                    f"{_crs_name(psrs)}")
        elif (lsrs is None) != (psrs is None):
            rep.warning(f"reference {self.path}: {'the layer' if lsrs is None else 'the prediction'} has no CRS; "
                        "the polygons are assumed to be in the prediction's coordinates")
        # The class of a field value: explicit class-table values, then the name, then the id.
        def lookup(v):
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

        self.background = IGNORE
        if background is not None:
            bg = [i for i, c in enumerate(classes) if _same_value(background, c["name"]) or
                  (not isinstance(background, str) and _same_value(background, c["id"]))]
            if not bg:
                raise InputError(f"class table: background {background!r} is not one of the classes "
                                 f"({', '.join(c['name'] for c in classes)})")
            self.background = bg[0]
        drv = ogr.GetDriverByName("Memory")
        self.mem_ds = drv.CreateDataSource("evaluate_reference")
        self.mem = self.mem_ds.CreateLayer("reference", None, ogr.wkbUnknown)
        self.mem.CreateField(ogr.FieldDefn("cls", ogr.OFTInteger))
        mdefn = self.mem.GetLayerDefn()
        cache: Dict[Any, Optional[int]] = {}
        unknown: Dict[Any, int] = {}
        burnt = 0
        layer.ResetReading()
        for feat in layer:
            geom = feat.GetGeometryRef()
            if geom is None or geom.IsEmpty():
                continue
            v = feat.GetField(field) if feat.IsFieldSetAndNotNull(field) else None
            if v is None:
                unknown["NULL"] = unknown.get("NULL", 0) + 1
                continue
            key = v if not isinstance(v, str) else v.strip()
            if key not in cache:
                cache[key] = lookup(v)
            idx = cache[key]
            if idx is None:
                if not any(_same_value(v, i) for i in ignore):
                    unknown[key] = unknown.get(key, 0) + 1
                continue
            g = geom.Clone()
            if transform is not None:
                g.Transform(transform)
            out = ogr.Feature(mdefn)
            out.SetField("cls", int(idx))
            out.SetGeometry(g)
            self.mem.CreateFeature(out)
            burnt += 1
        layer.ResetReading()
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
    from .raster import crs_label

    return crs_label(srs) or "no CRS"


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def _csv_text(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["id", "name", "support", "frequency", "precision", "recall", "f1", "iou", "tail_class", "value"]
    w.writerow(cols)
    for pc in result["per_class"]:
        w.writerow([pc["id"], pc["name"], pc["support"], _fmt(pc["frequency"]), _fmt(pc["precision"]),
                    _fmt(pc["recall"]), _fmt(pc["f1"]), _fmt(pc["iou"]), _fmt(pc["tail"]), ""])
    for key in ("overall_accuracy", "kappa", "miou", "tail_miou", "mean_f1", "pixels_evaluated"):
        w.writerow(["", key, "", "", "", "", "", "", "", _fmt(result[key])])
    w.writerow(["", "tail_classes", "", "", "", "", "", "", "", ";".join(result["tail_classes"])])
    return buf.getvalue()


def _confusion_csv_text(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = [c["name"] for c in result["classes"]]
    cm = np.asarray(result["confusion_matrix"], dtype=np.int64).reshape(len(names), len(names))
    w.writerow(["reference \\ prediction", *names, "total"])
    for name, row in zip(names, cm):
        w.writerow([name, *row.tolist(), int(row.sum())])
    w.writerow(["total", *cm.sum(axis=0).tolist(), int(cm.sum())])
    return buf.getvalue()


def confusion_csv_path(csv_path) -> Path:
    """Where the confusion-matrix CSV goes beside the per-class CSV: ``NAME_confusion.csv``."""
    p = Path(csv_path)
    return p.with_name(f"{p.stem}_confusion{p.suffix or '.csv'}")


def _write_atomic(items: List[Tuple[Path, str]]) -> None:
    """Write every (path, text) to a temporary file beside it, then rename them all."""
    temps = []
    try:
        for path, text in items:
            fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.stem}.", suffix=".partial")
            temps.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.chmod(tmp, default_file_mode())
        for (path, _), tmp in zip(items, temps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


class _ScaledReporter:
    """Forwards to a reporter, mapping progress 0..1 onto ``lo..hi``."""

    def __init__(self, rep, lo: float, hi: float):
        self._rep, self._lo, self._hi = rep, lo, hi

    def progress(self, fraction: float, message: str = "") -> None:
        self._rep.progress(self._lo + (self._hi - self._lo) * max(0.0, min(1.0, fraction)), message)

    def __getattr__(self, name):
        return getattr(self._rep, name)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def evaluate_rasters(prediction_path, reference_path, *, reference_field: Optional[str] = None, classes=None,
                     model=None, output_json=None, output_csv=None, overwrite: bool = False, reporter=None,
                     device: str = "auto", bands: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Accuracy assessment of a class raster against a reference raster or polygon layer.

    Args:
        prediction_path: class raster (integer ids, nodata 255); with ``model``, an input image that
            is segmented first (with :func:`core.segment.segment_raster`, into a temporary file).
        reference_path: a class raster (resampled nearest onto the prediction's grid when the grids
            differ and both have a CRS; RGB rasters are decoded by class colour), or a polygon layer
            (``file`` or ``file|layername=NAME``) with ``reference_field``, rasterised onto the
            prediction's grid (reprojected when its CRS differs; pixel centres, later polygons win).
        reference_field: the class field of a polygon reference.
        classes: class table (JSON path, ``.srmf`` path, or a list of ``{"id","name","value",...}``);
            default: the model's, else the prediction's category names, else the ids that occur.
        model: ``.srmf`` path, "predict first". device, bands: passed to the segmentation.
        output_json, output_csv: where to write the result; with ``output_csv``, the confusion matrix
            goes to ``NAME_confusion.csv`` beside it. overwrite: replace existing outputs.
        reporter: a :class:`~core.protocol.Reporter`.

    Returns:
        JSON-able dict: ``overall_accuracy``, ``kappa``, ``miou``, ``tail_miou``, ``tail_classes``,
        ``mean_f1``, ``per_class`` [{id, name, precision, recall, f1, iou, support, predicted,
        frequency, tail}], ``confusion_matrix`` (rows reference, columns prediction, class-table
        order), ``classes`` [{id, name}], ``pixels_evaluated``, ``ignored_pixels``, ``json``, ``csv``,
        ``confusion_csv``, inputs and timing. Undefined metrics are None.

    Raises:
        InputError: missing/unreadable inputs, a missing field, sizes that differ without a CRS, a
            prediction value outside the class table, an existing output without ``overwrite``, ...
            Nothing is written then.
    """
    from .protocol import Reporter
    from .raster import check_output_path

    rep = reporter or Reporter(json_mode=False)
    t0 = time.perf_counter()
    # Outputs first: a refusal costs nothing.
    out_json = check_output_path(output_json, overwrite, "JSON output") if output_json else None
    out_csv = check_output_path(output_csv, overwrite, "CSV output") if output_csv else None
    out_cm = check_output_path(confusion_csv_path(out_csv), overwrite, "confusion-matrix CSV") if out_csv else None
    outs = [p for p in (out_json, out_csv, out_cm) if p is not None]
    if len({p.resolve() for p in outs}) != len(outs):
        raise InputError("--output-json and --output-csv must be different files")
    ref_file = _parse_vector_source(str(reference_path))[0]
    for p in outs:
        if p.resolve() in {Path(prediction_path).resolve(), Path(ref_file).resolve()}:
            raise InputError(f"The output {p} would overwrite an input")
    table, background, ignore = None, None, []
    if classes is not None:
        table, background, ignore, _ = load_class_table(classes)
    _check_reference(reference_path, reference_field)

    tmpdir = None
    try:
        if model is not None:
            from .modelfile import read_header
            from .segment import segment_raster

            if table is None:
                table = _normalise_classes(read_header(model)["classes"], str(model))
            tmpdir = tempfile.mkdtemp(prefix="srmf-evaluate-")
            pred_file = Path(tmpdir) / "prediction.tif"
            rep.log(f"segmenting {prediction_path} with {model} before evaluating")
            segment_raster(prediction_path, pred_file, model, device=device, bands=bands, overwrite=True,
                           reporter=_ScaledReporter(rep, 0.0, 0.8))
            eval_rep = _ScaledReporter(rep, 0.8, 1.0)
        else:
            pred_file = Path(prediction_path)
            eval_rep = rep
        result = _evaluate(pred_file, reference_path, reference_field, table, background, ignore, eval_rep)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    result.update({
        "prediction": str(prediction_path), "reference": str(reference_path), "reference_field": reference_field,
        "model": None if model is None else str(model),
        "json": str(out_json) if out_json else None, "csv": str(out_csv) if out_csv else None,
        "confusion_csv": str(out_cm) if out_cm else None,
        "seconds": round(time.perf_counter() - t0, 3),
    })
    result = _json_safe(result)
    items = []
    if out_json:
        items.append((out_json, json.dumps(result, indent=2) + "\n"))
    if out_csv:
        items.append((out_csv, _csv_text(result)))
        items.append((out_cm, _confusion_csv_text(result)))
    if items:
        _write_atomic(items)
    return result


def _evaluate(pred_file, reference_path, reference_field, table, background, ignore, rep) -> Dict[str, Any]:
    pred_ds = _open_raster(pred_file, "prediction")
    if pred_ds.RasterCount != 1:
        raise InputError(f"The prediction {pred_file} has {pred_ds.RasterCount} bands; a class raster has one "
                         "(to segment an image first, give --model)")
    pband = pred_ds.GetRasterBand(1)
    if not _is_integer_type(pband.DataType):
        raise InputError(f"The prediction {pred_file} is {gdal.GetDataTypeName(pband.DataType)}; a class raster "
                         "holds whole-number class ids (to segment an image first, give --model)")
    pred_classes = _classes_from_raster(pred_ds)
    raw_ids = False
    if table is None and pred_classes is not None:
        table = pred_classes
        rep.log(f"classes from the prediction's category names: {', '.join(c['name'] for c in table)}")
    elif table is not None and pred_classes is not None:
        named = {c["id"]: c["name"] for c in pred_classes}
        diff = [f"{c['id']}: {c['name']!r} vs {named[c['id']]!r}" for c in table
                if c["id"] in named and named[c["id"]].lower() != c["name"].lower()]
        if diff:
            rep.warning(f"the prediction {pred_file} names its classes differently from the class table "
                        f"(id: table vs prediction): {'; '.join(diff[:10])}")
        # Colours of the prediction for an RGB reference when the table has none.
        cols = {c["id"]: c["colour"] for c in pred_classes}
        for c in table:
            if not c.get("colour") and cols.get(c["id"]):
                c["colour"] = cols[c["id"]]
    if table is None:
        raw_ids = True
        table = [{"id": i, "name": f"class {i}", "colour": None, "values": None} for i in range(255)]
        rep.log("no class table (no --classes, no --model, no category names in the prediction): "
                "the class ids that occur are evaluated")
    K = len(table)
    W, H = pred_ds.RasterXSize, pred_ds.RasterYSize

    _check_reference(reference_path, reference_field)
    if reference_field is None:
        ref = _RasterReference(reference_path, pred_ds, table, ignore, rep)
    else:
        ref = _PolygonReference(reference_path, reference_field, pred_ds, table, background, ignore, rep)

    # Prediction id → class index (255 = not in the table).
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for idx, c in enumerate(table):
        lut[c["id"]] = idx
    pnd = pband.GetNoDataValue()
    cm = np.zeros((K, K), dtype=np.int64)
    bad: Dict[int, int] = {}
    ignored_pred = ignored_ref = 0
    rows = max(1, min(H, _STRIP_PIXELS // max(W, 1)))
    for y0 in range(0, H, rows):
        n = min(rows, H - y0)
        praw = pband.ReadAsArray(0, y0, W, n)
        pvalid = _valid(pband, praw, 0, y0, W, n)
        p = praw.astype(np.int64, copy=False)
        pok = p != IGNORE
        if pvalid is not None:
            pok &= pvalid
        if pnd is not None and not math.isnan(pnd):
            pok &= p != pnd
        out_of_range = pok & ((p < 0) | (p > 254))
        pidx = np.full(p.shape, IGNORE, dtype=np.uint8)
        inr = pok & ~out_of_range
        pidx[inr] = lut[p[inr]]
        not_in_table = out_of_range | (inr & (pidx == IGNORE))
        if not_in_table.any():
            vals, cnts = np.unique(p[not_in_table], return_counts=True)
            for v, c in zip(vals.tolist(), cnts.tolist()):
                bad[v] = bad.get(v, 0) + c
        r = ref.read(y0, n)
        ignored_pred += int((~pok).sum())
        ignored_ref += int(((r == IGNORE) & pok).sum())
        confusion_matrix(pidx, r, K, IGNORE, out=cm)
        rep.progress((y0 + n) / H, "evaluating")
    if bad:
        shown = ", ".join(f"{v} ({c} px)" for v, c in sorted(bad.items())[:10])
        known = ", ".join(f"{c['id']} {c['name']}" for c in table) if not raw_ids else "0..254"
        raise InputError(f"The prediction {pred_file} holds class ids that are not in the class table "
                         f"({known}): {shown}; give the matching class table with --classes")
    note = ref.unknown_note()
    if note:
        rep.warning(note)
    if raw_ids:
        keep = [k for k in range(K) if cm[k, :].any() or cm[:, k].any()]
        if not keep:
            raise InputError(f"No pixel to evaluate: every pixel of {pred_file} or of the reference is nodata "
                             "or ignored")
        table = [table[k] for k in keep]
        cm = cm[np.ix_(keep, keep)]
    metrics = metrics_from_confusion(cm, [c["name"] for c in table])
    if metrics["pixels_evaluated"] == 0:
        rep.warning(f"No pixel to evaluate: every pixel of {pred_file} or of the reference is nodata or ignored")
    per_class = []
    for c, pc in zip(table, metrics["per_class"]):
        per_class.append({"id": c["id"], "name": c["name"], "precision": pc["precision"], "recall": pc["recall"],
                          "f1": pc["f1"], "iou": pc["iou"], "support": pc["support"],
                          "predicted": pc["predicted"], "frequency": pc["frequency"], "tail": pc["tail"]})
    metrics["per_class"] = per_class
    metrics["classes"] = [{"id": c["id"], "name": c["name"]} for c in table]
    metrics["ignored_pixels"] = {"prediction_nodata": ignored_pred, "reference_nodata_or_unmapped": ignored_ref}
    metrics["width"], metrics["height"] = W, H
    metrics["rules"] = {
        "confusion_matrix": "rows = reference class, columns = predicted class, in the order of 'classes'",
        "miou": "mean IoU over classes present in the reference or the prediction (classes with zero "
                "support and zero predictions are excluded)",
        "tail": "tail classes: classes present in the reference whose pixel frequency is strictly below the "
                "median frequency of the classes present in the reference",
    }
    return metrics


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_evaluate_arguments(parser) -> None:
    """Add the ``evaluate`` arguments to an argparse (sub)parser."""
    parser.add_argument("prediction", help="predicted class raster (uint8 class ids, 255 = nodata); "
                                           "with --model, the image to segment first")
    parser.add_argument("reference", help="reference class raster, or polygon layer (with --reference-field)")
    parser.add_argument("--reference-field", default=None, help="class field of a polygon reference layer")
    parser.add_argument("--classes", default=None,
                        help="class table JSON {\"classes\": [{\"name\", \"colour\", \"prompt\", \"value\"}]} "
                             "(default: the model's, or the prediction's category names)")
    parser.add_argument("--model", default=None, help="segment PREDICTION (an image) with this model first")
    parser.add_argument("--device", default="auto", help="with --model: auto, cpu, cuda or cuda:N")
    parser.add_argument("--bands", default=None, help="with --model: 1-based input bands in the model's order")
    parser.add_argument("--output-json", default=None, help="write the result as JSON")
    parser.add_argument("--output-csv", default=None,
                        help="write the per-class table as CSV (and the confusion matrix to NAME_confusion.csv)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--json", action="store_true", help="print JSON lines (progress, log, result, error)")


def format_table(result: dict) -> str:
    """A readable text report of an evaluation result."""
    def f(v, w=9):
        return f"{'-':>{w}s}" if v is None else f"{v:>{w}.4f}"

    lines = [f"Evaluated {result['pixels_evaluated']} pixels: {result.get('prediction')} vs {result.get('reference')}"]
    lines.append(f"{'class':<20s} {'support':>10s} {'freq':>7s} {'precision':>9s} {'recall':>9s} {'F1':>9s} {'IoU':>9s}")
    for pc in result["per_class"]:
        name = pc["name"] + (" *" if pc["tail"] else "")
        lines.append(f"{name:<20s} {pc['support']:>10d} {pc['frequency']:>7.3f} {f(pc['precision'])} "
                     f"{f(pc['recall'])} {f(pc['f1'])} {f(pc['iou'])}")
    lines.append(f"overall accuracy {f(result['overall_accuracy'], 0)}   kappa {f(result['kappa'], 0)}   "
                 f"mIoU {f(result['miou'], 0)}   tail mIoU {f(result['tail_miou'], 0)}")
    lines.append("* tail classes (reference frequency below the median): " + (", ".join(result["tail_classes"]) or "none"))
    lines.append("confusion matrix (rows reference, columns prediction):")
    names = [c["name"][:10] for c in result["classes"]]
    lines.append(f"{'':<12s}" + "".join(f"{n:>12s}" for n in names))
    for n, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{n:<12s}" + "".join(f"{v:>12d}" for v in row))
    for key, label in (("json", "JSON"), ("csv", "CSV"), ("confusion_csv", "confusion CSV")):
        if result.get(key):
            lines.append(f"Wrote {label}: {result[key]}")
    return "\n".join(lines)


def run_evaluate_command(args, reporter) -> dict:
    """Run ``evaluate`` from parsed arguments (see :func:`add_evaluate_arguments`); reports the result."""
    from .raster import parse_bands

    result = evaluate_rasters(args.prediction, args.reference, reference_field=args.reference_field,
                              classes=args.classes, model=args.model, output_json=args.output_json,
                              output_csv=args.output_csv, overwrite=args.overwrite, reporter=reporter,
                              device=getattr(args, "device", "auto"),
                              bands=parse_bands(getattr(args, "bands", None)))
    reporter.result(result, text=format_table(result))
    return result
