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


def _segment(src, out, log):
    return segment_raster(src, out, None, device="cpu", precision="fp32", overwrite=True,
                          reporter=Reporter(json_mode=True, stream=log))


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
