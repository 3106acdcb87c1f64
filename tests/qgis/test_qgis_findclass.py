"""srmf:findclass and srmf:findclasshandoff through QGIS Processing on a real Dubai tile: water found from
example polygons drawn on part of it, the outputs styled for review, a review edited in QGIS, the
hand-off into srmf:finetune."""
from __future__ import annotations

import json

import numpy as np
import pytest
from osgeo import gdal, ogr, osr
from polygons import polygonize_mask, write_rgb_geotiff
from srmf_qgis_testing import DATA, make_feedback, run_alg
from qgis.core import (QgsCategorizedSymbolRenderer, QgsProcessingException, QgsRasterLayer,
                       QgsSingleBandPseudoColorRenderer, QgsVectorLayer)

TILE_IMAGE = DATA / "dubai_hitl_aerial" / "tile_2" / "images" / "image_part_005.jpg"
TILE_MASK = DATA / "dubai_hitl_aerial" / "tile_2" / "masks" / "image_part_005.png"
WATER_RGB = (226, 169, 41)  # SOURCES.md: the Dubai mask colour of water
GT = (355000.0, 0.8, 0.0, 2790000.0, 0.0, -0.8)  # made-up UTM 40N georeferencing, 0.8 m pixels
PATCH = 64


def _water(mask_path):
    """Water pixels of a Dubai mask (RGB-coded, or paletted: the colour table gives each index's RGB)."""
    ds = gdal.Open(str(mask_path))
    arr = ds.ReadAsArray()
    table = ds.GetRasterBand(1).GetColorTable()
    if ds.RasterCount == 1 and table is not None:
        idx = [i for i in range(table.GetCount()) if tuple(table.GetColorEntry(i)[:3]) == WATER_RGB]
        ds = None
        return np.isin(arr, idx)
    ds = None
    return np.all(arr[:3] == np.array(WATER_RGB, dtype=arr.dtype).reshape(3, 1, 1), axis=0)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """dubai.tif (the real tile, UTM 40N) and water.gpkg (its real water, left third, cut in bands)."""
    d = tmp_path_factory.mktemp("findclass_scene")
    src = gdal.Open(str(TILE_IMAGE))
    img = src.ReadAsArray()
    src = None
    H, W = img.shape[1:]
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32640)
    write_rgb_geotiff(d / "dubai.tif", img, GT, srs)
    water = _water(TILE_MASK)
    examples = water.copy()
    examples[:, W // 3:] = False
    examples[::96] = False
    n = polygonize_mask(d / "water.gpkg", examples, GT, srs, "water")
    assert n >= 4
    empty = d / "empty.gpkg"
    polygonize_mask(empty, np.zeros_like(water), GT, srs, "nothing")
    return {"dir": d, "raster": d / "dubai.tif", "examples": d / "water.gpkg", "empty": empty, "water": water,
            "H": H, "W": W, "srs": srs}


@pytest.fixture(scope="module")
def found(provider, scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("findclass") / "water_search"
    fb = make_feedback()
    res = run_alg("srmf:findclass", {"INPUT": str(scene["raster"]), "EXAMPLES": str(scene["examples"]),
                                     "CLUSTERS": 3, "TOP_N": 40, "PATCH": PATCH, "DEVICE": 1,
                                     "OUTPUT_FOLDER": str(out)}, fb)
    return {"res": res, "fb": fb, "out": out}


def test_findclass_writes_a_relevance_raster_on_the_input_grid(found, scene):
    res, out = found["res"], found["out"]
    assert res["OUTPUT_RELEVANCE"] == str(out / "relevance.tif")
    rel = QgsRasterLayer(res["OUTPUT_RELEVANCE"], "relevance", "gdal")
    assert rel.isValid()
    assert rel.crs().authid() == "EPSG:32640"
    assert (rel.width(), rel.height()) == (-(-scene["W"] // 4), -(-scene["H"] // 4))
    ext = rel.extent()
    assert ext.xMinimum() == pytest.approx(GT[0]) and ext.yMaximum() == pytest.approx(GT[3])
    # the style written beside it (any project opening the file gets it)
    assert (out / "relevance.qml").exists()
    assert isinstance(rel.renderer(), QgsSingleBandPseudoColorRenderer)
    assert rel.renderer().classificationMin() == pytest.approx(res["THRESHOLD"], abs=1e-4)
    assert res["CLUSTERS_KEPT"] >= 1 and isinstance(res["RESEMBLES"], str) and res["RESEMBLES"]
    assert any("\nThreshold " in i for i in found["fb"].infos)
    assert found["fb"].progress and max(found["fb"].progress) == pytest.approx(100.0)


def test_candidates_rank_water_first_and_are_styled_for_review(found, scene):
    res = found["res"]
    cand = QgsVectorLayer(res["OUTPUT_CANDIDATES"], "candidates", "ogr")
    assert cand.isValid() and cand.featureCount() == res["CANDIDATES_WRITTEN"] > 20
    names = cand.fields().names()
    for f in ("rank", "score", "cluster", "status"):
        assert f in names
    feats = sorted(cand.getFeatures(), key=lambda f: f["rank"])
    assert {f["status"] for f in feats} == {"pending"}
    assert [f["rank"] for f in feats] == list(range(1, len(feats) + 1))
    # top 20 mostly on water (base rate of water on this tile ~0.3)
    water = scene["water"]
    hits = 0
    for f in feats[:20]:
        bb = f.geometry().boundingBox()
        x0 = int(round((bb.xMinimum() - GT[0]) / GT[1]))
        y0 = int(round((GT[3] - bb.yMaximum()) / -GT[5]))
        hits += water[y0:y0 + PATCH, x0:x0 + PATCH].mean() > 0.5
    assert hits / 20 >= 0.7, f"precision@20 {hits / 20:.2f}"
    # the review style is in the GeoPackage itself: opening the file gets it
    renderer = cand.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "status"
    assert [c.value() for c in renderer.categories()] == ["pending", "accepted", "rejected"]
    setup = cand.editorWidgetSetup(cand.fields().indexOf("status"))
    assert setup.type() == "ValueMap"
    assert cand.labelsEnabled()


def test_handoff_after_a_review_in_qgis_feeds_finetune(found, scene, tmp_path):
    """The analyst accepts the first five candidates and rejects the next two in QGIS; the hand-off
    keeps examples + accepted only and gives a base model with the new class that srmf:finetune takes."""
    src = found["out"] / "candidates.gpkg"
    review = tmp_path / "candidates.gpkg"
    gdal.VectorTranslate(str(review), str(src))  # a copy: the other tests read the original
    cand = QgsVectorLayer(f"{review}|layername=candidates", "candidates", "ogr")
    assert cand.isValid()
    idx = cand.fields().indexOf("status")
    assert cand.startEditing()
    for f in cand.getFeatures():
        if f["rank"] <= 5:
            cand.changeAttributeValue(f.id(), idx, "accepted")
        elif f["rank"] <= 7:
            cand.changeAttributeValue(f.id(), idx, "rejected")
    assert cand.commitChanges()
    n_examples = QgsVectorLayer(str(scene["examples"]), "ex", "ogr").featureCount()
    from srmf_qgis import runtime

    last_model = runtime.get_setting(runtime.SETTINGS_LAST_MODEL)
    out = tmp_path / "handoff"
    res = run_alg("srmf:findclasshandoff", {"CANDIDATES": f"{review}|layername=candidates",
                                            "CLASS_NAME": "pond", "COLOUR": "#1F78B4",
                                            "OUTPUT_FOLDER": str(out)})
    assert res["ACCEPTED"] == 5
    # its base model is not fine-tuned yet: the context menu must not start using it
    assert runtime.get_setting(runtime.SETTINGS_LAST_MODEL) == last_model
    labels = QgsVectorLayer(res["OUTPUT_LABELS"], "labels", "ogr")
    assert labels.featureCount() == n_examples + 5
    assert {f["class"] for f in labels.getFeatures()} == {"pond"}
    info = run_alg("srmf:modelinfo", {"MODEL": res["OUTPUT_BASE_MODEL"], "OUTPUT_CLASSES": None,
                                      "OUTPUT_HTML": None})
    names = [c["name"] for c in info["CLASSES"]]
    assert names[-1] == "pond" and len(names) == 6
    assert info["CLASSES"][-1]["colour"].upper() == "#1F78B4"
    table = json.loads(open(res["OUTPUT_CLASSES"], encoding="utf-8").read())
    assert [c["name"] for c in table["classes"]] == names
    # the hand-off's files go straight into srmf:finetune
    model = tmp_path / "pond.srmf"
    ft = run_alg("srmf:finetune", {
        "INPUT_RASTERS": [str(scene["raster"])], "LABELS": [res["OUTPUT_LABELS"]], "LABEL_FIELD": "class",
        "CLASSES_FILE": res["OUTPUT_CLASSES"], "BASE_MODEL": res["OUTPUT_BASE_MODEL"], "MAX_ITERATIONS": 1,
        "BATCH_SIZE": 2, "CROP_SIZE": 128, "VALIDATION_SHARE": 0.0, "DEVICE": 1, "OUTPUT_MODEL": str(model),
        "OUTPUT_METRICS": None})
    assert model.exists() and ft["OUTPUT_MODEL"] == str(model)
    assert [c["name"] for c in ft["CLASSES"]] == names


def test_findclass_bad_input_is_refused_and_leaves_nothing(provider, scene, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(QgsProcessingException, match="no polygons"):
        run_alg("srmf:findclass", {"INPUT": str(scene["raster"]), "EXAMPLES": str(scene["empty"]),
                                   "OUTPUT_FOLDER": str(out), "DEVICE": 1})
    assert not out.exists()
    # examples far outside the raster: the engine's message, no output folder left
    far = tmp_path / "far.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(far))
    lyr = ds.CreateLayer("far", srs=scene["srs"], geom_type=ogr.wkbPolygon)
    f = ogr.Feature(lyr.GetLayerDefn())
    f.SetGeometry(ogr.CreateGeometryFromWkt("POLYGON((100 100,200 100,200 200,100 200,100 100))"))
    lyr.CreateFeature(f)
    f = lyr = ds = None
    fb = make_feedback()
    with pytest.raises(QgsProcessingException, match="(?i)outside|overlap|do not|none of"):
        run_alg("srmf:findclass", {"INPUT": str(scene["raster"]), "EXAMPLES": str(far), "OUTPUT_FOLDER": str(out),
                                   "DEVICE": 1}, fb)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(QgsProcessingException):
        run_alg("srmf:findclass", {"INPUT": str(scene["raster"]), "EXAMPLES": str(scene["examples"]),
                                   "CLUSTERS": 0, "OUTPUT_FOLDER": str(out), "DEVICE": 1})
    with pytest.raises(QgsProcessingException, match="multiple of 4"):
        run_alg("srmf:findclass", {"INPUT": str(scene["raster"]), "EXAMPLES": str(scene["examples"]),
                                   "PATCH": 30, "OUTPUT_FOLDER": str(out), "DEVICE": 1})


def test_map_of_the_relevance_and_candidates(found, scene, artifacts):
    """Render what the analyst sees (relevance over the raster, candidate outlines) to a PNG."""
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    from srmf_qgis.quicklook import render_map

    res = found["res"]
    inp = QgsRasterLayer(str(scene["raster"]), "dubai", "gdal")
    rel = QgsRasterLayer(res["OUTPUT_RELEVANCE"], "relevance", "gdal")
    cand = QgsVectorLayer(res["OUTPUT_CANDIDATES"], "candidates", "ogr")
    image = render_map([cand, rel, inp], inp.extent(), inp.crs(), QSize(640, 680))
    path = artifacts / "map_findclass_water.png"
    assert image.save(str(path))
    seen = {QColor(image.pixel(x, y)).name().upper() for y in range(0, image.height(), 2)
            for x in range(0, image.width(), 2)}
    assert "#FFD400" in seen  # the pending candidates' outlines are drawn
