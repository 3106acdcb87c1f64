"""The fault tier (issue 13): awkward inputs built from the real rasters of ../shared/data, each checked for
its exit code, its message, and that no confident wrong map comes out. First cases: pixel values whose
meaning the metadata does not state (NaN/inf with no nodata tag, palette indices, an unused 4th band)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from osgeo import gdal

from conftest import ADELAIDE
from core.protocol import Reporter
from core.segment.job import segment_raster


def _segment(src, out, log, resolution="native"):
    """The default model on ``src``; at the raster's own pixels unless ``resolution`` says otherwise (these
    tests are about pixel values; the resampled path is checked where it changes the answer)."""
    return segment_raster(src, out, None, device="cpu", precision="fp32", overwrite=True,
                          reporter=Reporter(json_mode=True, stream=log), resolution=resolution)


def _messages(log) -> list:
    return [json.loads(ln).get("message", "") for ln in log.getvalue().splitlines() if ln.startswith("{")]


def _classes(path):
    ds = gdal.Open(str(path))
    return ds.GetRasterBand(1).ReadAsArray()


def _copy(tmp_path, name, array, dtype, like=ADELAIDE, options=()):
    src = gdal.Open(str(like))
    n = array.shape[0]
    ds = gdal.GetDriverByName("GTiff").Create(str(tmp_path / name), src.RasterXSize, src.RasterYSize, n, dtype,
                                              list(options))
    ds.SetGeoTransform(src.GetGeoTransform())
    ds.SetProjection(src.GetProjection())
    for i in range(n):
        ds.GetRasterBand(i + 1).WriteArray(array[i])
    ds = None
    return tmp_path / name


def test_nan_and_inf_in_a_float_raster_without_nodata_are_nodata(tmp_path):
    rgb = gdal.Open(str(ADELAIDE)).ReadAsArray().astype(np.float32)
    clean = _copy(tmp_path, "clean.tif", rgb, gdal.GDT_Float32)
    holed = rgb.copy()
    holed[:, 300:420, 500:700] = np.nan  # a block of NaN in every band, and scattered inf in one
    holed[1, 800:810, 100:900:7] = np.inf
    bad = _copy(tmp_path, "nan.tif", holed, gdal.GDT_Float32)
    assert gdal.Open(str(bad)).GetRasterBand(1).GetNoDataValue() is None
    log = io.StringIO()
    _segment(clean, tmp_path / "clean_classes.tif", io.StringIO())
    res = _segment(bad, tmp_path / "nan_classes.tif", log)
    a, b = _classes(tmp_path / "clean_classes.tif"), _classes(tmp_path / "nan_classes.tif")
    nonfinite = ~np.isfinite(holed).all(0)
    assert (b[nonfinite] == 255).all() and res["nodata_pixels"] == int(nonfinite.sum())
    # elsewhere the map is the NaN-free run's but for the hole's neighbours, which see the mean there as
    # they would any nodata (before: 1 % agreement, NaN poisoned every window it touched)
    assert (a[~nonfinite] == b[~nonfinite]).mean() > 0.9
    assert (a[:200, :] == b[:200, :]).mean() > 0.97  # rows far from the hole
    assert any("NaN and ±inf pixels are nodata" in m for m in _messages(log))
    # at the model's 0.8 m (Adelaide is ~0.46 m): the holes are nodata too; a processing pixel that averages
    # a NaN or inf is nodata, so the nodata grows by at most about one processing pixel around them
    res = _segment(bad, tmp_path / "nan_auto.tif", io.StringIO(), resolution="auto")
    c = _classes(tmp_path / "nan_auto.tif")
    assert res["processing"]["resampled"] and (c[nonfinite] == 255).all()
    assert nonfinite.sum() <= res["nodata_pixels"] <= 1.2 * nonfinite.sum()


def _paletted(tmp_path):
    """Adelaide as a 1-band paletted GeoTIFF (GDAL's median-cut palette and dithering, 256 colours) and the
    RGB image that palette encodes."""
    src = gdal.Open(str(ADELAIDE))
    pal = gdal.GetDriverByName("GTiff").Create(str(tmp_path / "paletted.tif"), src.RasterXSize, src.RasterYSize, 1,
                                               gdal.GDT_Byte)
    pal.SetGeoTransform(src.GetGeoTransform())
    pal.SetProjection(src.GetProjection())
    ct = gdal.ColorTable()
    bands = [src.GetRasterBand(i) for i in (1, 2, 3)]
    gdal.ComputeMedianCutPCT(*bands, 256, ct)
    gdal.DitherRGB2PCT(*bands, pal.GetRasterBand(1), ct)
    pal.GetRasterBand(1).SetRasterColorTable(ct)
    pal.GetRasterBand(1).SetRasterColorInterpretation(gdal.GCI_PaletteIndex)
    pal = None
    gdal.Translate(str(tmp_path / "palette_rgb.tif"), str(tmp_path / "paletted.tif"), rgbExpand="rgb")
    return tmp_path / "paletted.tif", tmp_path / "palette_rgb.tif"


def test_a_paletted_raster_is_segmented_through_its_colour_table(tmp_path):
    paletted, rgb = _paletted(tmp_path)
    log = io.StringIO()
    res = _segment(paletted, tmp_path / "p_classes.tif", log)
    _segment(rgb, tmp_path / "rgb_classes.tif", io.StringIO())
    assert np.array_equal(_classes(tmp_path / "p_classes.tif"), _classes(tmp_path / "rgb_classes.tif"))
    assert any("palette indices (256 colours); expanded through its colour table" in m for m in _messages(log))
    # resampled to the model's GSD: the colours are averaged, never the palette indices (GDAL would average
    # the indices in a resampling VRT; core.segment.resolution warps a paletted raster instead)
    _segment(paletted, tmp_path / "p_auto.tif", io.StringIO(), resolution="auto")
    _segment(rgb, tmp_path / "rgb_auto.tif", io.StringIO(), resolution="auto")
    assert (_classes(tmp_path / "p_auto.tif") == _classes(tmp_path / "rgb_auto.tif")).mean() > 0.99
    assert res["bands"] == [1, 2, 3]
    out = gdal.Open(res["output"])
    assert out.GetGeoTransform() == gdal.Open(str(ADELAIDE)).GetGeoTransform()


def test_a_grey_palette_is_refused_naming_the_file():
    """GeoTIFF stores every colour table as RGB; a grey one (possible in memory and in other formats) is refused."""
    from core.errors import InputError
    from core.geo.raster import expand_palette

    ds = gdal.GetDriverByName("MEM").Create("", 64, 64, 1, gdal.GDT_Byte)
    ct = gdal.ColorTable(gdal.GPI_Gray)
    for i in range(256):
        ct.SetColorEntry(i, (i, i, i, 255))
    ds.GetRasterBand(1).SetRasterColorTable(ct)
    ds.GetRasterBand(1).SetRasterColorInterpretation(gdal.GCI_PaletteIndex)
    assert ds.GetRasterBand(1).GetColorTable().GetPaletteInterpretation() == gdal.GPI_Gray
    with pytest.raises(InputError, match="grey_scan.tif: band 1 holds palette indices with a grey colour table"):
        expand_palette(ds, "grey_scan.tif")


def test_an_unused_fourth_band_is_named(tmp_path):
    rgb = gdal.Open(str(ADELAIDE)).ReadAsArray()
    # PHOTOMETRIC=MINISBLACK: four plain bands (GDAL would otherwise make the 4th an alpha band, a mask)
    four = _copy(tmp_path, "four.tif", np.concatenate([rgb, rgb[:1]]), gdal.GDT_Byte,
                 options=["PHOTOMETRIC=MINISBLACK", "ALPHA=NO"])
    log = io.StringIO()
    res = _segment(four, tmp_path / "classes.tif", log)
    assert res["bands"] == [1, 2, 3]
    assert any("band 4 of 4 not used: the model reads bands 1, 2, 3" in m for m in _messages(log))


# -- model headers: one validation of the whole header on load (issue 13, part 2) ----------------------
def _default_with(tmp_path, name, edit):
    """The embedded default model rewritten with ``edit(header)`` applied to its SRMF header."""
    from safetensors.torch import load_file, save_file

    from core.model.modelfile import DEFAULT_MODEL_PATH, METADATA_KEY, read_header

    header = read_header(DEFAULT_MODEL_PATH)
    edit(header)
    path = tmp_path / name
    save_file(load_file(str(DEFAULT_MODEL_PATH)), str(path), metadata={METADATA_KEY: json.dumps(header)})
    return path


@pytest.mark.parametrize("field,edit,words", [
    ("std 0", lambda h: h["input"].__setitem__("std", [58.4, 0, 57.4]), "input.std must be positive"),
    ("mean length", lambda h: h["input"].__setitem__("mean", [120.0, 110.0]), "input.mean must be 3 finite numbers"),
    ("std NaN", lambda h: h["input"].__setitem__("std", [58.4, float("nan"), 57.4]), "input.std must be 3 finite"),
    ("value range", lambda h: h["input"].__setitem__("value_range", [255, 0]), "input.value_range"),
    ("bands", lambda h: h["input"].__setitem__("bands", ["red", "green"]), "input.mean must be 2 finite"),
    ("window", lambda h: h["inference"].__setitem__("window", 500), "inference.window must be a multiple of 32"),
    ("stride", lambda h: h["inference"].__setitem__("stride", 0), "inference.stride must be between 1"),
])
def test_a_bad_model_header_is_refused_naming_the_file_and_field(tmp_path, field, edit, words):
    """Before: std 0 gave a one-class map (exit 0, the previous output overwritten), a short mean a numpy
    traceback, a bad window was blamed on a --window never given."""
    import subprocess
    import sys

    from conftest import ROOT

    model = _default_with(tmp_path, "bad.srmf", edit)
    out = tmp_path / "classes.tif"
    out.write_bytes(b"the previous output")
    proc = subprocess.run([sys.executable, "-m", "core", "segment", str(ADELAIDE), str(out), "--model", str(model),
                           "--overwrite", "--json"], cwd=ROOT, capture_output=True, text=True)
    err = [json.loads(ln) for ln in proc.stdout.splitlines() if '"type": "error"' in ln]
    assert proc.returncode == 2 and err, proc.stdout[-2000:]
    assert "bad.srmf" in err[0]["message"] and words in err[0]["message"], err[0]["message"]
    assert "Traceback" not in proc.stdout + proc.stderr and "--window" not in err[0]["message"]
    assert out.read_bytes() == b"the previous output"  # nothing lost


def test_bands_that_do_not_match_the_first_convolution_are_refused(tmp_path):
    from core.errors import ModelFileError
    from core.model.modelfile import load_model

    def four_bands(h):
        h["input"].update(bands=["red", "green", "blue", "nir"], mean=[1.0] * 4, std=[1.0] * 4)

    with pytest.raises(ModelFileError, match="input.bands lists 4 bands but the network's first convolution reads 3"):
        load_model(_default_with(tmp_path, "four.srmf", four_bands))


def test_evaluate_refuses_a_reference_that_does_not_overlap(tmp_path):
    """An Adelaide (EPSG:4326) prediction against an OSBS (Florida, UTM 17N) reference: exit 2, both named
    (before: exit 0 and metrics full of nulls)."""
    import subprocess
    import sys

    from conftest import OSBS, ROOT

    pred = _copy(tmp_path, "pred.tif", (gdal.Open(str(ADELAIDE)).ReadAsArray()[:1] % 5).astype(np.uint8), gdal.GDT_Byte)
    ref = _copy(tmp_path, "ref.tif", (gdal.Open(str(OSBS)).ReadAsArray()[:1] % 5).astype(np.uint8), gdal.GDT_Byte,
                like=OSBS)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", str(pred), str(ref), "--output-json", str(report),
                           "--json"], cwd=ROOT, capture_output=True, text=True)
    err = [json.loads(ln) for ln in proc.stdout.splitlines() if '"type": "error"' in ln]
    assert proc.returncode == 2 and err, proc.stdout[-2000:]
    assert "pred.tif" in err[0]["message"] and "ref.tif" in err[0]["message"] and "overlap" in err[0]["message"]
    assert "Traceback" not in proc.stdout + proc.stderr and not report.exists()


# -- partial files of killed runs (issue 13, part 4) ---------------------------------------------------
def test_a_killed_runs_partial_file_is_removed_by_the_next_run_but_a_live_writers_is_kept(tmp_path):
    """A SIGKILLed segment leaves its hidden partial; the next run over the same output removes it, while a
    partial of a process that still runs (a concurrent writer) is left alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "classes.tif"
    proc = subprocess.Popen([sys.executable, "-m", "core", "segment", str(ADELAIDE), str(out), "--window", "128",
                             "--stride", "64", "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # killed once it is writing (its first progress line)
        if '"progress"' in line:
            break
    deadline = time.time() + 60
    while not list(tmp_path.glob(".classes.*partial*")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = list(tmp_path.glob(".classes.*partial*"))
    assert stale and all(f".classes.{proc.pid}-" in p.name for p in stale)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live other process
    try:
        live = tmp_path / f".classes.{writer.pid}-abcd.partial.tif"
        live.write_bytes(b"a concurrent writer's")
        res = _segment(ADELAIDE, out, io.StringIO())
        assert res["output"] == str(out) and out.exists()
        assert not any(p.exists() for p in stale) and live.exists()
    finally:
        writer.kill()
        writer.wait()


# -- GDAL failures during a run, outputs the input reads, invalid polygons (issue 13, part 5) --------------
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import ATLANTA, DATA, ROOT, engine_env  # noqa: E402

ATLANTA_POLYGONS = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"
DUBAI_IMAGE = DATA / "dubai_hitl_aerial" / "tile_2" / "images" / "image_part_001.jpg"
DUBAI_MASK = DATA / "dubai_hitl_aerial" / "tile_2" / "masks" / "image_part_001.png"


def _truncated(tmp_path, src, name, keep=0.5):
    """A tiled GeoTIFF copy of the real raster ``src`` cut to ``keep`` of its bytes (a copy interrupted half way):
    GDAL still opens it (the header and tile index are at the start) but fails on the missing tiles."""
    full = tmp_path / f"full_{name}"
    gdal.Translate(str(full), str(src), creationOptions=["TILED=YES", "BLOCKXSIZE=128", "BLOCKYSIZE=128"])
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
    full.unlink()
    assert gdal.Open(str(tmp_path / name)) is not None
    return tmp_path / name


def _cli(*args, limit_bytes=None):
    """``python -m core ARGS --json``: (exit code, the error line's message or None, stdout + stderr). With
    ``limit_bytes``, the process may write no file larger than that (RLIMIT_FSIZE, SIGXFSZ ignored): to the
    engine, the disk is full (the JSON lines go through a pipe, not a file, so they are not limited)."""
    def limit():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    proc = subprocess.run([sys.executable, "-m", "core", *map(str, args), "--json"], cwd=ROOT, env=engine_env(),
                          capture_output=True, text=True, preexec_fn=limit if limit_bytes else None, timeout=600)
    errors = [json.loads(ln) for ln in proc.stdout.splitlines() if '"type": "error"' in ln]
    return proc.returncode, errors[0]["message"] if errors else None, proc.stdout + proc.stderr


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _no_python_internals(text):
    for sign in ("Traceback", "Exception ignored", "RuntimeError", "File \""):
        assert sign not in text, text[-3000:]


@pytest.mark.parametrize("command", ["segment", "findclass", "finetune", "evaluate-prediction", "evaluate-reference"])
def test_a_truncated_raster_is_a_clear_error_in_every_command(tmp_path, random_model, command):
    """Before: a traceback (exit 1) from GDAL's IReadBlock failure in segment, findclass and the others."""
    out = tmp_path / "out"
    out.mkdir()
    if command == "segment":
        bad = _truncated(tmp_path, ADELAIDE, "adelaide_cut.tif")
        previous = out / "classes.tif"
        previous.write_bytes(b"the previous output")
        args = ["segment", bad, previous, "--model", random_model, "--overwrite"]
    elif command == "findclass":
        bad = _truncated(tmp_path, ATLANTA, "atlanta_cut.tif")
        args = ["findclass", bad, ATLANTA_POLYGONS, out / "found", "--model", random_model]
    elif command == "finetune":
        bad = _truncated(tmp_path, DUBAI_IMAGE, "dubai_cut.tif", keep=0.3)
        args = ["finetune", out / "tuned.srmf", "--raster", bad, "--labels", DUBAI_MASK, "--base-model", random_model,
                "--iterations", 2, "--crop", 96, "--batch-size", 2]
    else:
        pred = tmp_path / "pred.tif"
        _copy(tmp_path, "pred.tif", (gdal.Open(str(ADELAIDE)).ReadAsArray()[:1] % 5).astype(np.uint8), gdal.GDT_Byte)
        bad = _truncated(tmp_path, pred, "pred_cut.tif", keep=0.4)
        args = (["evaluate", bad, pred] if command == "evaluate-prediction" else ["evaluate", pred, bad]) + [
            "--output-json", out / "report.json"]
    before = _listing(out)
    code, message, text = _cli(*args)
    assert code == 2 and message, text[-3000:]
    assert str(bad) in message and "truncated or damaged" in message, message
    _no_python_internals(text)
    assert _listing(out) == before  # nothing left: no output, partial file, work or output folder
    if command == "segment":
        assert (out / "classes.tif").read_bytes() == b"the previous output"  # nothing lost


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk: Linux")
def test_a_full_disk_in_segment_is_a_clear_error_and_leaves_no_output(tmp_path, random_model):
    """The class raster (≈40 kB) fits under the limit, the 5-band probability raster does not: both outputs or
    neither (before: a traceback, and the class raster was published beside a failed run)."""
    cls, prob = tmp_path / "classes.tif", tmp_path / "prob.tif"
    prob.write_bytes(b"the previous probabilities")
    code, message, text = _cli("segment", ADELAIDE, cls, "--probabilities", prob, "--model", random_model,
                               "--overwrite", limit_bytes=300_000)
    assert code == 1 and message, text[-3000:]
    assert str(prob) in message and "disk is full" in message and "partial" not in message, message
    _no_python_internals(text)
    assert not cls.exists() and prob.read_bytes() == b"the previous probabilities"
    assert _listing(tmp_path) == ["prob.tif"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk: Linux")
def test_a_full_disk_in_findclass_finetune_and_evaluate_is_a_clear_error(tmp_path, random_model):
    # findclass: the relevance raster fails; the output folder it made is removed
    code, message, text = _cli("findclass", ATLANTA, ATLANTA_POLYGONS, tmp_path / "found", "--model", random_model,
                               limit_bytes=60_000)
    assert code == 1 and "found/relevance.tif" in message and "disk is full" in message, text[-3000:]
    _no_python_internals(text)
    assert not (tmp_path / "found").exists()
    # finetune: the best model (≈14 MB) cannot be written; no model, and no empty work folder is left
    code, message, text = _cli("finetune", tmp_path / "tuned.srmf", "--raster", DUBAI_IMAGE, "--labels", DUBAI_MASK,
                               "--base-model", random_model, "--iterations", 2, "--crop", 96, "--batch-size", 2,
                               "--eval-interval", 2, "--no-srr", limit_bytes=2_000_000)
    assert code == 1 and "best.srmf" in message and "disk is full" in message, text[-3000:]
    _no_python_internals(text)
    assert _listing(tmp_path) == []
    # evaluate: the reports cannot be written; the earlier reports are kept as they were
    pred = _copy(tmp_path, "pred.tif", (gdal.Open(str(ADELAIDE)).ReadAsArray()[:1] % 5).astype(np.uint8),
                 gdal.GDT_Byte)
    report = tmp_path / "report.json"
    report.write_text("the earlier report")
    code, message, text = _cli("evaluate", pred, pred, "--output-json", report, "--overwrite", limit_bytes=200)
    assert code == 1 and str(report) in message and "disk is full" in message, text[-3000:]
    _no_python_internals(text)
    assert report.read_text() == "the earlier report" and _listing(tmp_path) == ["pred.tif", "report.json"]


def test_an_output_that_the_input_reads_through_a_vrt_is_refused(tmp_path):
    """segment of a VRT mosaic with --overwrite onto one of its sources: refused (exit 2), the source intact
    (before: the source was replaced while the VRT was read)."""
    from core.errors import InputError
    from core.geo.raster import check_not_read, files_read

    src = tmp_path / "adelaide.tif"
    src.write_bytes(ADELAIDE.read_bytes())
    inner = tmp_path / "inner.vrt"
    gdal.BuildVRT(str(inner), [str(src)])
    outer = tmp_path / "sub" / "outer.vrt"
    outer.parent.mkdir()
    gdal.BuildVRT(str(outer), [str(inner)])
    assert {src.resolve(), inner.resolve(), outer.resolve()} <= set(files_read(gdal.Open(str(outer)), outer))
    code, message, text = _cli("segment", outer, src, "--overwrite")
    assert code == 2 and f"The output {src} is a file that the input {outer} reads" in message, text[-3000:]
    assert src.read_bytes() == ADELAIDE.read_bytes()
    with pytest.raises(InputError, match="is the input"):
        check_not_read([outer], [(gdal.Open(str(outer)), outer)])
    check_not_read([tmp_path / "classes.tif"], [(gdal.Open(str(outer)), outer)])  # any other name is fine


def _with_invalid_polygons(tmp_path, degenerate=False):
    """The real Atlanta building footprints with feature 3 made a bow tie (its ring crosses itself: two of its
    corners swapped) and, with ``degenerate``, feature 5 collapsed to a zero-area ring (a line there and back).
    Returns (path, the bow tie's fid, the degenerate one's fid)."""
    from osgeo import ogr

    src = ogr.Open(str(ATLANTA_POLYGONS))
    lyr = src.GetLayer(0)
    path = tmp_path / "labels_invalid.gpkg"
    dst = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    out = dst.CreateLayer("labels", srs=lyr.GetSpatialRef(), geom_type=ogr.wkbPolygon)
    out.CreateField(ogr.FieldDefn("class", ogr.OFTString))
    out.CreateField(ogr.FieldDefn("negative", ogr.OFTInteger))
    fids = []
    for i, feat in enumerate(lyr):
        g = feat.GetGeometryRef().Clone()
        if g.GetGeometryType() != ogr.wkbPolygon:
            continue
        ring = g.GetGeometryRef(0)
        pts = [ring.GetPoint_2D(k) for k in range(ring.GetPointCount())]
        if len(fids) == 3 and len(pts) >= 5:
            minx, maxx, miny, maxy = g.GetEnvelope()
            pts = [(minx, miny), (maxx, maxy), (maxx, miny), (minx, maxy), (minx, miny)]  # a bow tie
        elif degenerate and len(fids) == 5:
            pts = [pts[0], pts[1], pts[0]]
        r = ogr.Geometry(ogr.wkbLinearRing)
        for x, y in pts:
            r.AddPoint_2D(x, y)
        poly = ogr.Geometry(ogr.wkbPolygon)
        poly.AddGeometry(r)
        f = ogr.Feature(out.GetLayerDefn())
        f.SetField("class", "building")
        f.SetField("negative", 0)
        f.SetGeometry(poly)
        out.CreateFeature(f)
        fids.append(f.GetFID())
    dst = None
    return path, fids[3], fids[5]


def test_invalid_label_polygons_are_repaired_and_counted_or_refused(tmp_path):
    """Fine-tuning labels: a self-intersecting polygon is repaired (GEOS make-valid) and counted; one that
    encloses no area once repaired is refused with its feature id (before: both passed silently)."""
    from core.classtable import load_class_table
    from core.errors import InputError
    from core.finetune.sources import rasterize_polygons

    classes = load_class_table({"classes": [{"name": "background", "value": 0}, {"name": "building", "value": "building"}]})
    like = gdal.Open(str(ATLANTA))
    path, bow, flat = _with_invalid_polygons(tmp_path)
    label, info = rasterize_polygons(path, "class", classes, like, "atlanta", background="background")
    assert info["invalid_geometries"] == {"repaired": 1, "feature_ids": [bow]}
    assert any("1 invalid polygon(s)" in w and str(bow) in w for w in info["warnings"])
    assert 0.03 < (label == 1).mean() < 0.08  # the footprints (4.2 % of the pixels) and the bow tie's two triangles
    (tmp_path / "degenerate").mkdir()
    path2, bow, flat = _with_invalid_polygons(tmp_path / "degenerate", degenerate=True)
    with pytest.raises(InputError, match=rf"labels_invalid.gpkg: 1 polygon\(s\) are invalid and enclose no area.*"
                                         rf"feature id\(s\) {flat}\b"):
        rasterize_polygons(path2, "class", classes, like, "atlanta", background="background")


def test_invalid_example_and_reference_polygons_are_repaired_with_a_warning(tmp_path):
    """findclass examples and evaluate's polygon reference go through the same repair, with the warning."""
    from core.evaluate.reference import _PolygonReference
    from core.findclass.cells import CellGrid
    from core.findclass.examples import read_examples

    path, bow, _ = _with_invalid_polygons(tmp_path)
    ds = gdal.Open(str(ATLANTA))
    log = io.StringIO()
    polygons, info = read_examples(path, ds, CellGrid(ds.RasterYSize, ds.RasterXSize), raster_name="atlanta",
                                   reporter=Reporter(json_mode=True, stream=log))
    assert info["invalid_geometries"]["repaired"] == 1 and bow in {p.fid for p in polygons}
    assert any("1 invalid polygon(s)" in m and "make-valid" in m for m in _messages(log))
    log = io.StringIO()
    classes = [{"id": 0, "name": "building", "colour": "#ff0000", "values": ["building"]}]
    pred = _copy(tmp_path, "pred.tif", np.zeros((1, ds.RasterYSize, ds.RasterXSize), np.uint8), gdal.GDT_Byte,
                 like=ATLANTA)
    _PolygonReference(path, "class", gdal.Open(str(pred)), classes, None, [], Reporter(json_mode=True, stream=log))
    assert any("1 invalid polygon(s)" in m and str(bow) in m for m in _messages(log))


def test_the_cli_names_what_no_command_wrapped_and_keeps_tracebacks_for_bugs():
    """The last guard (core.cli.machine_error): an OSError of a full disk is a WriteError (exit 1), a missing
    file an InputError (exit 2), GDAL's own RuntimeError keeps its message; any other exception is a bug,
    for which the traceback is still logged."""
    import errno

    from core.cli import machine_error
    from core.errors import InputError, WriteError

    full = machine_error(OSError(errno.ENOSPC, "No space left on device", "/data/out.tif"))
    assert isinstance(full, WriteError) and full.exit_code == 1 and "/data/out.tif" in str(full)
    gone = machine_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/in.tif"))
    assert isinstance(gone, InputError) and gone.exit_code == 2 and "/data/in.tif" in str(gone)
    try:
        gdal.Open("/nonexistent/srmf.tif")
    except RuntimeError as exc:
        assert "GDAL failed" in str(machine_error(exc)) and "srmf.tif" in str(machine_error(exc))
    assert machine_error(ValueError("a bug")) is None
    assert machine_error(RuntimeError("a bug of ours, not GDAL's")) is None
