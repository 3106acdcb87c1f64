"""srmf:segment options: RESOLUTION (the engine's ``--resolution auto|native|METRES``; blank = auto, 0 =
native), TTA (``--tta``), EXTENT and MASK (``--extent`` in the raster's CRS, ``--mask``). The command lines are taken from the feedback as the algorithm starts the engine (the worker itself is not
started); one real run on the 10 cm NEON scene checks that the automatic choice reaches the engine and
that the classified raster is on the input's grid."""
from __future__ import annotations

import pytest
from osgeo import gdal
from srmf_qgis_testing import OSBS, make_feedback, run_alg
from qgis.core import QgsApplication, QgsProcessingException

from srmf_qgis import runtime

NOT_STARTED = "engine not started by the test"


@pytest.fixture
def engine_not_started(monkeypatch):
    def refuse(py, argv):
        raise runtime.EngineError(NOT_STARTED)

    monkeypatch.setattr(runtime, "_start_worker", refuse)


def test_resolution_is_an_optional_number_of_metres(provider):
    p = QgsApplication.processingRegistry().algorithmById("srmf:segment").parameterDefinition("RESOLUTION")
    assert p is not None and p.type() == "number" and p.minimum() == 0.0
    assert "Processing resolution, metres per pixel" in p.description() and "0: the raster's own pixels" in \
        p.description()


@pytest.mark.parametrize("value,expected", [(None, "--resolution auto"), (0, "--resolution native"),
                                            (0.8, "--resolution 0.8"), (2, "--resolution 2.0")])
def test_the_resolution_reaches_the_engine_command_line(provider, engine_not_started, tmp_path, value, expected):
    params = {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None}
    if value is not None:
        params["RESOLUTION"] = value
    fb = make_feedback()
    with pytest.raises(QgsProcessingException, match=NOT_STARTED):
        run_alg("srmf:segment", params, fb)
    assert expected in fb.commands[0]


def test_automatic_resolution_segments_a_10_cm_scene_at_the_models_scale_on_its_own_grid(provider, tmp_path):
    out = tmp_path / "classes.tif"
    fb = make_feedback()
    run_alg("srmf:segment", {"INPUT": str(OSBS), "OUTPUT": str(out), "OUTPUT_AREAS": None, "PRECISION": 1}, fb)
    src, dst = gdal.Open(str(OSBS)), gdal.Open(str(out))
    assert (dst.RasterXSize, dst.RasterYSize) == (src.RasterXSize, src.RasterYSize)
    assert dst.GetGeoTransform() == src.GetGeoTransform()
    assert any("processing at 0.8 m (the raster's pixels are 0.1 m)" in i for i in fb.infos), fb.infos


def test_test_time_augmentation_is_an_advanced_switch_that_reaches_the_engine(provider, engine_not_started,
                                                                             tmp_path):
    from qgis.core import QgsProcessingParameterDefinition

    p = QgsApplication.processingRegistry().algorithmById("srmf:segment").parameterDefinition("TTA")
    assert p.type() == "boolean" and p.defaultValue() is False
    assert p.flags() & QgsProcessingParameterDefinition.FlagAdvanced
    for value in (False, True):
        fb = make_feedback()
        with pytest.raises(QgsProcessingException, match=NOT_STARTED):
            run_alg("srmf:segment", {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None,
                                     "TTA": value}, fb)
        assert ("--tta" in fb.commands[0]) is value


def test_the_processing_extent_and_mask_reach_the_engine_in_the_rasters_crs(provider, engine_not_started, tmp_path):
    from srmf_qgis_testing import ATLANTA, ATLANTA_BUILDINGS

    params = {"INPUT": str(ATLANTA), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None,
              "EXTENT": "733701.0,733901.0,3724839.0,3725039.0 [EPSG:32616]", "MASK": str(ATLANTA_BUILDINGS)}
    fb = make_feedback()
    with pytest.raises(QgsProcessingException, match=NOT_STARTED):
        run_alg("srmf:segment", params, fb)
    assert "--extent 733701.0,3724839.0,733901.0,3725039.0" in fb.commands[0]
    assert "--mask" in fb.commands[0] and "geotiff_labels.geojson" in fb.commands[0]


def test_a_processing_extent_in_degrees_is_given_to_the_engine_in_metres(provider, engine_not_started, tmp_path):
    from srmf_qgis_testing import ATLANTA

    params = {"INPUT": str(ATLANTA), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None,
              "EXTENT": "-84.4,-84.39,33.64,33.65 [EPSG:4326]"}
    fb = make_feedback()
    with pytest.raises(QgsProcessingException, match=NOT_STARTED):
        run_alg("srmf:segment", params, fb)
    value = fb.commands[0].split("--extent ")[1].split()[0]
    xmin, ymin, xmax, ymax = map(float, value.split(","))
    assert 700000 < xmin < xmax < 760000 and 3700000 < ymin < ymax < 3750000  # UTM 16N metres, not degrees
    assert 0.9 < (xmax - xmin) / 927 < 1.1  # 0.01° of longitude at 33.6° N is ~927 m


def test_findclass_passes_its_processing_extent_too(provider, engine_not_started, tmp_path):
    from srmf_qgis_testing import ATLANTA, ATLANTA_BUILDINGS

    params = {"INPUT": str(ATLANTA), "EXAMPLES": str(ATLANTA_BUILDINGS), "OUTPUT_FOLDER": str(tmp_path / "fc"),
              "EXTENT": "733601.0,734051.0,3724914.0,3725139.0 [EPSG:32616]"}
    fb = make_feedback()
    with pytest.raises(QgsProcessingException, match=NOT_STARTED):
        run_alg("srmf:findclass", params, fb)
    assert "--extent 733601.0,3724914.0,734051.0,3725139.0" in fb.commands[0] and "--mask" not in fb.commands[0]


def test_class_polygons_come_from_the_engine_sieved_to_the_minimum_mapping_unit(provider, tmp_path):
    """OUTPUT_POLYGONS to a shapefile (converted from the engine's GeoPackage) with MIN_AREA 1 m² on the 10 cm
    NEON scene: every polygon is at least 1 m², with class_id, class_name and area_m2."""
    from qgis.core import QgsVectorLayer

    fb = make_feedback()
    res = run_alg("srmf:segment", {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "c.tif"), "OUTPUT_AREAS": None,
                                   "PRECISION": 1, "MIN_AREA": 1.0, "OUTPUT_POLYGONS": str(tmp_path / "poly.shp")}, fb)
    assert "--min-area 1.0" in fb.commands[0] and "--polygons" in fb.commands[0]
    poly = res["OUTPUT_POLYGONS"]
    layer = poly if isinstance(poly, QgsVectorLayer) else QgsVectorLayer(str(poly), "p", "ogr")
    assert layer.isValid() and layer.featureCount() > 0, poly
    assert {"class_id", "class_name", "area_m2"} <= set(layer.fields().names())
    areas = [f["area_m2"] for f in layer.getFeatures()]
    assert min(areas) >= 1.0 - 1e-9


def test_simplified_class_polygons_still_share_their_edges(provider, tmp_path):
    """SIMPLIFY 1 px on the NEON scene's polygons (GeoPackage): fewer vertices than the pixel edges, and the
    polygons still tile the classified area — QGIS's own geometry engine finds no overlap between any two
    neighbours and their areas sum to the area of their union."""
    from qgis.core import QgsGeometry, QgsVectorLayer

    fb = make_feedback()
    common = {"INPUT": str(OSBS), "OUTPUT_AREAS": None, "PRECISION": 1, "MIN_AREA": 1.0}
    raw = run_alg("srmf:segment", {**common, "OUTPUT": str(tmp_path / "r.tif"),
                                   "OUTPUT_POLYGONS": str(tmp_path / "raw.gpkg")}, make_feedback())
    res = run_alg("srmf:segment", {**common, "OUTPUT": str(tmp_path / "s.tif"), "SIMPLIFY": 1.0,
                                   "OUTPUT_POLYGONS": str(tmp_path / "simple.gpkg")}, fb)
    assert "--simplify 1.0" in fb.commands[0]
    layers = [QgsVectorLayer(str(r["OUTPUT_POLYGONS"]), n, "ogr") for r, n in ((raw, "raw"), (res, "simple"))]
    feats = [list(layer.getFeatures()) for layer in layers]
    assert len(feats[0]) == len(feats[1]) > 5

    def vertices(fs):
        return sum(len(list(f.geometry().vertices())) for f in fs)

    assert vertices(feats[1]) < 0.9 * vertices(feats[0])  # (the outline along nodata is kept as it is)
    geoms = [f.geometry() for f in feats[1]]
    total = sum(g.area() for g in geoms)
    assert QgsGeometry.unaryUnion(geoms).area() == pytest.approx(total, rel=1e-9)  # no overlap
    assert total == pytest.approx(sum(f.geometry().area() for f in feats[0]), rel=1e-9)  # no gap, same outline
    assert all(f["area_m2"] == pytest.approx(f.geometry().area(), rel=1e-6) for f in feats[1])
