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

The class table (``--classes``, the same file as fine-tuning's, :class:`core.classtable.ClassTable`): JSON
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

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence
import numpy as np
from osgeo import gdal
from core.errors import InputError
gdal.UseExceptions()
from core.evaluate.reference import (IGNORE, _PolygonReference, _RasterReference, _STRIP_PIXELS, _check_reference,
                                     _is_integer_type, _open_raster, _valid)
from core.geo.failures import reading
from core.geo.vector import parse_vector_source
from core.evaluate.report import _confusion_csv_text, _csv_text, _json_safe, _write_atomic, confusion_csv_path
from core.metrics import confusion_matrix, metrics_from_confusion
from core.classtable import reference_classes, classes_from_raster, read_reference_classes


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
                     device: str = "auto", bands: Optional[Sequence[int]] = None,
                     precision: str = "auto") -> Dict[str, Any]:
    """Accuracy assessment of a class raster against a reference raster or polygon layer.

    Args:
        prediction_path: class raster (integer ids, nodata 255); with ``model``, an input image that
            is segmented first (with :func:`core.segment.job.segment_raster`, into a temporary file).
        reference_path: a class raster (resampled nearest onto the prediction's grid when the grids
            differ and both have a CRS; RGB rasters are decoded by class colour), or a polygon layer
            (``file`` or ``file|layername=NAME``) with ``reference_field``, rasterised onto the
            prediction's grid (reprojected when its CRS differs; pixel centres, later polygons win).
        reference_field: the class field of a polygon reference.
        classes: class table (JSON path, ``.srmf`` path, or a list of ``{"id","name","value",...}``);
            default: the model's, else the prediction's category names, else the ids that occur.
        model: ``.srmf`` path, "predict first". device, bands, precision: passed to the segmentation.
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
    from core.protocol import Reporter

    rep = reporter or Reporter(json_mode=False)
    t0 = time.perf_counter()
    # Outputs first: a refusal costs nothing.
    out_json, out_csv, out_cm = _check_outputs(prediction_path, reference_path, output_json, output_csv, overwrite)
    table, background, ignore = None, None, []
    if classes is not None:
        table, background, ignore, _ = read_reference_classes(classes)
    _check_reference(reference_path, reference_field)
    result = _predict_and_evaluate(prediction_path, reference_path, reference_field, table, background, ignore,
                                   model, device, bands, rep, precision)
    result.update({
        "prediction": str(prediction_path), "reference": str(reference_path), "reference_field": reference_field,
        "model": None if model is None else str(model),
        "json": str(out_json) if out_json else None, "csv": str(out_csv) if out_csv else None,
        "confusion_csv": str(out_cm) if out_cm else None,
        "seconds": round(time.perf_counter() - t0, 3),
    })
    result = _json_safe(result)
    _write_reports(result, out_json, out_csv, out_cm)
    return result


def _check_outputs(prediction_path, reference_path, output_json, output_csv, overwrite: bool):
    """The JSON, CSV and confusion-matrix CSV outputs (None when not asked for), checked before any work.

    Raises:
        InputError: an output exists without ``overwrite``, two outputs are one file, an output is an input.
    """
    from core.geo.raster import check_not_read, check_output_path

    out_json = check_output_path(output_json, overwrite, "JSON output") if output_json else None
    out_csv = check_output_path(output_csv, overwrite, "CSV output") if output_csv else None
    out_cm = check_output_path(confusion_csv_path(out_csv), overwrite, "confusion-matrix CSV") if out_csv else None
    outs = [p for p in (out_json, out_csv, out_cm) if p is not None]
    if len({p.resolve() for p in outs}) != len(outs):
        raise InputError("--output-json and --output-csv must be different files")
    ref_file = parse_vector_source(str(reference_path))[0]
    check_not_read(outs, [(_opened(f), f) for f in (prediction_path, ref_file)])
    return out_json, out_csv, out_cm


def _opened(path):
    """``path`` opened by GDAL (raster or vector) to list the files it reads, or None when it cannot be
    (the input's own check names the problem later)."""
    try:
        return gdal.OpenEx(str(path))
    except RuntimeError:
        return None


def _predict_and_evaluate(prediction_path, reference_path, reference_field, table, background, ignore,
                          model, device, bands, rep, precision: str = "auto") -> Dict[str, Any]:
    """With ``model``, segment ``prediction_path`` into a temporary class raster first (80 % of the
    progress), then :func:`_evaluate`; the temporary folder is always removed."""
    tmpdir = None
    try:
        if model is not None:
            from core.model.modelfile import read_header
            from core.segment.job import segment_raster

            if table is None:
                table = reference_classes(read_header(model)["classes"], str(model))
            tmpdir = tempfile.mkdtemp(prefix="srmf-evaluate-")
            pred_file = Path(tmpdir) / "prediction.tif"
            rep.log(f"segmenting {prediction_path} with {model} before evaluating")
            segment_raster(prediction_path, pred_file, model, device=device, precision=precision, bands=bands,
                           overwrite=True,
                           reporter=_ScaledReporter(rep, 0.0, 0.8))
            eval_rep = _ScaledReporter(rep, 0.8, 1.0)
        else:
            pred_file = Path(prediction_path)
            eval_rep = rep
        return _evaluate(pred_file, reference_path, reference_field, table, background, ignore, eval_rep)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _write_reports(result: dict, out_json, out_csv, out_cm) -> None:
    """Write the asked-for JSON / CSV reports, all or none (:func:`core.evaluate.report._write_atomic`)."""
    items = []
    if out_json:
        items.append((out_json, json.dumps(result, indent=2) + "\n"))
    if out_csv:
        items.append((out_csv, _csv_text(result)))
        items.append((out_cm, _confusion_csv_text(result)))
    if items:
        _write_atomic(items)


RULES = {
    "confusion_matrix": "rows = reference class, columns = predicted class, in the order of 'classes'",
    "miou": "mean IoU over classes present in the reference or the prediction (classes with zero "
            "support and zero predictions are excluded)",
    "tail": "tail classes: classes present in the reference whose pixel frequency is strictly below the "
            "median frequency of the classes present in the reference",
}
"""How the figures are defined: returned with every result (``result["rules"]``)."""


def _evaluate(pred_file, reference_path, reference_field, table, background, ignore, rep) -> Dict[str, Any]:
    """Confusion matrix and metrics of the class raster ``pred_file`` against the reference, strip by strip."""
    pred_ds, pband = _open_prediction(pred_file)
    table, raw_ids = _resolve_table(table, classes_from_raster(pred_ds), pred_file, rep)
    K = len(table)
    if reference_field is None:
        ref = _RasterReference(reference_path, pred_ds, table, ignore, rep)
    else:
        ref = _PolygonReference(reference_path, reference_field, pred_ds, table, background, ignore, rep)
    cm, bad, ignored_pred, ignored_ref = _accumulate(pband, ref, table, pred_ds.RasterXSize, pred_ds.RasterYSize, rep,
                                                     pred_file)
    if bad:
        shown = ", ".join(f"{v} ({c} px)" for v, c in sorted(bad.items())[:10])
        known = ", ".join(f"{c['id']} {c['name']}" for c in table) if not raw_ids else "0..254"
        raise InputError(f"The prediction {pred_file} holds class ids that are not in the class table "
                         f"({known}): {shown}; give the matching class table with --classes")
    note = ref.unknown_note()
    if note:
        rep.warning(note)
    if not cm.any():  # issue 13: metrics full of nulls with exit 0 said nothing about the cause
        raise InputError(f"No pixel to evaluate: the reference {reference_path} and the prediction {pred_file} "
                         f"share no valid pixel — they do not overlap, or every shared pixel is nodata or ignored "
                         f"({ignored_pred} prediction nodata, {ignored_ref} reference nodata or unmapped)")
    if raw_ids:
        keep = [k for k in range(K) if cm[k, :].any() or cm[:, k].any()]
        if not keep:
            raise InputError(f"No pixel to evaluate: every pixel of {pred_file} or of the reference is nodata "
                             "or ignored")
        table = [table[k] for k in keep]
        cm = cm[np.ix_(keep, keep)]
    metrics = _metrics(cm, table, pred_file, rep)
    metrics["ignored_pixels"] = {"prediction_nodata": ignored_pred, "reference_nodata_or_unmapped": ignored_ref}
    metrics["width"], metrics["height"] = pred_ds.RasterXSize, pred_ds.RasterYSize
    metrics["rules"] = RULES
    return metrics


def _open_prediction(pred_file):
    """(dataset, band 1) of a one-band integer class raster. Raises InputError otherwise."""
    pred_ds = _open_raster(pred_file, "prediction")
    if pred_ds.RasterCount != 1:
        raise InputError(f"The prediction {pred_file} has {pred_ds.RasterCount} bands; a class raster has one "
                         "(to segment an image first, give --model)")
    pband = pred_ds.GetRasterBand(1)
    if not _is_integer_type(pband.DataType):
        raise InputError(f"The prediction {pred_file} is {gdal.GetDataTypeName(pband.DataType)}; a class raster "
                         "holds whole-number class ids (to segment an image first, give --model)")
    return pred_ds, pband


def _resolve_table(table, pred_classes, pred_file, rep):
    """The class table to evaluate with: the given one (warning on names that differ from the prediction's
    category names, colours filled from its colour table), else the prediction's categories, else every id
    0..254 (``raw_ids``: the ids that occur are kept afterwards). Returns ``(table, raw_ids)``."""
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
    return table, raw_ids


def _accumulate(pband, ref, table, W: int, H: int, rep, pred_path="the prediction"):
    """Read the prediction and the reference strip by strip into a (K, K) int64 confusion matrix.

    Returns:
        ``(cm, bad, ignored_pred, ignored_ref)``: bad = {prediction id not in the table: pixels}.
    """
    K = len(table)
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
        with reading(pred_path, "prediction raster"):
            pidx, pok = _prediction_strip(pband, y0, n, W, pnd, lut, bad)
        r = ref.read(y0, n)
        ignored_pred += int((~pok).sum())
        ignored_ref += int(((r == IGNORE) & pok).sum())
        confusion_matrix(pidx, r, K, IGNORE, out=cm)
        rep.progress((y0 + n) / H, "evaluating")
    return cm, bad, ignored_pred, ignored_ref


def _prediction_strip(pband, y0: int, n: int, W: int, pnd, lut: np.ndarray, bad: Dict[int, int]):
    """Rows ``y0..y0+n`` of the prediction as class indices (uint8, 255 = nodata or not in the table) and
    the mask of valid prediction pixels; ids not in the table are counted into ``bad``."""
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
    return pidx, pok


def _metrics(cm: np.ndarray, table, pred_file, rep) -> Dict[str, Any]:
    """:func:`core.metrics.metrics_from_confusion` with the class ids of the table."""
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
    return metrics
