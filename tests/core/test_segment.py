"""Streaming segmentation on the real GeoTIFFs of ../shared/data versus the plain in-memory reference."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from osgeo import gdal

from conftest import ADELAIDE, ATLANTA, DUBAI_CLASSES, OSBS, REAL_GEOTIFFS, read_band
from core.model.modelfile import load_model
from core.protocol import Reporter
from core.geo.raster import StripReader, compute_scaling, open_raster, select_bands
from core.windows import SlidePlan, WindowPredictor, slide_inference_in_memory, stream_segmentation, window_offsets
from core.segment.job import segment_raster

# (raster, window, stride): several strips each, and a raster smaller than the window (padded).
CASES = [
    (ADELAIDE, 256, 171),   # EPSG:4326, 3-band uint8
    (ADELAIDE, 512, 341),   # the paper's window and stride
    (OSBS, 128, 85),        # EPSG:32617, nodata 255
    (OSBS, 512, 341),       # 400 x 400 < window: padded, not rejected
    (ATLANTA, 256, 200),    # EPSG:32616, 1-band uint16 pan, replicated to 3, percentile scaling
]


def test_window_offsets_follow_mmseg_slide_grid():
    # mmseg: h_grids = max(H - crop + stride - 1, 0) // stride + 1; y1 = min(i*stride, H - crop)
    assert window_offsets(1024, 512, 341) == [0, 341, 512]
    assert window_offsets(900, 256, 200) == [0, 200, 400, 600, 644]
    assert window_offsets(512, 512, 341) == [0]
    assert window_offsets(400, 512, 341) == [0]
    for size, win, st in [(1000, 512, 341), (4097, 512, 341), (1817, 256, 100)]:
        offs = window_offsets(size, win, st)
        n = max(size - win + st - 1, 0) // st + 1
        assert len(offs) == n and offs[-1] == size - win and offs == sorted(set(offs))


def _reference(path, lm, window, stride, batch):
    ds = open_raster(path)
    inp = lm.header["input"]
    bands = select_bands(ds, path, None, inp["bands"])
    reader = StripReader(ds, bands, compute_scaling(ds, bands, inp["scaling"], inp["value_range"]))
    image, valid = reader.read(0, ds.RasterYSize)
    plan = SlidePlan(ds.RasterYSize, ds.RasterXSize, window, stride)
    predictor = WindowPredictor(lm.model, torch.device("cpu"))
    logits, classes = slide_inference_in_memory(image, valid, plan, predictor, lm.num_classes,
                                                inp["mean"], inp["std"], batch)
    return reader, plan, predictor, logits, classes.numpy(), valid


@pytest.mark.parametrize("path,window,stride", CASES, ids=[f"{c[0].stem}-{c[1]}" for c in CASES])
def test_streaming_equals_in_memory_slide_inference(tmp_path, random_model, path, window, stride):
    torch.manual_seed(0)
    lm = load_model(random_model)
    batch = 3
    reader, plan, predictor, ref_logits, ref_classes, valid = _reference(path, lm, window, stride, batch)
    assert len(plan.ys) >= 2 or plan.height <= window

    # 1. the streaming engine's averaged logits, row block by row block
    blocks = {}

    def on_rows(y0, block):
        blocks[y0] = block.logits().clone()

    inp = lm.header["input"]
    stream_segmentation(reader.read, plan, predictor, lm.num_classes, inp["mean"], inp["std"], batch, on_rows)
    stream_logits = torch.cat([blocks[y] for y in sorted(blocks)], dim=1)
    assert stream_logits.shape == ref_logits.shape == (lm.num_classes, plan.height, plan.width)
    both_nan = torch.isnan(stream_logits) & torch.isnan(ref_logits)
    assert torch.equal(torch.isnan(stream_logits), torch.isnan(ref_logits))
    diff = (stream_logits - ref_logits).abs()[~both_nan]
    assert diff.max().item() <= 1e-4

    # 2. the class raster written end to end equals the reference's argmax
    out = tmp_path / "classes.tif"
    res = segment_raster(path, out, lm, window=window, stride=stride, batch_size=batch, device="cpu", precision="fp32",
                         reporter=Reporter(json_mode=True, stream=io.StringIO()))
    written = read_band(out)
    np.testing.assert_array_equal(written, ref_classes)
    assert res["windows"] == plan.n_windows
    # a meaningful map, not one flat class
    assert len(np.unique(written[written != 255])) >= 2
    if valid is not None:
        assert np.all(written[~valid] == 255)
        assert np.all(written[valid] != 255)
    else:
        assert not np.any(written == 255)


def test_osbs_nodata_pixels_are_nodata_and_do_not_vote(tmp_path, random_model):
    ds = gdal.Open(str(OSBS))
    rgb = ds.ReadAsArray()
    all_nodata = np.all(rgb == 255, axis=0)
    assert all_nodata.any(), "OSBS_029 has saturated white pixels that read as nodata"
    out = tmp_path / "osbs.tif"
    res = segment_raster(OSBS, out, random_model, window=128, stride=85, device="cpu",
                         reporter=Reporter(json_mode=True, stream=io.StringIO()))
    cls = read_band(out)
    np.testing.assert_array_equal(cls == 255, all_nodata)
    assert res["nodata_pixels"] == int(all_nodata.sum())

    # "does not vote": changing the raw values under nodata pixels changes nothing in the output
    mem = gdal.GetDriverByName("GTiff").CreateCopy(str(tmp_path / "osbs_copy.tif"), ds)
    noisy = rgb.copy()
    noisy[:, all_nodata] = 255  # keep them nodata ...
    for b in range(3):
        mem.GetRasterBand(b + 1).SetNoDataValue(255)
        mem.GetRasterBand(b + 1).WriteArray(noisy[b])
    mem = None
    out2 = tmp_path / "osbs2.tif"
    segment_raster(tmp_path / "osbs_copy.tif", out2, random_model, window=128, stride=85, device="cpu",
                   reporter=Reporter(json_mode=True, stream=io.StringIO()))
    np.testing.assert_array_equal(read_band(out2), cls)


def test_entirely_nodata_windows_are_skipped(tmp_path, random_model):
    """A real raster with its left half set to nodata: those windows are skipped, that half is 255."""
    src = gdal.Open(str(ADELAIDE))
    path = tmp_path / "half_nodata.tif"
    ds = gdal.GetDriverByName("GTiff").CreateCopy(str(path), src)
    for b in range(1, 4):
        band = ds.GetRasterBand(b)
        band.SetNoDataValue(0)
        arr = band.ReadAsArray()
        arr[:, :600] = 0
        arr[arr == 0] = np.where(np.arange(arr.shape[1]) >= 600, 1, 0)[None, :].repeat(arr.shape[0], 0)[arr == 0]
        band.WriteArray(arr)
    ds = None
    out = tmp_path / "out.tif"
    res = segment_raster(path, out, random_model, window=256, stride=171, device="cpu",
                         reporter=Reporter(json_mode=True, stream=io.StringIO()))
    cls = read_band(out)
    assert np.all(cls[:, :600] == 255) and np.all(cls[:, 600:] != 255)
    # windows at x = 0, 171, 342 lie wholly in the nodata half: 3 per row of windows
    assert res["skipped_windows"] == 3 * len(window_offsets(1024, 256, 171))


@pytest.mark.parametrize("path", REAL_GEOTIFFS, ids=lambda p: p.stem)
def test_output_keeps_georeferencing_and_carries_the_class_table(tmp_path, random_model, path):
    out = tmp_path / "classes.tif"
    prob = tmp_path / "probabilities.tif"
    segment_raster(path, out, random_model, window=256, stride=171, device="cpu", probabilities=prob,
                   reporter=Reporter(json_mode=True, stream=io.StringIO()))
    src, dst = gdal.Open(str(path)), gdal.Open(str(out))
    assert (dst.RasterXSize, dst.RasterYSize) == (src.RasterXSize, src.RasterYSize)
    assert dst.GetGeoTransform() == pytest.approx(src.GetGeoTransform())
    assert dst.GetSpatialRef().IsSame(src.GetSpatialRef())
    band = dst.GetRasterBand(1)
    assert band.DataType == gdal.GDT_Byte and band.GetNoDataValue() == 255
    assert band.GetCategoryNames()[:len(DUBAI_CLASSES)] == [n for n, _ in DUBAI_CLASSES]
    ct = band.GetColorTable()
    for i, (_, colour) in enumerate(DUBAI_CLASSES):
        r, g, b = (int(colour[k:k + 2], 16) for k in (1, 3, 5))
        assert ct.GetColorEntry(i)[:3] == (r, g, b)
    assert band.GetColorInterpretation() == gdal.GCI_PaletteIndex
    assert dst.GetMetadata("IMAGE_STRUCTURE").get("COMPRESSION") == "DEFLATE"
    assert band.GetBlockSize() == [256, 256]
    # probabilities: one band per class, uint8 p*250, summing to ~1 on valid pixels
    p = gdal.Open(str(prob))
    assert p.RasterCount == len(DUBAI_CLASSES) and p.GetSpatialRef().IsSame(src.GetSpatialRef())
    stack = p.ReadAsArray().astype(np.float64)
    cls = band.ReadAsArray()
    valid = cls != 255
    total = stack[:, valid].sum(0) / 250.0
    assert np.abs(total - 1.0).max() < 0.02
    # the class raster is the argmax of the probabilities (up to rounding ties)
    agree = (stack[:, valid].argmax(0) == cls[valid]).mean()
    assert agree > 0.99
    assert p.GetRasterBand(1).GetScale() == pytest.approx(1 / 250)
    # no temporary files left behind
    assert sorted(f.name for f in tmp_path.iterdir()) == ["classes.tif", "classes.tif.aux.xml", "probabilities.tif"]


def test_uint16_pan_is_scaled_by_percentiles_not_clipped(random_model):
    lm = load_model(random_model)
    ds = open_raster(ATLANTA)
    bands = select_bands(ds, ATLANTA, None, lm.header["input"]["bands"])
    assert bands == [1, 1, 1]
    sc = compute_scaling(ds, bands, lm.header["input"]["scaling"], [0, 255])
    raw = ds.GetRasterBand(1).ReadAsArray().astype(np.float64)
    lo, hi = np.percentile(raw[raw != 0], [2, 98])
    assert not sc.identity
    assert sc.low[0] == pytest.approx(lo, rel=0.05) and sc.high[0] == pytest.approx(hi, rel=0.05)
    assert "saturate" in sc.notes[0] and "band 1 (UInt16)" in sc.notes[0]
    scaled = sc.apply(raw[None].astype(np.float32))
    assert scaled.min() >= 0 and scaled.max() <= 255
    # most of the range is used (a silent clip of uint16 to 0..255 would saturate almost everything)
    assert 0.5 < (scaled[0] < 255).mean() and (scaled[0] > 0).mean() > 0.5


def test_mit_backbone_streams_like_in_memory(random_mit_model):
    lm = load_model(random_mit_model)
    reader, plan, predictor, ref_logits, ref_classes, _ = _reference(OSBS, lm, 128, 96, 2)
    rows = {}
    inp = lm.header["input"]
    stream_segmentation(reader.read, plan, predictor, lm.num_classes, inp["mean"], inp["std"], 2,
                        lambda y, b: rows.__setitem__(y, b.logits().clone()), prefetch=False)
    got = torch.cat([rows[y] for y in sorted(rows)], 1)
    ok = ~torch.isnan(ref_logits)
    assert torch.equal(torch.isnan(got), ~ok)
    assert (got - ref_logits)[ok].abs().max() <= 1e-4
