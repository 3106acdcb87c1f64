"""Area of interest (issue 15, part 1; core.geo.aoi): ``segment --extent`` / ``--mask`` on the real SpaceNet
Atlanta scene (EPSG:32616, 0.5 m, 900 x 900 px) and its 43 real building footprints: the output covers the
area on the input's own pixel grid, the windows run grow with the area, an extent in another CRS is
reprojected, pixels outside a mask are nodata, and bad areas are refused naming the parameter."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from osgeo import gdal, osr

from conftest import ATLANTA, DATA, ROOT, engine_env, read_band
from core.errors import InputError
from core.geo.aoi import area_of_interest, parse_extent
from core.protocol import Reporter
from core.segment.job import segment_raster

FOOTPRINTS = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"
DUBAI_IMAGE = DATA / "dubai_hitl_aerial" / "tile_2" / "images" / "image_part_001.jpg"
X0, Y0 = 733601.0, 3725139.0  # the raster's origin (SOURCES.md), pixels of 0.5 m


def _run(tmp_path, name, model, **kw):
    out = tmp_path / name
    res = segment_raster(ATLANTA, out, model, window=128, stride=85, device="cpu", precision="fp32",
                         resolution="native", reporter=Reporter(json_mode=True, stream=io.StringIO()), **kw)
    return out, res


def test_an_extent_gives_an_output_on_the_inputs_grid_covering_it(tmp_path, random_model):
    full, fres = _run(tmp_path, "full.tif", random_model)
    # 100 m x 60 m, its corners off the pixel grid by a quarter pixel: the window is the pixels it touches
    out, res = _run(tmp_path, "aoi.tif", random_model, extent=f"{X0 + 100.25},{Y0 - 160.25},{X0 + 200.25},{Y0 - 100.25}")
    ds, src = gdal.Open(str(out)), gdal.Open(str(ATLANTA))
    gt = ds.GetGeoTransform()
    sgt = src.GetGeoTransform()
    assert (gt[1], gt[2], gt[4], gt[5]) == (sgt[1], sgt[2], sgt[4], sgt[5])
    assert (gt[0], gt[3]) == (X0 + 100.0, Y0 - 100.0)  # aligned: the origin moved by whole pixels
    assert (ds.RasterXSize, ds.RasterYSize) == (201, 121) and ds.GetSpatialRef().IsSame(src.GetSpatialRef())
    assert res["area_of_interest"]["window"] == [200, 200, 201, 121]
    assert res["windows"] < fres["windows"] / 10  # cost grows with the area, not the raster
    assert not (read_band(out) == 255).any()


def test_an_extent_in_another_crs_is_reprojected(random_model):
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(32616)
    wgs = osr.SpatialReference()
    wgs.ImportFromEPSG(4326)
    for s in (utm, wgs):
        s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    lon0, lat0, lon1, lat1 = osr.CoordinateTransformation(utm, wgs).TransformBounds(
        X0 + 100, Y0 - 300, X0 + 300, Y0 - 100, 21)
    aoi = area_of_interest(gdal.Open(str(ATLANTA)), ATLANTA, extent=f"{lon0},{lat0},{lon1},{lat1},EPSG:4326")
    x, y, w, h = aoi.window
    # the UTM box is pixels 200..600 x 200..600; its lon/lat bounds, reprojected back, cover it plus the
    # sliver that a box in degrees adds around a box in metres (the grid is turned by ~1° here)
    assert x <= 200 and y <= 200 and x + w >= 600 and y + h >= 600
    assert w < 440 and h < 440


def test_a_mask_makes_everything_outside_its_polygons_nodata_and_skips_windows(tmp_path, random_model):
    out, res = _run(tmp_path, "masked.tif", random_model, mask=str(FOOTPRINTS))
    classes = read_band(out)
    mem = gdal.GetDriverByName("MEM").Create("", classes.shape[1], classes.shape[0], 1, gdal.GDT_Byte)
    ds = gdal.Open(str(out))
    mem.SetGeoTransform(ds.GetGeoTransform())
    mem.SetSpatialRef(ds.GetSpatialRef())
    vec = gdal.OpenEx(str(FOOTPRINTS))
    gdal.RasterizeLayer(mem, [1], vec.GetLayer(0), burn_values=[1])
    inside = mem.GetRasterBand(1).ReadAsArray() > 0
    assert np.array_equal(classes != 255, inside)  # a class exactly on the footprints' pixels
    assert res["skipped_windows"] > 0 and res["nodata_pixels"] == int((~inside).sum())
    # at another resolution too (0.5 m → 1 m): nodata outside the footprints, classes inside
    res3 = segment_raster(ATLANTA, tmp_path / "m1.tif", random_model, window=128, stride=85, device="cpu",
                          precision="fp32", resolution=1.0, mask=str(FOOTPRINTS),
                          reporter=Reporter(json_mode=True, stream=io.StringIO()))
    c3 = read_band(tmp_path / "m1.tif")
    assert res3["processing"]["resampled"] and c3.shape == classes.shape
    assert (c3[~inside] == 255).all() and (c3[inside] != 255).mean() > 0.95


@pytest.mark.parametrize("text,expected", [
    ("1,2,3,4", ((1.0, 2.0, 3.0, 4.0), None)),
    ("1,2,3,4,EPSG:4326", ((1.0, 2.0, 3.0, 4.0), "EPSG:4326")),
    ("733601.0,733801.0,3724939.0,3725139.0 [EPSG:32616]", ((733601.0, 3724939.0, 733801.0, 3725139.0), "EPSG:32616")),
])
def test_parse_extent_reads_the_cli_and_qgis_forms(text, expected):
    assert parse_extent(text) == expected


@pytest.mark.parametrize("text,words", [("1,2,3", "must be xmin,ymin,xmax,ymax"), ("5,2,3,4", "is empty"),
                                        ("a,b,c,d", "must be xmin")])
def test_a_bad_extent_is_refused_naming_the_parameter(text, words):
    with pytest.raises(InputError, match=f"--extent {words}" if "empty" in words else words):
        parse_extent(text)


def test_an_area_that_misses_the_raster_or_a_raster_without_georeferencing_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"does not overlap .*sample_geotiff.tif.*check the coordinates"):
        area_of_interest(gdal.Open(str(ATLANTA)), ATLANTA, extent="0,0,10,10")
    with pytest.raises(InputError, match="no georeferencing"):
        area_of_interest(gdal.Open(str(DUBAI_IMAGE)), DUBAI_IMAGE, extent="0,0,10,10")
    with pytest.raises(InputError, match="not a CRS GDAL knows"):
        area_of_interest(gdal.Open(str(ATLANTA)), ATLANTA, extent="0,0,10,10,EPSG:99999999")
    out = tmp_path / "classes.tif"
    proc = subprocess.run([sys.executable, "-m", "core", "segment", str(ATLANTA), str(out), "--extent", "0,0,10,10",
                           "--json"], cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=300)
    err = [json.loads(ln) for ln in proc.stdout.splitlines() if '"type": "error"' in ln]
    assert proc.returncode == 2 and "does not overlap" in err[0]["message"] and list(tmp_path.iterdir()) == []


def test_findclass_searches_only_the_area_of_interest(tmp_path, random_model):
    """findclass with --extent: the relevance raster covers the area on the input's grid (cells of 4 px), the
    example polygons outside it are skipped (warned), and nothing outside is scored."""
    from core.findclass.job import find_class

    log = io.StringIO()
    res = find_class(ATLANTA, FOOTPRINTS, tmp_path / "found", random_model, window=128, stride=85, device="cpu",
                     precision="fp32", extent=f"{X0},{Y0 - 225},{X0 + 450},{Y0}",  # the northern half
                     reporter=Reporter(json_mode=True, stream=log))
    rel = gdal.Open(res["relevance"])
    gt = rel.GetGeoTransform()
    assert (gt[0], gt[3], gt[1], gt[5]) == (X0, Y0, 2.0, -2.0)  # cells of 4 px of 0.5 m, from the area's corner
    assert (rel.RasterXSize, rel.RasterYSize) == (225, 113)  # 900 x 450 px of the 900 x 900 raster, in cells
    msgs = [json.loads(ln).get("message", "") for ln in log.getvalue().splitlines()]
    assert any("area of interest" in m and "900 x 450 px (50.0 % of the raster)" in m for m in msgs)
    assert any("fall outside" in m for m in msgs)
