"""srmf:finetune and srmf:evaluate through QGIS Processing on real labels (Dubai tile, SpaceNet
building polygons); the numbers equal the engine's own CLI."""
from __future__ import annotations

import json

import pytest
from srmf_qgis_testing import (ATLANTA, DUBAI_IMAGE, MODEL_CLASSES, engine_cli, make_feedback, run_alg)
from qgis.core import QgsProcessingException, QgsRasterLayer

# The default model's classes, "land" renamed and recoloured: label values are the Dubai class ids.
DUBAI_TABLE = ["building", "#3C1098", "", "0", "",
               "bare soil", "#C08040", "A satellite image of bare soil and sand", "1", "land",
               "road", "#6EC1E4", "", "2", "",
               "vegetation", "#FEDD3A", "", "3", "",
               "water", "#E2A929", "", "4", ""]


@pytest.fixture(scope="module")
def dubai_model(provider, dubai_labels, tmp_path_factory):
    """srmf:finetune through Processing: the real Dubai tile and its label raster, a few iterations."""
    out = tmp_path_factory.mktemp("ft") / "dubai_finetuned.srmf"
    fb = make_feedback()
    res = run_alg("srmf:finetune", {
        "INPUT_RASTERS": [str(DUBAI_IMAGE)], "LABELS": [str(dubai_labels)], "CLASS_TABLE": DUBAI_TABLE,
        "MAX_ITERATIONS": 3, "BATCH_SIZE": 2, "CROP_SIZE": 256, "VALIDATION_SHARE": 0.25, "DEVICE": 1,
        "OUTPUT_MODEL": str(out), "OUTPUT_METRICS": "TEMPORARY_OUTPUT"}, fb)
    return {"results": res, "feedback": fb, "path": out}


def test_finetune_writes_a_model_with_the_class_table(dubai_model):
    res, fb, path = dubai_model["results"], dubai_model["feedback"], dubai_model["path"]
    assert res["OUTPUT_MODEL"] == str(path) and path.exists()
    info = run_alg("srmf:modelinfo", {"MODEL": str(path), "OUTPUT_CLASSES": None, "OUTPUT_HTML": None})
    names = [c["name"] for c in info["CLASSES"]]
    assert names == ["building", "bare soil", "road", "vegetation", "water"]
    soil = info["CLASSES"][1]
    assert soil["colour"].upper() == "#C08040" and soil["prompt"] == "A satellite image of bare soil and sand"
    # per-class validation IoU reported: in the results, in the table and as metrics lines
    assert set(res["PER_CLASS_IOU"]) <= set(names) and res["PER_CLASS_IOU"]
    assert res["MIOU"] is None or 0.0 <= res["MIOU"] <= 1.0
    table = {f["class_name"]: f["iou"] for f in res["OUTPUT_METRICS"].getFeatures()}
    assert set(table) == set(res["PER_CLASS_IOU"])
    assert any("per_class_iou" in m for m in fb.metrics)  # validation metrics relayed as they come
    assert any("loss" in m for m in fb.metrics)  # and the training loss
    assert any(i.startswith("Validation at iteration") for i in fb.infos)
    assert fb.progress and max(fb.progress) >= 99


def test_segment_uses_the_finetuned_model(dubai_model, tmp_path):
    out = tmp_path / "dubai_ft_classes.tif"
    res = run_alg("srmf:segment", {"INPUT": str(DUBAI_IMAGE), "MODEL": str(dubai_model["path"]), "TILE_SIZE": 256,
                                   "STRIDE": 256, "OUTPUT": str(out), "OUTPUT_AREAS": "TEMPORARY_OUTPUT"})
    assert res["MODEL_USED"] == str(dubai_model["path"])
    layer = QgsRasterLayer(str(out), "ft", "gdal")
    labels = [c.label for c in layer.renderer().classes()]
    assert labels == ["building", "bare soil", "road", "vegetation", "water"]
    assert layer.renderer().classes()[1].color.name().upper() == "#C08040"
    assert [f["class_name"] for f in res["OUTPUT_AREAS"].getFeatures()] == labels


def test_finetune_on_polygon_labels_with_a_class_field(provider, atlanta_polygon_labels, tmp_path):
    """Real SpaceNet building polygons + the rest as "other", class field "class", two new classes."""
    out = tmp_path / "atlanta.srmf"
    table = ["building", "#D0021B", "", "building", "",
             "other", "#9B9B9B", "A satellite image of streets and trees", "other", ""]
    res = run_alg("srmf:finetune", {
        "INPUT_RASTERS": [str(ATLANTA)], "LABELS": [str(atlanta_polygon_labels)], "LABEL_FIELD": "class",
        "CLASS_TABLE": table, "MAX_ITERATIONS": 2, "BATCH_SIZE": 2, "CROP_SIZE": 256, "VALIDATION_SHARE": 0.2,
        "DEVICE": 1,
        "OUTPUT_MODEL": str(out), "OUTPUT_METRICS": None})
    assert out.exists()
    assert [c["name"] for c in res["CLASSES"]] == ["building", "other"]


def test_finetune_refuses_bad_input_with_a_clear_message(provider, atlanta_polygon_labels, dubai_labels, tmp_path):
    out = tmp_path / "never.srmf"
    base = {"INPUT_RASTERS": [str(ATLANTA)], "LABELS": [str(atlanta_polygon_labels)], "MAX_ITERATIONS": 1,
            "OUTPUT_MODEL": str(out), "OUTPUT_METRICS": None}
    with pytest.raises(QgsProcessingException, match="class field"):
        run_alg("srmf:finetune", base)  # polygons without a class field
    with pytest.raises(QgsProcessingException, match="has no field 'landuse_code'.*class"):
        run_alg("srmf:finetune", dict(base, LABEL_FIELD="landuse_code"))
    with pytest.raises(QgsProcessingException, match="one label layer per training raster"):
        run_alg("srmf:finetune", dict(base, INPUT_RASTERS=[str(ATLANTA), str(DUBAI_IMAGE)], LABEL_FIELD="class"))
    with pytest.raises(QgsProcessingException, match="appears twice"):
        run_alg("srmf:finetune", dict(base, LABEL_FIELD="class",
                                      CLASS_TABLE=["a", "", "", "building", "", "A", "", "", "other", ""]))
    with pytest.raises(QgsProcessingException, match="#RRGGBB"):
        run_alg("srmf:finetune", dict(base, LABEL_FIELD="class", CLASS_TABLE=["a", "red", "", "building", ""]))
    assert not out.exists()


def test_evaluate_raster_reference_equals_the_engine(provider, dubai_prediction, dubai_labels, tmp_path):
    fb = make_feedback()
    csv = tmp_path / "accuracy.csv"
    res = run_alg("srmf:evaluate", {"PREDICTION": str(dubai_prediction), "REFERENCE": str(dubai_labels),
                                    "OUTPUT_TABLE": "TEMPORARY_OUTPUT", "OUTPUT_CSV": str(csv),
                                    "OUTPUT_JSON": str(tmp_path / "accuracy.json")}, fb)
    engine = engine_cli("evaluate", dubai_prediction, dubai_labels)
    for key, ours in (("overall_accuracy", "OVERALL_ACCURACY"), ("kappa", "KAPPA"), ("miou", "MIOU"),
                      ("tail_miou", "TAIL_MIOU")):
        assert res[ours] == pytest.approx(engine[key], abs=1e-12) if engine[key] is not None else res[ours] is None
    assert res["CONFUSION_MATRIX"] == engine["confusion_matrix"]
    rows = list(res["OUTPUT_TABLE"].getFeatures())
    assert [f["class_name"] for f in rows] == [c["name"] for c in engine["per_class"]]
    for f, c in zip(rows, engine["per_class"]):
        for k in ("precision", "recall", "f1", "iou"):
            assert (f[k] is None or str(f[k]) == "NULL") if c[k] is None else f[k] == pytest.approx(c[k])
        assert f["support"] == c["support"]
    assert csv.exists() and "building" in csv.read_text()
    assert json.loads((tmp_path / "accuracy.json").read_text())["miou"] == pytest.approx(engine["miou"])
    summary = "\n".join(fb.infos)
    assert "Overall accuracy" in summary and "Confusion matrix" in summary
    assert set(c["name"] for c in engine["per_class"]) <= set(MODEL_CLASSES)


def test_evaluate_polygon_reference_equals_the_engine(provider, tmp_path, atlanta_polygon_labels):
    pred = tmp_path / "atlanta_pred.tif"
    run_alg("srmf:segment", {"INPUT": str(ATLANTA), "TILE_SIZE": 512, "STRIDE": 512, "OUTPUT": str(pred),
                             "OUTPUT_AREAS": None})
    table = ["building", "", "", "building", "land", "", "", "other", "road", "", "", "", "vegetation", "", "", "",
             "water", "", "", ""]
    res = run_alg("srmf:evaluate", {"PREDICTION": str(pred), "REFERENCE": str(atlanta_polygon_labels),
                                    "REFERENCE_FIELD": "class", "CLASS_TABLE": table,
                                    "OUTPUT_TABLE": "TEMPORARY_OUTPUT"})
    classes = {"classes": [{"id": 0, "name": "building", "value": "building"}, {"id": 1, "name": "land", "value": "other"},
                           {"id": 2, "name": "road"}, {"id": 3, "name": "vegetation"}, {"id": 4, "name": "water"}]}
    cj = tmp_path / "classes.json"
    cj.write_text(json.dumps(classes))
    engine = engine_cli("evaluate", pred, atlanta_polygon_labels, "--reference-field", "class", "--classes", cj)
    assert res["OVERALL_ACCURACY"] == pytest.approx(engine["overall_accuracy"])
    assert res["MIOU"] == pytest.approx(engine["miou"])
    assert res["CONFUSION_MATRIX"] == engine["confusion_matrix"]
    support = {f["class_name"]: f["support"] for f in res["OUTPUT_TABLE"].getFeatures()}
    assert support["building"] > 0 and support["land"] > 0
    # about 4.2 % of the image is building (SOURCES.md)
    assert 0.03 < support["building"] / (900 * 900) < 0.055


def test_evaluate_polygon_reference_needs_its_class_field(provider, dubai_prediction, atlanta_polygon_labels):
    with pytest.raises(QgsProcessingException, match="class field"):
        run_alg("srmf:evaluate", {"PREDICTION": str(dubai_prediction), "REFERENCE": str(atlanta_polygon_labels),
                                  "OUTPUT_TABLE": None})
    with pytest.raises(QgsProcessingException, match="no field 'kind'"):
        run_alg("srmf:evaluate", {"PREDICTION": str(dubai_prediction), "REFERENCE": str(atlanta_polygon_labels),
                                  "REFERENCE_FIELD": "kind", "OUTPUT_TABLE": None})


def test_a_multispectral_fine_tune_through_processing(provider, dubai_labels, tmp_path):
    """srmf:finetune with *Model bands* red,green,blue,nir on a real 4-band raster (tests/rgbn.py: the Dubai tile's
    RGB and a real panchromatic band as "NIR"): the model lists four bands, srmf:segment reads them from the
    4-band raster and refuses the RGB one, naming the missing band."""
    from srmf_qgis_testing import ATLANTA as PAN
    from rgbn import write_rgbn

    paths = write_rgbn(tmp_path, DUBAI_IMAGE, PAN)
    out = tmp_path / "rgbn.srmf"
    fb = make_feedback()
    run_alg("srmf:finetune", {
        "INPUT_RASTERS": [str(paths["rgbn"])], "LABELS": [str(dubai_labels)], "MAX_ITERATIONS": 2, "BATCH_SIZE": 2,
        "CROP_SIZE": 128, "VALIDATION_SHARE": 0.25, "DEVICE": 1, "MODEL_BANDS": "red, green, blue, nir",
        "OUTPUT_MODEL": str(out), "OUTPUT_METRICS": "TEMPORARY_OUTPUT"}, fb)
    assert any("--model-bands red,green,blue,nir" in c for c in fb.commands)
    assert out.exists()
    from srmf_qgis.modelheader import read_header

    assert read_header(out)["input"]["bands"] == ["red", "green", "blue", "nir"]
    res = run_alg("srmf:segment", {"INPUT": str(paths["rgbn"]), "MODEL": str(out), "TILE_SIZE": 256, "STRIDE": 256,
                                   "DEVICE": 1, "OUTPUT": str(tmp_path / "c.tif"), "OUTPUT_AREAS": None})
    assert QgsRasterLayer(res["OUTPUT"], "c", "gdal").isValid()
    with pytest.raises(QgsProcessingException, match=r"the model reads 4 \(red, green, blue, nir\)"):
        run_alg("srmf:segment", {"INPUT": str(paths["rgb"]), "MODEL": str(out), "DEVICE": 1,
                                 "OUTPUT": str(tmp_path / "d.tif"), "OUTPUT_AREAS": None})
    assert not (tmp_path / "d.tif").exists()
