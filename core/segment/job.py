"""Streaming sliding-window segmentation of rasters of any size (SRMF inference).

SRMF's inference (mmsegmentation ``slide_inference``): windows of ``window`` pixels on a grid of step
``stride`` (the last row and column shifted so they end at the raster's border), logits of each
window upsampled bilinearly to the window, summed over overlaps and divided by the number of windows
that cover each pixel, then argmax. Here the raster is read strip by strip (one strip = the rows of one
row of windows): only the ``window`` rows in flight are held (logit accumulator K × window × width on
the compute device), finished rows are written at once. Memory is bounded by the strip, not the raster.

Nodata: a pixel that is nodata in every selected band is nodata (255) in the output; its input value
is replaced by the model's mean (0 after normalisation) so it adds nothing to its neighbours; windows
that are entirely nodata are skipped.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
import numpy as np
import torch
from core.errors import InputError
from core.segment.polygons import min_pixels as polygon_unit, write_class_polygons
from core.segment.resolution import parse_resolution, processing_grid, resampled_view
from core.windows import (RowBlock, SlidePlan, WindowPredictor, check_inference_args, open_inference,
                          stream_segmentation)
GDAL_CACHE_BYTES = 64 * 1024 * 1024  # a row of 256-px output tiles at 16k width is 4 MiB per band
PROBABILITY_SCALE = 250  # uint8 probability = round(p * 250); 255 = nodata; GDAL scale 1/250


def class_areas(ds, counts: np.ndarray, classes: Sequence[dict]) -> Tuple[List[dict], Optional[str]]:
    """Per-class pixel counts and areas (m², ha) from the geotransform and CRS.

    Returns:
        ``(rows, note)``: one row per class ``{id, name, pixels, area_m2, area_ha}`` (areas ``None``
        when the CRS is geographic or missing, with ``note`` saying why).
    """
    gt = ds.GetGeoTransform(can_return_null=True)
    srs = ds.GetSpatialRef()
    pixel_m2, note = None, None
    if gt is None or srs is None:
        note = "the raster has no CRS/geotransform: areas are given in pixels only"
    elif srs.IsGeographic():
        note = ("the raster's CRS is geographic (degrees): areas in m² would be wrong, so they are left "
                "out; reproject to a projected CRS for areas")
    else:
        from core.geo.raster import ground_scale

        k = ground_scale(ds)
        pixel_m2 = abs(gt[1] * gt[5] - gt[2] * gt[4]) * (srs.GetLinearUnits() * k) ** 2
        if k != 1.0:
            note = (f"areas in m² corrected for the projection's scale at the raster's centre (one CRS metre is "
                    f"{k:.4f} m on the ground there; the scale varies across a large raster)")
    rows = []
    for c in classes:
        n = int(counts[int(c["id"])])
        a = None if pixel_m2 is None else n * pixel_m2
        rows.append({"id": int(c["id"]), "name": c["name"], "pixels": n,
                     "area_m2": a, "area_ha": None if a is None else a / 1e4})
    return rows, note


def segment_raster(input_path, output_path, model=None, *, window: Optional[int] = None,
                   stride: Optional[int] = None, batch_size: Optional[int] = None, device: str = "auto",
                   bands: Optional[Sequence[int]] = None, probabilities=None, overwrite: bool = False,
                   reporter=None, prefetch: bool = True, precision: str = "auto", resolution="auto",
                   pixel_size: Optional[float] = None, tta: bool = False, extent=None, mask=None,
                   polygons=None, min_area_m2: Optional[float] = None, min_pixels: Optional[int] = None,
                   simplify: Optional[float] = None) -> dict:
    """Segment a raster with an SRMF model into a class raster (the ``segment`` command).

    Args:
        input_path: any raster GDAL reads. output_path: the class GeoTIFF to write (uint8, 255 nodata).
        model: a ``.srmf`` path or a :class:`~core.model.modelfile.LoadedModel`; ``None`` = the embedded default.
        window, stride: pixels (default: the model header's inference window and stride).
        batch_size: windows per forward (default: the device's, :data:`core.device.DEFAULT_BATCH`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. bands: 1-based input bands in the model's order.
        probabilities: optional path of a per-class probability GeoTIFF (uint8, p·250, nodata 255).
        overwrite: replace existing outputs. reporter: a :class:`~core.protocol.Reporter`.
        prefetch: read the next strip while the current one is computed.
        precision: ``auto``, ``fp32`` or ``bf16`` (:mod:`core.execution`).
        resolution: ``auto`` (process at the model's GSD when the raster's pixels are more than 1.5x off
            it), ``native`` or a processing GSD in metres (:mod:`core.segment.resolution`); the output is
            always on the input's grid. pixel_size: metres, for a raster without georeferencing.
        tta: test-time augmentation (flips and quarter turns of every window, logits averaged; 8 times
            the compute).
        extent, mask: the area of interest (:mod:`core.geo.aoi`): ``"xmin,ymin,xmax,ymax[,CRS]"`` and/or a
            polygon layer; the outputs then cover the area's bounding box on the input's pixel grid, and
            pixels outside the mask's polygons are nodata.
        polygons: also write the class polygons to this GeoPackage (:mod:`core.segment.polygons`), sieved to a
            minimum mapping unit of ``min_area_m2`` square metres or ``min_pixels`` pixels, and simplified
            (``simplify`` pixels: coverage simplification, shared edges kept) when given.

    Returns:
        A JSON-able dict: output paths, size, CRS, classes with pixel counts and areas, timings.

    Raises:
        InputError / ModelFileError: bad input, named; nothing is left under the output names.
    """
    from core.protocol import Reporter

    rep = reporter or Reporter(json_mode=False)
    t_start = time.perf_counter()
    _limit_gdal_cache()
    # Parameters first: a wrong value fails at once, before the model or the raster is opened.
    check_inference_args(window, stride, batch_size, precision)
    parse_resolution(resolution)
    out, prob = _check_outputs(input_path, output_path, probabilities, overwrite)
    poly = _check_polygons(polygons, out, prob, overwrite)
    ds, aoi = _open_input(input_path, [out, prob, poly], extent, mask, rep)
    threshold = 0 if poly is None else polygon_unit(ds, min_area_m2, min_pixels, simplify)
    job = open_inference(ds, input_path, model, window=window, stride=stride, batch_size=batch_size,
                         device=device, bands=bands, rep=rep, precision=precision,
                         untrained_note="its classes are not meaningful. Use a trained model (--model) or fine-tune one.")
    job, grid, why = _at_resolution(job, ds, resolution, pixel_size, rep)
    reader, predictor = _reader_and_predictor(job, ds, input_path, aoi, tta, rep)
    counts = np.zeros(256, dtype=np.int64)
    outputs = []
    try:
        cls_out, prob_out = _open_outputs(out, prob, ds, job.lm.classes, job.lm.num_classes, outputs)
        inp = job.input
        K = job.lm.num_classes
        write = _row_writer(cls_out, prob_out, counts, K)
        if grid is None:
            stats = stream_segmentation(reader.read, job.plan, predictor, K, inp["mean"], inp["std"], job.batch, write,
                                        progress=lambda f: rep.progress(f, "segmenting"), prefetch=prefetch)
        else:
            stats = _segment_resampled(job, reader, predictor, ds, input_path, out, grid, write, rep, prefetch, aoi)
        for o in outputs:  # all closed (a full disk fails here) before any is published: all or none
            o.close()
        if poly is not None:  # from the finished class raster, before it is published
            stats["polygons"] = write_class_polygons(cls_out.tmp, poly, job.lm.classes, threshold, rep, simplify)
        for o in outputs:
            o.publish()
    except BaseException:
        for o in outputs:
            o.discard()
        raise
    stats.update(precision=predictor.precision.name, precision_agreement=predictor.run.agreement, tta=bool(tta),
                 processing=_processing(grid, why),
                 area_of_interest=None if aoi is None else {"window": list(aoi.window), "source": aoi.source})
    return _result(job, ds, out, prob, counts, stats, rep, t_start)


def _reader_and_predictor(job, ds, input_path, aoi, tta: bool, rep):
    """The job's strip reader (masked by the area of interest's polygons) and its window predictor, logged."""
    from core.geo import web

    reader = job.strip_reader(rep)
    if web.from_web(ds):
        web.retry_reads(reader, input_path)
    if aoi is not None:
        reader = aoi.masked(reader, job.ds)
    _log_job(job, ds, input_path, reader.masked, rep)
    if tta:
        rep.log("test-time augmentation: every window also flipped and turned (8 views, logits averaged)")
    return reader, WindowPredictor(job.lm.model, job.device, job.precision, rep.log, tta=tta)


def _check_polygons(polygons, out: Path, prob: Optional[Path], overwrite: bool) -> Optional[Path]:
    """The ``--polygons`` GeoPackage path, checked as the other outputs are (None when not asked for)."""
    from core.geo.raster import check_output_path

    if not polygons:
        return None
    poly = check_output_path(polygons, overwrite, "polygons")
    if poly.suffix.lower() != ".gpkg":
        raise InputError(f"--polygons must be a GeoPackage (.gpkg), got {poly}")
    if poly.resolve() in {out.resolve(), prob.resolve() if prob else None}:
        raise InputError("--polygons must differ from the other outputs")
    return poly


def _open_input(input_path, outputs, extent, mask, rep):
    """The raster to segment (:func:`~core.geo.raster.open_image`), refused when an output is a file it reads,
    and its area of interest (:func:`~core.geo.aoi.area_of_interest`): ``(dataset, aoi or None)`` — with an
    area, the dataset is the virtual subset of the input's grid that covers it."""
    from core.geo import web
    from core.geo.aoi import area_of_interest
    from core.geo.raster import check_not_read, open_image

    ds = open_image(input_path, rep.log)
    check_not_read(outputs, [(ds, input_path)])
    aoi = area_of_interest(ds, input_path, extent, mask, rep.log)
    web.check_area(ds, input_path, aoi)
    if aoi is None:
        return ds, None
    rep.log(aoi.describe(ds.RasterXSize, ds.RasterYSize))
    return (web.mark(aoi.subset(ds)) if web.is_web(ds) else aoi.subset(ds)), aoi


def _at_resolution(job, ds, resolution, pixel_size, rep):
    """The job on the grid ``--resolution`` asks for (:func:`~core.segment.resolution.processing_grid`):
    ``(job, grid, why)``; with a grid the network runs on a resampled view (the outputs stay on the input's
    grid), without one on the raster's pixels, with a warning when they are far off the model's GSD."""
    from core.geo.raster import pixel_size_m, resolution_warning

    grid, why = processing_grid(ds, resolution, job.lm.header.get("gsd_m"), pixel_size)
    rep.log(why)
    if grid is not None:
        return (dataclasses.replace(job, ds=resampled_view(ds, grid),
                                    plan=SlidePlan(grid.height, grid.width, job.window, job.stride)), grid, why)
    gsd_note = resolution_warning(pixel_size_m(ds), job.lm.header.get("gsd_m"))
    if gsd_note:
        rep.log(gsd_note, "warning")
    return job, None, why


def _processing(grid, why: str) -> dict:
    """The result's ``processing``: the grid the network ran on (None: the raster's own pixels) and why."""
    if grid is None:
        return {"resampled": False, "note": why}
    return {"resampled": True, "gsd_m": round(grid.gsd_m, 6), "raster_gsd_m": round(grid.raster_gsd_m, 6),
            "width": grid.width, "height": grid.height, "resampling": grid.resampling, "note": why}


def _segment_resampled(job, reader, predictor, ds, input_path, out: Path, grid, write, rep, prefetch: bool,
                       aoi=None) -> dict:
    """Resolution-aware inference (:mod:`core.segment.resolution`). Pass 1 streams the windows over the
    resampled view and writes their averaged logits (float32, K bands, NaN = no vote or nodata) to a
    temporary GeoTIFF on the processing grid; pass 2 reads them back strip by strip, resampled bilinearly
    onto the input's grid (GDAL), and hands each strip to ``write`` with the input's own nodata; a valid
    pixel whose bilinear kernel touches a nodata logit takes its nearest processing pixel's logits instead
    (nodata only when that one is nodata too). Memory stays bounded by a strip in both passes; the temporary file is removed at the end."""
    from osgeo import gdal

    from core.geo.raster import GTIFF_OPTIONS, AtomicGeoTIFF

    K, view = job.lm.num_classes, job.ds
    logits = AtomicGeoTIFF(out.with_name(out.stem + "-logits.tif"), None, K, gdal.GDT_Float32,
                           list(GTIFF_OPTIONS) + ["PREDICTOR=3"], size=(grid.width, grid.height),
                           geotransform=view.GetGeoTransform(can_return_null=True), srs=view.GetSpatialRef())
    try:  # the temporary logits are removed whatever happens
        return _two_passes(job, reader, predictor, ds, input_path, grid, write, rep, prefetch, aoi, logits)
    finally:
        logits.discard()


def _two_passes(job, reader, predictor, ds, input_path, grid, write, rep, prefetch, aoi, logits) -> dict:
    """The two passes of :func:`_segment_resampled` through the temporary GeoTIFF ``logits``."""
    from osgeo import gdal

    from core.geo import web
    from core.geo.failures import reading
    from core.geo.raster import BandScaling, StripReader

    K, inp = job.lm.num_classes, job.input
    for k in range(K):
        logits.band(k + 1).SetNoDataValue(float("nan"))

    def keep_logits(y0: int, block: RowBlock) -> None:
        lg = block.logits()
        if block.valid is not None:
            lg[:, ~torch.from_numpy(block.valid).to(lg.device)] = float("nan")
        lg = lg.cpu().numpy()
        for k in range(K):
            logits.write(k + 1, lg[k], 0, y0)

    stats = stream_segmentation(reader.read, job.plan, predictor, K, inp["mean"], inp["std"], job.batch, keep_logits,
                                progress=lambda f: rep.progress(0.9 * f, "segmenting"), prefetch=prefetch)
    logits.close()
    W, H = ds.RasterXSize, ds.RasterYSize
    src = gdal.Open(logits.tmp)
    back = gdal.Translate("", src, format="VRT", width=W, height=H, resampleAlg="bilinear")
    near = gdal.Translate("", src, format="VRT", width=W, height=H, resampleAlg="nearest")
    native = StripReader(ds, job.bands, BandScaling(np.zeros(len(job.bands)), np.full(len(job.bands), 255.0),
                                                    0.0, 255.0, True, []), name=input_path)
    if web.from_web(ds):  # the input's own pixels again (its mask): the same server
        web.retry_reads(native, input_path)
    if aoi is not None:
        native = aoi.masked(native, ds)
    rows = max(1, min(H, (32 << 20) // max(1, 4 * K * W)))
    for y0 in range(0, H, rows):
        n = min(rows, H - y0)
        with reading(logits.tmp, "temporary logit raster"):
            lg = back.ReadAsArray(0, y0, W, n).reshape(K, n, W)
        valid = native.read(y0, n)[1] if native.masked else None
        finite = np.isfinite(lg).all(0)
        gap = ~finite if valid is None else (~finite & valid)
        if gap.any():  # valid here, but the bilinear kernel met a nodata neighbour: the pixel's own logits
            with reading(logits.tmp, "temporary logit raster"):
                lg[:, gap] = near.ReadAsArray(0, y0, W, n).reshape(K, n, W)[:, gap]
            finite = np.isfinite(lg).all(0)
        acc = torch.from_numpy(np.where(finite, lg, 0.0).astype(np.float32))
        write(y0, RowBlock(acc, torch.from_numpy(finite.astype(np.float32)), valid))
        rep.progress(0.9 + 0.1 * (y0 + n) / H, "writing on the input's grid")
    return stats


def _limit_gdal_cache() -> None:
    """Finished rows are written as they come; a small block cache keeps GDAL from holding the whole
    output raster in memory until the end (its default is 5 % of RAM)."""
    from osgeo import gdal

    if gdal.GetCacheMax() > GDAL_CACHE_BYTES:
        gdal.SetCacheMax(GDAL_CACHE_BYTES)


def _log_job(job, ds, input_path, masked: bool, rep) -> None:
    lm, view = job.lm, job.ds
    at = "" if view is ds else f" (processed at {view.RasterXSize} x {view.RasterYSize} px)"
    rep.log(f"{input_path}: {ds.RasterXSize} x {ds.RasterYSize} px{at}, bands {job.bands}, "
            f"{job.plan.n_windows} windows of {job.window} px (stride {job.stride}), model {lm.path.name} "
            f"({lm.header['architecture']['backbone']}, {lm.num_classes} classes) on {job.device}, "
            f"{job.batch} windows per batch, {job.precision.reason}" + (", nodata masked" if masked else ""))


def _check_outputs(input_path, output_path, probabilities, overwrite: bool) -> Tuple[Path, Optional[Path]]:
    """The class and probability output paths, checked (writable, not the input, not each other)."""
    from core.geo.raster import check_output_path

    out = check_output_path(output_path, overwrite)
    prob = check_output_path(probabilities, overwrite, "probabilities") if probabilities else None
    if Path(input_path).resolve() in {out.resolve(), prob.resolve() if prob else None}:
        raise InputError(f"The output {output_path} would overwrite the input raster")
    if prob is not None and prob.resolve() == out.resolve():
        raise InputError("--probabilities must differ from the output path")
    return out, prob


def _open_outputs(out: Path, prob: Optional[Path], ds, classes: Sequence[dict], K: int, outputs: list):
    """The class GeoTIFF (styled) and the optional probability GeoTIFF (K bands, p·250), written under
    temporary names; each is appended to ``outputs`` as soon as it exists. Returns ``(cls_out, prob_out)``."""
    from core.geo.raster import AtomicGeoTIFF, style_class_band

    cls_out = AtomicGeoTIFF(out, ds, 1)
    outputs.append(cls_out)
    style_class_band(cls_out.band(1), classes)
    prob_out = None
    if prob is not None:
        prob_out = AtomicGeoTIFF(prob, ds, K)
        outputs.append(prob_out)
        for c in classes:
            b = prob_out.band(int(c["id"]) + 1)
            b.SetDescription(f"probability of {c['name']}")
            b.SetNoDataValue(255)
            b.SetScale(1.0 / PROBABILITY_SCALE)
            b.SetOffset(0.0)
    return cls_out, prob_out


def _row_writer(cls_out, prob_out, counts: np.ndarray, K: int):
    """The ``on_rows`` of :func:`~core.windows.stream_segmentation`: writes the finished rows' classes
    (and probabilities) and adds their class pixel counts to ``counts`` (int64 (256,))."""

    def on_rows(y0: int, block: RowBlock) -> None:
        cls = block.classes()
        arr = cls.cpu().numpy()
        cls_out.write(1, arr, 0, y0)
        counts[:] += np.bincount(arr.ravel(), minlength=256)
        if prob_out is not None:
            p = torch.softmax(torch.nan_to_num(block.logits(), nan=0.0), dim=0)
            q = torch.round(p * PROBABILITY_SCALE).to(torch.uint8)
            q[:, cls == 255] = 255
            q = q.cpu().numpy()
            for k in range(K):
                prob_out.write(k + 1, q[k], 0, y0)

    return on_rows


def _result(job, ds, out: Path, prob: Optional[Path], counts: np.ndarray, stats: dict, rep, t_start: float) -> dict:
    """The JSON-able result of :func:`segment_raster` (class areas logged when they have a note); timed
    from ``t_start`` (``time.perf_counter()``)."""
    from core.geo.raster import crs_label

    lm = job.lm
    areas, area_note = class_areas(ds, counts, lm.classes)
    if area_note:
        rep.log("areas: " + area_note)
    seconds = time.perf_counter() - t_start
    mp = ds.RasterXSize * ds.RasterYSize / 1e6
    srs = ds.GetSpatialRef()
    return {
        "output": str(out), "probabilities": str(prob) if prob else None,
        "polygons": stats.pop("polygons", None),
        "model": str(lm.path), "untrained_model": lm.untrained,
        "width": ds.RasterXSize, "height": ds.RasterYSize,
        "crs": crs_label(srs),
        "bands": job.bands, "window": job.window, "stride": job.stride, "device": str(job.device),
        "batch_size": job.batch,
        "classes": [{"id": int(c["id"]), "name": c["name"], "colour": c.get("colour")} for c in lm.classes],
        "class_areas": areas, "area_note": area_note, "nodata_pixels": int(counts[255]),
        **stats, "seconds": round(seconds, 3), "megapixels_per_second": round(mp / max(seconds, 1e-9), 3),
    }
