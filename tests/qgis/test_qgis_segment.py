"""srmf:segment through QGIS Processing on the real GeoTIFFs: CRS, extent, styles, areas, polygons,
cancel, bad input. The engine runs in the repository's .venv, in its own process."""
from __future__ import annotations

import json
import os

import pytest
from srmf_qgis_testing import (ADELAIDE, ATLANTA, MODEL_CLASSES, OSBS, make_feedback, process_group_members, run_alg)
from qgis.core import (QgsApplication, QgsProcessingException, QgsProject, QgsRasterLayer, QgsVectorLayer)


def _assert_styled_like_model(layer: QgsRasterLayer):
    r = layer.renderer()
    assert r.type() == "paletted"
    classes = r.classes()
    assert [c.label for c in classes] == MODEL_CLASSES  # only the model's classes, not 256 entries
    assert [int(c.value) for c in classes] == list(range(5))
    assert classes[0].color.name().upper() == "#3C1098"


def test_provider_and_algorithms_registered(provider):
    registry = QgsApplication.processingRegistry()
    p = registry.providerById("srmf")
    assert p is not None and p.name() == "SRMF"
    ids = sorted(a.id() for a in p.algorithms())
    assert ids == ["srmf:evaluate", "srmf:findclass", "srmf:findclasshandoff", "srmf:finetune", "srmf:modelinfo",
                   "srmf:pretrain", "srmf:segment"]
    seg = registry.algorithmById("srmf:segment")
    names = [d.name() for d in seg.parameterDefinitions()]
    for expected in ("INPUT", "MODEL", "BANDS", "TILE_SIZE", "STRIDE", "BATCH_SIZE", "DEVICE", "GPU_ID", "OUTPUT",
                     "OUTPUT_PROBABILITIES", "OUTPUT_POLYGONS", "OUTPUT_AREAS"):
        assert expected in names
    ft = registry.algorithmById("srmf:finetune")
    for expected in ("INPUT_RASTERS", "LABELS", "LABEL_FIELD", "CLASS_TABLE", "BASE_MODEL", "MAX_ITERATIONS",
                     "BATCH_SIZE", "LEARNING_RATE", "VALIDATION_SHARE", "DEVICE", "OUTPUT_MODEL"):
        assert expected in [d.name() for d in ft.parameterDefinitions()]
    fc = registry.algorithmById("srmf:findclass")
    for expected in ("INPUT", "EXAMPLES", "NEGATIVE_FIELD", "MODEL", "CLUSTERS", "TOP_N", "PATCH", "DEVICE",
                     "OUTPUT_FOLDER"):
        assert expected in [d.name() for d in fc.parameterDefinitions()]
    for alg in p.algorithms():
        assert alg.shortHelpString() and alg.displayName()
        assert not alg.icon().isNull()


def test_modelinfo_of_the_default_model(provider, tmp_path):
    fb = make_feedback()
    res = run_alg("srmf:modelinfo", {"OUTPUT_CLASSES": "TEMPORARY_OUTPUT", "OUTPUT_HTML": str(tmp_path / "m.html")}, fb)
    assert res["CLASS_COUNT"] == 5
    assert res["BACKBONE"] == "efficientnet_lite0"
    assert [c["name"] for c in res["CLASSES"]] == MODEL_CLASSES
    table = res["OUTPUT_CLASSES"]
    assert [f["class_name"] for f in table.getFeatures()] == MODEL_CLASSES
    assert "building" in (tmp_path / "m.html").read_text()
    # the shipped default model is trained (resources/models/README.md): no placeholder warning, and its
    # validation metrics on the held-out Dubai tile travel with it
    assert not any("UNTRAINED" in w for w in fb.warnings)
    # the log carries the engine's description (core.model.modelfile.describe): classes and training GSD
    log = "\n".join(fb.infos)
    assert "Classes:" in log and "Ground sample distance: 0.8 m" in log
    metrics = json.loads(res["METRICS"])
    assert 0.5 < metrics["miou"] <= 1.0 and set(metrics["per_class_iou"]) == set(MODEL_CLASSES)


def test_segment_geographic_raster_keeps_crs_and_extent(adelaide_segmented):
    """EPSG:4326: same CRS, extent and size; paletted style from the model; areas left out, with a note."""
    res, fb, tmp_path = adelaide_segmented["results"], adelaide_segmented["feedback"], adelaide_segmented["folder"]
    out = tmp_path / "adelaide_classes.tif"
    assert res["OUTPUT"] == str(out)
    src = QgsRasterLayer(str(ADELAIDE), "in", "gdal")
    layer = QgsRasterLayer(str(out), "out", "gdal")
    assert layer.isValid()
    assert layer.crs().authid() == "EPSG:4326" == src.crs().authid()
    assert layer.extent() == src.extent()
    assert (layer.width(), layer.height()) == (1024, 1024)
    _assert_styled_like_model(layer)  # from the .qml written beside it: a new layer, as in a new project
    assert (tmp_path / "adelaide_classes.qml").exists()
    assert "geographic" in res["AREA_NOTE"]
    areas = list(res["OUTPUT_AREAS"].getFeatures())
    assert [f["class_name"] for f in areas] == MODEL_CLASSES
    assert sum(f["pixels"] for f in areas) == 1024 * 1024
    assert all(f["area_m2"] is None or str(f["area_m2"]) == "NULL" for f in areas)
    assert any("geographic" in w for w in fb.warnings)
    assert fb.progress and max(fb.progress) >= 98


def test_segment_utm_raster_with_polygons_probabilities_and_areas(osbs_segmented):
    """EPSG:32617 with nodata: CRS, extent, areas in m² and ha, probabilities, class polygons styled."""
    res, folder = osbs_segmented["results"], osbs_segmented["folder"]
    src = QgsRasterLayer(str(OSBS), "in", "gdal")
    layer = QgsRasterLayer(res["OUTPUT"], "out", "gdal")
    assert layer.crs().authid() == "EPSG:32617"
    assert layer.extent() == src.extent()
    _assert_styled_like_model(layer)
    assert layer.dataProvider().sourceNoDataValue(1) == 255
    # 10 cm pixels, a 0.8 m model, blank processing resolution: run at the model's scale, and the result says so
    assert res["PROCESSING"].startswith("processing at 0.8 m (the raster's pixels are 0.1 m): 400 x 400 px shrunk")
    areas = list(res["OUTPUT_AREAS"].getFeatures())
    pixels = sum(f["pixels"] for f in areas)
    assert 0 < pixels <= 400 * 400
    for f in areas:  # 10 cm pixels: 0.01 m² each
        assert f["area_m2"] == pytest.approx(f["pixels"] * 0.01, rel=1e-6)
        assert f["area_ha"] == pytest.approx(f["area_m2"] / 1e4, rel=1e-9)
    assert sum(f["share_pct"] for f in areas) == pytest.approx(100.0, abs=0.01)
    assert any("area (ha)" in i for i in osbs_segmented["feedback"].infos)
    prob = QgsRasterLayer(res["OUTPUT_PROBABILITIES"], "p", "gdal")
    assert prob.isValid() and prob.bandCount() == 5 and prob.crs().authid() == "EPSG:32617"
    poly = QgsVectorLayer(res["OUTPUT_POLYGONS"], "poly", "ogr")
    assert poly.isValid() and poly.featureCount() > 0
    assert poly.crs().authid() == "EPSG:32617"
    assert {"class_id", "class_name"} <= set(poly.fields().names())
    names = {f["class_name"] for f in poly.getFeatures()}
    ids = {f["class_id"] for f in poly.getFeatures()}
    assert names <= set(MODEL_CLASSES) and 255 not in ids
    assert poly.renderer().type() == "categorizedSymbol"  # the .qml beside it
    cats = poly.renderer().categories()
    assert [c.label() for c in cats] == MODEL_CLASSES
    assert cats[0].symbol().color().name().upper() == "#3C1098"


def test_run_and_load_results_styles_the_loaded_layers(provider, tmp_path, clean_project):
    """As from the Toolbox: Processing loads the outputs; the post-processors style and name them."""
    import processing

    out = tmp_path / "osbs_loaded.tif"
    processing.runAndLoadResults("srmf:segment", {
        "INPUT": str(OSBS), "TILE_SIZE": 256, "STRIDE": 256, "OUTPUT": str(out),
        "OUTPUT_POLYGONS": str(tmp_path / "osbs_loaded.gpkg"), "OUTPUT_AREAS": None}, feedback=make_feedback())
    layers = list(QgsProject.instance().mapLayers().values())
    rasters = [l for l in layers if isinstance(l, QgsRasterLayer)]
    vectors = [l for l in layers if isinstance(l, QgsVectorLayer)]
    assert len(rasters) == 1 and len(vectors) == 1
    _assert_styled_like_model(rasters[0])
    assert "SRMF classes" in rasters[0].name()
    assert vectors[0].renderer().type() == "categorizedSymbol"


def test_segment_one_band_uint16_raster(provider, tmp_path):
    """The 1-band uint16 panchromatic raster (replicated to R, G, B; stretched, with a log line)."""
    out = tmp_path / "atlanta.tif"
    fb = make_feedback()
    res = run_alg("srmf:segment", {"INPUT": str(ATLANTA), "TILE_SIZE": 512, "STRIDE": 512, "OUTPUT": str(out),
                                   "OUTPUT_AREAS": "TEMPORARY_OUTPUT"}, fb)
    layer = QgsRasterLayer(str(out), "a", "gdal")
    assert layer.crs().authid() == "EPSG:32616"
    assert layer.extent() == QgsRasterLayer(str(ATLANTA), "in", "gdal").extent()
    _assert_styled_like_model(layer)
    assert any("scaling" in i for i in fb.infos)
    areas = list(res["OUTPUT_AREAS"].getFeatures())
    assert all(f["area_m2"] == pytest.approx(f["pixels"] * 0.25) for f in areas)


def test_cancel_stops_the_worker_and_leaves_no_output(provider, tmp_path):
    out = tmp_path / "cancelled.tif"
    fb = make_feedback(cancel_after_progress=True)
    with pytest.raises(QgsProcessingException, match="(?i)cancel"):
        run_alg("srmf:segment", {"INPUT": str(ADELAIDE), "TILE_SIZE": 256, "STRIDE": 128, "OUTPUT": str(out),
                                 "OUTPUT_PROBABILITIES": str(tmp_path / "cancelled_p.tif"),
                                 "OUTPUT_AREAS": None}, fb)
    pid = fb.worker_pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert process_group_members(pid) == []  # no child of the worker survives
    assert not out.exists() and not (tmp_path / "cancelled_p.tif").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial file either
    assert max(fb.progress) < 100


def test_corrupt_raster_gives_a_clear_error(provider, tmp_path):
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(b"II*\x00" + os.urandom(4000))
    out = tmp_path / "out.tif"
    with pytest.raises(QgsProcessingException) as err:
        run_alg("srmf:segment", {"INPUT": str(bad), "OUTPUT": str(out), "OUTPUT_AREAS": None})
    msg = str(err.value)
    assert "corrupt.tif" in msg and "not a raster GDAL can read" in msg
    assert "Traceback" not in msg
    assert not out.exists()


def test_corrupt_model_gives_a_clear_error(provider, tmp_path):
    bad = tmp_path / "broken.srmf"
    bad.write_bytes(b"this is not a model file at all")
    out = tmp_path / "out.tif"
    with pytest.raises(QgsProcessingException) as err:
        run_alg("srmf:segment", {"INPUT": str(OSBS), "MODEL": str(bad), "OUTPUT": str(out), "OUTPUT_AREAS": None})
    assert "broken.srmf" in str(err.value) and "not an SRMF model" in str(err.value)
    assert not out.exists()
    pickle = tmp_path / "weights.srmf"
    pickle.write_bytes(b"\x80\x04\x95" + os.urandom(64))
    with pytest.raises(QgsProcessingException, match="pickle"):
        run_alg("srmf:segment", {"INPUT": str(OSBS), "MODEL": str(pickle), "OUTPUT": str(out), "OUTPUT_AREAS": None})


def test_missing_model_file_and_wrong_extension(provider, tmp_path):
    with pytest.raises(QgsProcessingException, match="does not exist"):
        run_alg("srmf:segment", {"INPUT": str(OSBS), "MODEL": str(tmp_path / "nope.srmf"),
                                 "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None})
    with pytest.raises(QgsProcessingException, match=r"\.tif"):
        run_alg("srmf:segment", {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "o.png"), "OUTPUT_AREAS": None})


def test_bad_tile_size_is_refused_by_the_engine(provider, tmp_path):
    with pytest.raises(QgsProcessingException, match="window"):
        run_alg("srmf:segment", {"INPUT": str(OSBS), "TILE_SIZE": 100, "OUTPUT": str(tmp_path / "o.tif"),
                                 "OUTPUT_AREAS": None})
    assert not (tmp_path / "o.tif").exists()


def test_interpreter_without_torch_says_how_to_fix_it(provider, tmp_path, monkeypatch):
    monkeypatch.setenv("SRMF_PYTHON", "/usr/bin/python3")  # Debian's Python: GDAL, no torch
    with pytest.raises(QgsProcessingException) as err:
        run_alg("srmf:segment", {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None})
    assert "torch" in str(err.value) and "Install dependencies" in str(err.value)
    monkeypatch.setenv("SRMF_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(QgsProcessingException, match="does not exist"):
        run_alg("srmf:segment", {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None})
    assert not (tmp_path / "o.tif").exists()


def test_explicit_bands_cpu_device_and_float32_reach_the_engine(provider, tmp_path):
    fb = make_feedback()
    run_alg("srmf:segment", {"INPUT": str(OSBS), "BANDS": [3, 2, 1], "TILE_SIZE": 256, "STRIDE": 256,
                             "BATCH_SIZE": 2, "DEVICE": 1, "PRECISION": 1, "OUTPUT": str(tmp_path / "o.tif"),
                             "OUTPUT_AREAS": None}, fb)
    cmd = fb.commands[0]
    assert "--bands 3,2,1" in cmd and "--device cpu" in cmd and "--batch-size 2" in cmd
    assert "--precision fp32" in cmd  # PRECISION "float32 (exact)": the engine accepts it and runs
    assert any("bands [3, 2, 1]" in i for i in fb.infos)
