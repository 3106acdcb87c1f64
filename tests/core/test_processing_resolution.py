"""Resolution-aware inference (issue 12, part 1): ``segment --resolution auto|native|METRES`` runs the network
at the asked-for ground sample distance and writes the classes on the input's own grid. Streaming is checked
against an in-memory reference (the raster resampled whole, slide inference in memory, logits resampled
back), on the real rasters of ../shared/data: shrunk (10 cm NEON, UTM), enlarged (0.5 m SpaceNet pan,
uint16) and in a geographic CRS (Adelaide, EPSG:4326)."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from osgeo import gdal

from conftest import ADELAIDE, ATLANTA, DATA, OSBS, read_band
from core.errors import InputError
from core.geo.raster import StripReader, compute_scaling, select_bands
from core.model.modelfile import load_model
from core.protocol import Reporter
from core.segment.job import segment_raster
from core.segment.resolution import parse_resolution, processing_grid, raster_gsd_m
from core.windows import SlidePlan, WindowPredictor, slide_inference_in_memory

DUBAI_IMAGE = DATA / "dubai_hitl_aerial" / "tile_2" / "images" / "image_part_001.jpg"  # JPEG, no georeferencing


def _reference(path, lm, metres, window, stride, batch=3):
    """Classes uint8 (H, W) of the whole-raster reference at ``metres`` (255 = nodata)."""
    ds = gdal.Open(str(path))
    grid, _ = processing_grid(ds, metres, None)
    view = gdal.Translate("", ds, format="MEM", width=grid.width, height=grid.height, resampleAlg=grid.resampling)
    inp = lm.header["input"]
    bands = select_bands(view, path, None, inp["bands"])
    image, valid = StripReader(view, bands, compute_scaling(view, bands, inp["scaling"], inp["value_range"])).read(
        0, view.RasterYSize)
    plan = SlidePlan(view.RasterYSize, view.RasterXSize, window, stride)
    logits, _ = slide_inference_in_memory(image, valid, plan, WindowPredictor(lm.model, torch.device("cpu")),
                                          lm.num_classes, inp["mean"], inp["std"], batch)
    lg = logits.numpy()
    if valid is not None:
        lg[:, ~valid] = np.nan
    mem = gdal.GetDriverByName("MEM").Create("", grid.width, grid.height, lm.num_classes, gdal.GDT_Float32)
    mem.SetGeoTransform(view.GetGeoTransform())
    mem.SetSpatialRef(view.GetSpatialRef())
    for k in range(lm.num_classes):
        mem.GetRasterBand(k + 1).SetNoDataValue(float("nan"))
        mem.GetRasterBand(k + 1).WriteArray(lg[k])
    back = gdal.Translate("", mem, format="MEM", width=ds.RasterXSize, height=ds.RasterYSize,
                          resampleAlg="bilinear").ReadAsArray().reshape(lm.num_classes, ds.RasterYSize, ds.RasterXSize)
    finite = np.isfinite(back).all(0)
    classes = np.where(finite, np.nan_to_num(back, nan=-np.inf).argmax(0), 255).astype(np.uint8)
    native = StripReader(ds, select_bands(ds, path, None, inp["bands"]),
                         compute_scaling(ds, select_bands(ds, path, None, inp["bands"]), inp["scaling"],
                                         inp["value_range"]))
    _, nvalid = native.read(0, ds.RasterYSize)
    if nvalid is not None:
        classes[~nvalid] = 255
    return classes, grid


CASES = [
    (OSBS, 0.2, 128, 85),       # 10 cm → 20 cm: shrunk 2x (average), nodata 255
    (ATLANTA, 0.25, 512, 341),  # 0.5 m pan → 25 cm: enlarged 2x (bilinear), uint16 percentile scaling
    (ADELAIDE, 0.9, 256, 171),  # EPSG:4326 (~0.46 m from degrees at -34.4°) → 0.9 m: shrunk ~2x
]


@pytest.mark.parametrize("path,metres,window,stride", CASES, ids=[c[0].stem for c in CASES])
def test_streaming_at_another_resolution_equals_the_in_memory_reference(tmp_path, random_model, path, metres, window,
                                                                        stride):
    torch.manual_seed(0)
    lm = load_model(random_model)
    ref, grid = _reference(path, lm, metres, window, stride)
    out = tmp_path / "classes.tif"
    log = io.StringIO()
    res = segment_raster(path, out, lm, window=window, stride=stride, batch_size=3, device="cpu", precision="fp32",
                         resolution=metres, reporter=Reporter(json_mode=True, stream=log), overwrite=True)
    got = read_band(out)
    src, dst = gdal.Open(str(path)), gdal.Open(str(out))
    assert (dst.RasterXSize, dst.RasterYSize) == (src.RasterXSize, src.RasterYSize)  # the input's own grid
    assert dst.GetGeoTransform() == src.GetGeoTransform() and dst.GetSpatialRef().IsSame(src.GetSpatialRef())
    assert res["processing"]["resampled"] and (res["processing"]["width"], res["processing"]["height"]) == (
        grid.width, grid.height)
    assert np.array_equal(got == 255, ref == 255)  # nodata where the input is nodata, and only there
    agree = (got == ref).mean()
    # strips of a VRT resampled on the fly vs the whole raster resampled at once: GDAL's kernels at strip
    # borders may differ in the last bit, which flips a pixel whose two best logits tie
    assert agree > 0.999, agree
    assert not list(tmp_path.glob(".*partial*")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "classes.tif", "classes.tif.aux.xml"]  # the temporary logits are gone
    assert any("processing at" in json.loads(ln).get("message", "") for ln in log.getvalue().splitlines())


def test_auto_processes_at_the_models_gsd_only_when_more_than_1_5x_off(random_model):
    lm = load_model(random_model)
    osbs, atlanta = gdal.Open(str(OSBS)), gdal.Open(str(ATLANTA))
    grid, why = processing_grid(osbs, "auto", 0.8)
    assert (grid.width, grid.height) == (50, 50) and grid.resampling == "average" and "8.00x" in why
    assert processing_grid(atlanta, "auto", 0.6)[0] is None  # 0.5 m vs 0.6 m: within 1.5x
    grid, _ = processing_grid(atlanta, "auto", 0.25)
    assert (grid.width, grid.height) == (1800, 1800) and grid.resampling == "bilinear"
    assert processing_grid(osbs, "native", 0.8) == (None, "processing the raster's own pixels (--resolution native)")
    assert processing_grid(osbs, "auto", None)[0] is None  # a model that does not record its GSD
    assert raster_gsd_m(gdal.Open(str(ADELAIDE))) == pytest.approx(math.sqrt(0.4196 * 0.5043), rel=0.01)
    assert lm.header.get("gsd_m") is None


def test_a_raster_without_georeferencing_is_processed_natively_unless_its_pixel_size_is_given(tmp_path,
                                                                                              random_model):
    ds = gdal.Open(str(DUBAI_IMAGE))
    grid, why = processing_grid(ds, "auto", 0.8)
    assert grid is None and "no georeferencing" in why and "--pixel-size" in why
    with pytest.raises(InputError, match="--resolution 1 needs the raster's pixel size.*--pixel-size"):
        processing_grid(ds, 1.0, 0.8)
    grid, _ = processing_grid(ds, "auto", 0.8, pixel_size=0.4)
    assert grid.width == round(ds.RasterXSize / 2)
    out = tmp_path / "classes.tif"
    res = segment_raster(DUBAI_IMAGE, out, random_model, window=256, stride=171, device="cpu", precision="fp32",
                         resolution="1.2", pixel_size=0.4, reporter=Reporter(json_mode=True, stream=io.StringIO()))
    assert res["processing"]["resampled"] and res["width"] == ds.RasterXSize
    assert read_band(out).shape == (ds.RasterYSize, ds.RasterXSize)


@pytest.mark.parametrize("text", ["fast", "0", "-2", "nan"])
def test_a_bad_resolution_is_refused_naming_the_parameter(text):
    with pytest.raises(InputError, match="--resolution"):
        parse_resolution(text)


def test_parse_resolution():
    assert parse_resolution("AUTO") == "auto" and parse_resolution("native") == "native"
    assert parse_resolution("0.5") == 0.5 and parse_resolution("2m") == 2.0 and parse_resolution(None) == "auto"


# -- test-time augmentation (issue 12, part 3) ---------------------------------------------------------------
def test_tta_averages_the_eight_symmetries_so_a_turned_window_gives_turned_logits(random_model):
    """The group average is equivariant: logits of a window turned by a quarter (or mirrored) are the turned
    (mirrored) logits of the window — which fails if a view is not mapped back exactly. Without TTA the
    random network is not equivariant (checked, so the property is not trivially true)."""
    from core.windows import TTA_TRANSFORMS

    torch.manual_seed(0)
    lm = load_model(random_model)
    image = gdal.Open(str(ADELAIDE)).ReadAsArray()[:, :128, :128].astype(np.float32)
    mean, std = np.array(lm.header["input"]["mean"]), np.array(lm.header["input"]["std"])
    x = torch.from_numpy((image - mean[:, None, None]) / std[:, None, None]).float()[None]
    plain = WindowPredictor(lm.model, torch.device("cpu"), "fp32")
    tta = WindowPredictor(lm.model, torch.device("cpu"), "fp32", tta=True)
    assert len(TTA_TRANSFORMS) == 8 and TTA_TRANSFORMS[0] == (0, False)
    turned = torch.rot90(x, 1, dims=(2, 3))
    mirrored = torch.flip(x, dims=(3,))
    ref = tta(x)
    assert torch.allclose(tta(turned), torch.rot90(ref, 1, dims=(2, 3)), atol=1e-4)
    assert torch.allclose(tta(mirrored), torch.flip(ref, dims=(3,)), atol=1e-4)
    assert not torch.allclose(plain(turned), torch.rot90(plain(x), 1, dims=(2, 3)), atol=1e-2)
    views = []  # each view's logits mapped back by hand: TTA is their plain mean
    for k, flip in TTA_TRANSFORMS:
        v = torch.rot90(x, k, dims=(2, 3))
        out = plain(torch.flip(v, dims=(3,)) if flip else v)
        views.append(torch.rot90(torch.flip(out, dims=(3,)) if flip else out, -k, dims=(2, 3)))
    assert torch.allclose(ref, torch.stack(views).mean(0), atol=1e-5)


def test_segment_with_tta_writes_the_map_and_says_so(tmp_path, random_model):
    out = tmp_path / "classes.tif"
    log = io.StringIO()
    res = segment_raster(OSBS, out, random_model, window=128, stride=85, device="cpu", precision="fp32", tta=True,
                         reporter=Reporter(json_mode=True, stream=log))
    assert res["tta"] is True and read_band(out).shape == (400, 400)
    assert any("test-time augmentation" in json.loads(ln).get("message", "") for ln in log.getvalue().splitlines())


def test_a_resolution_that_would_enlarge_past_the_limit_is_refused_before_any_work(tmp_path):
    """--resolution 0.0001 on the 0.5 m SpaceNet scene: 5000x per side; refused (exit 2) naming the parameter
    and the limit, before the model runs, and nothing is written."""
    import subprocess
    import sys

    from conftest import ROOT, engine_env
    from core.segment.resolution import MAX_ENLARGEMENT

    out = tmp_path / "classes.tif"
    proc = subprocess.run([sys.executable, "-m", "core", "segment", str(ATLANTA), str(out), "--resolution", "0.0001",
                           "--json"], cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=300)
    err = [json.loads(ln) for ln in proc.stdout.splitlines() if '"type": "error"' in ln]
    assert proc.returncode == 2 and err, proc.stdout[-2000:]
    assert "--resolution 0.0001 m would enlarge" in err[0]["message"]
    assert f"the limit is {MAX_ENLARGEMENT:g}x per side" in err[0]["message"]
    assert "Traceback" not in proc.stdout + proc.stderr and list(tmp_path.iterdir()) == []
    assert processing_grid(gdal.Open(str(ATLANTA)), 0.5 / MAX_ENLARGEMENT, None)[0] is not None  # the limit itself
