"""The demo's reference checks (scripts/demo_checks.py) on the real scenes' own reference data: a map that
is right by construction scores perfectly, one that is wrong scores zero, nodata is left out."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from demo_checks import check_scene  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OSBS = DATA / "deepforest_neon_osbs" / "OSBS_029.tif"
ATLANTA = DATA / "solaris_spacenet_atlanta" / "sample_geotiff.tif"
NAMES = ["building", "land", "road", "vegetation", "water"]


def _class_raster(src: Path, path: Path, values: np.ndarray) -> Path:
    ds = gdal.Open(str(src))
    out = gdal.GetDriverByName("GTiff").Create(str(path), ds.RasterXSize, ds.RasterYSize, 1, gdal.GDT_Byte)
    out.SetGeoTransform(ds.GetGeoTransform())
    out.SetProjection(ds.GetProjection())
    out.GetRasterBand(1).WriteArray(values)
    out.GetRasterBand(1).SetNoDataValue(255)
    out = None
    return path


def test_osbs_forest_check_counts_every_building_as_wrong(tmp_path):
    shape = (400, 400)
    veg = _class_raster(OSBS, tmp_path / "veg.tif", np.full(shape, 3, np.uint8))
    r = check_scene(OSBS, veg, NAMES)
    assert r["figures"]["crown pixels called vegetation"] == 1.0
    assert r["figures"]["share building+road+water (all wrong)"] == 0.0
    half = np.full(shape, 3, np.uint8)
    half[:, :200] = 0  # building on the left half
    half[:100, :] = 255  # nodata: left out of every share
    r = check_scene(OSBS, _class_raster(OSBS, tmp_path / "half.tif", half), NAMES)
    assert r["figures"]["share building"] == pytest.approx(0.5)
    assert r["figures"]["share building+road+water (all wrong)"] == pytest.approx(0.5)
    assert 0.0 < r["figures"]["crown pixels called vegetation"] < 1.0
    assert "61 DeepForest tree crowns" in r["lines"][-2] and "50 % is building, road or water" in r["caption"]


def test_atlanta_check_scores_the_footprints_themselves_perfectly(tmp_path):
    ds = gdal.Open(str(ATLANTA))
    mem = gdal.GetDriverByName("MEM").Create("", ds.RasterXSize, ds.RasterYSize, 1, gdal.GDT_Byte)
    mem.SetGeoTransform(ds.GetGeoTransform())
    mem.SetProjection(ds.GetProjection())
    vec = gdal.OpenEx(str(ATLANTA.with_name("geotiff_labels.geojson")))
    gdal.RasterizeLayer(mem, [1], vec.GetLayer(0), burn_values=[1])
    foot = mem.GetRasterBand(1).ReadAsArray().astype(bool)
    assert 0.03 < foot.mean() < 0.06  # SOURCES.md: 4.2 % of the pixels
    right = _class_raster(ATLANTA, tmp_path / "right.tif", np.where(foot, 0, 1).astype(np.uint8))
    r = check_scene(ATLANTA, right, NAMES)
    assert r["figures"]["building IoU"] == 1.0 and r["figures"]["building recall"] == 1.0
    wrong = _class_raster(ATLANTA, tmp_path / "wrong.tif", np.where(foot, 1, 0).astype(np.uint8))
    r = check_scene(ATLANTA, wrong, NAMES)
    assert r["figures"]["building IoU"] == 0.0 and r["figures"]["building precision"] == 0.0
    assert r["lines"][0].startswith("43 SpaceNet building footprints")


def test_a_scene_without_reference_data_has_no_check(tmp_path):
    adelaide = DATA / "openearthmap_adelaide" / "adelaide_2.tif"
    cls = _class_raster(adelaide, tmp_path / "a.tif", np.zeros((1024, 1024), np.uint8))
    assert check_scene(adelaide, cls, NAMES) is None
