"""Map-ready class polygons (issue 16, part 3; core.segment.polygons): ``segment --polygons --min-area/--min-pixels``
on real rasters — the sieve equals GDAL's own gdal_sieve.py, no polygon is smaller than the unit, the polygons
tile the classified pixels exactly (no gap, no overlap: their areas sum to the classified area and to the
area of their union), and every polygon carries class_id, class_name and area_m2."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
from osgeo import gdal, ogr

from conftest import ADELAIDE, OSBS, read_band
from core.errors import InputError
from core.protocol import Reporter
from core.segment.job import segment_raster
from core.segment.polygons import LAYER, min_pixels, write_class_polygons


@pytest.fixture(scope="module")
def osbs_classes(tmp_path_factory, random_model):
    """A real class raster with many small regions: the random model on the 10 cm NEON scene (nodata 255)."""
    out = tmp_path_factory.mktemp("polygons") / "classes.tif"
    segment_raster(OSBS, out, random_model, window=128, stride=85, device="cpu", precision="fp32",
                   resolution="native", reporter=Reporter(json_mode=True, stream=io.StringIO()))
    return out


def _features(path):
    ds = ogr.Open(str(path))
    lyr = ds.GetLayerByName(LAYER)
    rows = [(f.GetField("class_id"), f.GetField("class_name"), f.GetField("area_m2"), f.GetGeometryRef().Clone())
            for f in lyr]
    return rows


def _burn(path, like):
    """The polygons' class_id burnt on the grid of the raster ``like`` (255 elsewhere)."""
    src = gdal.Open(str(like))
    mem = gdal.GetDriverByName("MEM").Create("", src.RasterXSize, src.RasterYSize, 1, gdal.GDT_Byte)
    mem.SetGeoTransform(src.GetGeoTransform())
    mem.SetSpatialRef(src.GetSpatialRef())
    mem.GetRasterBand(1).Fill(255)
    vec = ogr.Open(str(path))
    gdal.RasterizeLayer(mem, [1], vec.GetLayerByName(LAYER), options=["ATTRIBUTE=class_id"])
    return mem.GetRasterBand(1).ReadAsArray()


def test_the_sieve_equals_gdal_sieve_and_no_polygon_is_under_the_unit(tmp_path, osbs_classes):
    classes = [{"id": i, "name": n} for i, n in enumerate(["building", "land", "road", "vegetation", "water"])]
    res = write_class_polygons(osbs_classes, tmp_path / "p.gpkg", classes, 50)
    ref = tmp_path / "sieved_by_gdal.tif"
    subprocess.run([sys.executable, "-m", "osgeo_utils.gdal_sieve", "-q", "-st", "50", "-4", str(osbs_classes),
                    str(ref)], check=True)
    burnt, gdal_sieved = _burn(tmp_path / "p.gpkg", osbs_classes), read_band(ref)
    # equal, but where gdal_sieve leaves a region it cannot merge (enclosed by nodata: no neighbour to
    # merge into), which the polygons drop to honour the unit
    differ = burnt != gdal_sieved
    assert (burnt[differ] == 255).all() and res["dropped"] > 0
    assert differ.sum() < res["dropped"] * 50 and differ.mean() < 0.01
    rows = _features(tmp_path / "p.gpkg")
    assert res["features"] == len(rows) > 10
    px = 0.1 * 0.1
    assert min(a for _, _, a, _ in rows) >= 50 * px - 1e-9  # no polygon under 50 pixels
    assert all(name == classes[cid]["name"] for cid, name, _, _ in rows)
    unsieved = write_class_polygons(osbs_classes, tmp_path / "raw.gpkg", classes, 0)
    assert unsieved["features"] > 2 * res["features"]  # the sieve removed the speckle


def test_the_polygons_tile_the_classified_pixels_without_gaps_or_overlaps(tmp_path, osbs_classes):
    classes = [{"id": i, "name": f"c{i}"} for i in range(5)]
    write_class_polygons(osbs_classes, tmp_path / "p.gpkg", classes, 20)
    rows = _features(tmp_path / "p.gpkg")
    classified = int((read_band(osbs_classes) != 255).sum()) * 0.01  # m², nodata excluded
    total = sum(a for _, _, a, _ in rows)
    union = ogr.Geometry(ogr.wkbMultiPolygon)
    for *_, g in rows:
        union.AddGeometry(g)
    dropped = int((_burn(tmp_path / "p.gpkg", osbs_classes) == 255).sum() - (read_band(osbs_classes) == 255).sum())
    # areas sum to the classified area, less the regions enclosed by nodata that the unit drops
    assert total == pytest.approx(classified - dropped * 0.01, rel=1e-9)
    assert union.UnionCascaded().GetArea() == pytest.approx(total, rel=1e-9)  # so no two polygons overlap


def test_segment_writes_the_polygons_atomically_and_names_its_unit(tmp_path, random_model):
    out, poly = tmp_path / "classes.tif", tmp_path / "classes.gpkg"
    res = segment_raster(OSBS, out, random_model, window=128, stride=85, device="cpu", precision="fp32",
                         resolution="native", polygons=poly, min_area_m2=1.0,
                         reporter=Reporter(json_mode=True, stream=io.StringIO()))
    assert res["polygons"]["min_pixels"] == 100 and res["polygons"]["polygons"] == str(poly)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.gpkg", "classes.tif", "classes.tif.aux.xml"]


def test_units_in_a_geographic_crs_and_bad_units_are_refused_or_noted(tmp_path, random_model):
    ds = gdal.Open(str(ADELAIDE))  # EPSG:4326
    with pytest.raises(InputError, match="--min-area needs a raster in a projected CRS"):
        min_pixels(ds, 10.0, None)
    with pytest.raises(InputError, match="not both"):
        min_pixels(ds, 10.0, 5)
    with pytest.raises(InputError, match="--min-pixels must be 0 or more"):
        min_pixels(ds, None, -1)
    assert min_pixels(gdal.Open(str(OSBS)), 2.0, None) == 200 and min_pixels(ds, None, 7) == 7
    res = segment_raster(ADELAIDE, tmp_path / "a.tif", random_model, window=256, stride=171, device="cpu",
                         precision="fp32", resolution="native", polygons=tmp_path / "a.gpkg", min_pixels=30,
                         reporter=Reporter(json_mode=True, stream=io.StringIO()))
    assert res["polygons"]["area_note"] and all(a is None for _, _, a, _ in _features(tmp_path / "a.gpkg"))


def _vertices(rows) -> int:
    import shapely

    return int(sum(shapely.get_num_coordinates(shapely.from_wkb(bytes(g.ExportToWkb()))) for *_, g in rows))


def test_simplified_polygons_keep_the_coverage_no_gaps_no_overlaps_same_outline(tmp_path, osbs_classes):
    """``--simplify``: the stair-steps go (far fewer vertices), and the polygons are still a coverage — adjacent
    polygons share their edges (GEOS's coverage validity: no overlap, no gap between them), their union is
    the same classified area as the unsimplified polygons' (the outline along nodata and the raster's edge is
    kept), pairwise intersections have no area, and the areas still sum to the classified area."""
    import shapely

    classes = [{"id": i, "name": f"c{i}"} for i in range(5)]
    write_class_polygons(osbs_classes, tmp_path / "raw.gpkg", classes, 20)
    res = write_class_polygons(osbs_classes, tmp_path / "simple.gpkg", classes, 20, simplify=1.5)
    raw, simple = _features(tmp_path / "raw.gpkg"), _features(tmp_path / "simple.gpkg")
    assert res["simplify_pixels"] == 1.5 and len(simple) == len(raw) > 10
    assert _vertices(simple) < 0.6 * _vertices(raw)  # the pixel stair-steps are gone
    geoms = shapely.from_wkb([bytes(g.ExportToWkb()) for *_, g in simple])
    assert shapely.is_valid(geoms).all()
    assert shapely.coverage_is_valid(geoms)  # shared edges match exactly: no overlap, no sliver gap
    raw_union = shapely.union_all(shapely.from_wkb([bytes(g.ExportToWkb()) for *_, g in raw]))
    union = shapely.union_all(geoms)
    assert shapely.symmetric_difference(union, raw_union).area == pytest.approx(0.0, abs=1e-9)  # same outline
    total = sum(a for _, _, a, _ in simple)
    assert total == pytest.approx(sum(a for _, _, a, _ in raw), rel=1e-9)  # areas sum to the classified area
    assert union.area * 1.0 == pytest.approx(total, rel=1e-9)  # so no two polygons overlap
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="intersects")
    pairs = [(i, j) for i, j in zip(left, right) if i < j]
    assert pairs and max(shapely.intersection(geoms[i], geoms[j]).area for i, j in pairs) < 1e-9
    for (cid, name, area, g), (cid0, _, _, _) in zip(simple, raw):
        assert cid == cid0 and area == pytest.approx(g.GetArea(), rel=1e-9)  # area_m2 of the simplified shape


def test_segment_simplify_needs_polygons_and_a_sane_value(tmp_path, random_model):
    env_cmd = [sys.executable, "-m", "core", "segment", str(OSBS), str(tmp_path / "c.tif"), "--simplify", "1"]
    from conftest import ROOT, engine_env

    proc = subprocess.run(env_cmd, capture_output=True, text=True, env=engine_env(), cwd=str(ROOT), timeout=300)
    assert proc.returncode == 2 and "--simplify applies to the class polygons" in proc.stderr, proc.stderr[-500:]
    with pytest.raises(InputError, match="--simplify must be 0 or more pixels"):
        min_pixels(gdal.Open(str(OSBS)), None, None, -1.0)
    assert not (tmp_path / "c.tif").exists()
