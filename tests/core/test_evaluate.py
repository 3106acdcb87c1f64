"""Accuracy assessment (``evaluate``) on real labels: a Dubai mask against a shifted copy of itself and
the SpaceNet Atlanta building polygons against a shifted rasterisation of them. Every expected number is
computed here independently (the masks decoded with PIL, the polygons rasterised with ``gdal.Rasterize``,
the matrix counted with boolean masks per cell, the metrics with plain Python loops)."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr
from PIL import Image

from conftest import ATLANTA, DATA, read_band
from core.errors import InputError
from core.evaluate.command import add_evaluate_arguments, run_evaluate_command
from core.evaluate.report import confusion_csv_path
from core.metrics import confusion_matrix, metrics_from_confusion
from core.evaluate.job import evaluate_rasters
from core.protocol import Reporter

gdal.UseExceptions()

DUBAI = DATA / "dubai_hitl_aerial" / "tile_1"
DUBAI_MASK = DUBAI / "masks" / "image_part_009.png"  # 797 x 644, all 5 classes, 1.9 % unlabelled/black
DUBAI_IMAGE = DUBAI / "images" / "image_part_009.jpg"
ATLANTA_POLYGONS = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"
# SOURCES.md section 5: the true mask colours; unlabeled (155,155,155) and black are not classes.
DUBAI_COLOURS = [("building", (60, 16, 152)), ("land", (132, 41, 246)), ("road", (110, 193, 228)),
                 ("vegetation", (254, 221, 58)), ("water", (226, 169, 41))]
NAMES = [n for n, _ in DUBAI_COLOURS]
SHIFT = (9, 13)  # rows, columns


# -- independent reference computations -------------------------------------------------------------
def decode_dubai(path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    ids = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for k, (_, (r, g, b)) in enumerate(DUBAI_COLOURS):
        ids[(rgb[..., 0] == r) & (rgb[..., 1] == g) & (rgb[..., 2] == b)] = k
    return ids


def shifted(ids: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.full_like(ids, 255)
    out[dy:, dx:] = ids[:ids.shape[0] - dy, :ids.shape[1] - dx]
    return out


def count_matrix(pred: np.ndarray, ref: np.ndarray, k: int) -> list:
    """cm[r][p] by one boolean mask per cell (values outside 0..k-1, e.g. 255, never match)."""
    return [[int(np.count_nonzero((ref == r) & (pred == p))) for p in range(k)] for r in range(k)]


def loop_metrics(cm: list) -> dict:
    k = len(cm)
    n = sum(sum(row) for row in cm)
    rows = [sum(cm[i]) for i in range(k)]
    cols = [sum(cm[r][i] for r in range(k)) for i in range(k)]
    diag = [cm[i][i] for i in range(k)]
    po = sum(diag) / n
    pe = sum(rows[i] * cols[i] for i in range(k)) / (n * n)
    freqs = [rows[i] / n for i in range(k)]
    med = statistics.median([f for f in freqs if f > 0])
    return {
        "oa": po, "kappa": (po - pe) / (1 - pe), "n": n,
        "iou": [diag[i] / (rows[i] + cols[i] - diag[i]) if rows[i] + cols[i] else None for i in range(k)],
        "precision": [diag[i] / cols[i] if cols[i] else None for i in range(k)],
        "recall": [diag[i] / rows[i] if rows[i] else None for i in range(k)],
        "f1": [2 * diag[i] / (rows[i] + cols[i]) if rows[i] + cols[i] else None for i in range(k)],
        "freq": freqs, "tail": [i for i in range(k) if 0 < freqs[i] < med],
    }


def write_raster(path, arr, *, gt=None, epsg=None, nodata=255, names=NAMES, colours=False, dtype=gdal.GDT_Byte):
    ds = gdal.GetDriverByName("GTiff").Create(str(path), arr.shape[1], arr.shape[0], 1, dtype)
    if gt is not None:
        ds.SetGeoTransform(gt)
    if epsg is not None:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        ds.SetSpatialRef(srs)
    band = ds.GetRasterBand(1)
    band.WriteArray(arr)
    if nodata is not None:
        band.SetNoDataValue(nodata)
    if names:
        band.SetCategoryNames(list(names))
    if colours:
        ct = gdal.ColorTable()
        for k, (_, rgb) in enumerate(DUBAI_COLOURS):
            ct.SetColorEntry(k, (*rgb, 255))
        band.SetColorTable(ct)
    band = None
    ds = None
    return Path(path)


def assert_matches(res: dict, cm: list, names=NAMES):
    exp = loop_metrics(cm)
    assert res["confusion_matrix"] == cm
    assert res["pixels_evaluated"] == exp["n"]
    assert res["overall_accuracy"] == pytest.approx(exp["oa"], rel=1e-12)
    assert res["kappa"] == pytest.approx(exp["kappa"], rel=1e-12)
    assert [c["name"] for c in res["per_class"]] == list(names)
    for i, pc in enumerate(res["per_class"]):
        for key in ("iou", "precision", "recall", "f1"):
            want = exp[key][i]
            assert pc[key] == (None if want is None else pytest.approx(want, rel=1e-12)), (pc["name"], key)
        assert pc["frequency"] == pytest.approx(exp["freq"][i], rel=1e-12)
        assert pc["support"] == sum(cm[i])
    ious = [v for v in exp["iou"] if v is not None]
    assert res["miou"] == pytest.approx(sum(ious) / len(ious), rel=1e-12)
    assert res["tail_classes"] == [names[i] for i in exp["tail"]]
    tail = [exp["iou"][i] for i in exp["tail"]]
    assert res["tail_miou"] == (pytest.approx(sum(tail) / len(tail), rel=1e-12) if tail else None)


@pytest.fixture(autouse=True)
def small_strips(monkeypatch):
    """Strips of about 50 rows, so that every test reads, warps and rasterises block by block."""
    monkeypatch.setattr("core.evaluate.reference._STRIP_PIXELS", 40_000)


@pytest.fixture(scope="module")
def dubai_ids():
    return decode_dubai(DUBAI_MASK)


@pytest.fixture(scope="module")
def atlanta_buildings():
    """SpaceNet building polygons rasterised onto the GeoTIFF's grid with gdal.Rasterize (1 = building)."""
    src = gdal.Open(str(ATLANTA))
    mem = gdal.GetDriverByName("MEM").Create("", src.RasterXSize, src.RasterYSize, 1, gdal.GDT_Byte)
    mem.SetGeoTransform(src.GetGeoTransform())
    mem.SetProjection(src.GetProjection())
    vec = gdal.OpenEx(str(ATLANTA_POLYGONS), gdal.OF_VECTOR)
    gdal.Rasterize(mem, vec, burnValues=[1])  # the MEM band starts at 0
    arr = mem.GetRasterBand(1).ReadAsArray()
    mem = None
    vec = None
    src = None
    return arr


def atlanta_prediction(tmp_path, buildings) -> Path:
    ds = gdal.Open(str(ATLANTA))
    gt, wkt = ds.GetGeoTransform(), ds.GetProjection()
    ds = None
    pred = shifted(buildings, 4, 6)
    pred[:4, :] = 0
    pred[:, :6] = 0
    path = tmp_path / "atlanta_pred.tif"
    out = gdal.GetDriverByName("GTiff").Create(str(path), pred.shape[1], pred.shape[0], 1, gdal.GDT_Byte)
    out.SetGeoTransform(gt)
    out.SetProjection(wkt)
    out.GetRasterBand(1).WriteArray(pred)
    out.GetRasterBand(1).SetNoDataValue(255)
    out = None
    return path


def class_table(tmp_path, entries, name="classes.json", **extra) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"classes": entries, **extra}))
    return p


# -- confusion matrix and metrics --------------------------------------------------------------------
def test_confusion_matrix_accumulates_over_blocks_and_ignores_255(dubai_ids):
    ref = dubai_ids
    pred = shifted(ref, *SHIFT)
    whole = confusion_matrix(pred, ref, 5)
    assert whole.dtype == np.int64 and whole.shape == (5, 5)
    assert whole.tolist() == count_matrix(pred, ref, 5)
    acc = np.zeros((5, 5), dtype=np.int64)
    for y in range(0, ref.shape[0], 100):
        confusion_matrix(pred[y:y + 100], ref[y:y + 100], 5, out=acc)
    assert np.array_equal(acc, whole)
    assert whole.sum() == np.count_nonzero((pred != 255) & (ref != 255))
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 5)
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros(3), np.zeros(4), 5)


def test_metric_rules_absent_classes_and_median_ties():
    # class 0: 60 px, class 1: 20, class 2: 20, class 3: absent and never predicted, class 4: absent but
    # predicted 5 times. Present frequencies 0.6, 0.2, 0.2 -> median 0.2: no class is strictly below.
    cm = np.array([[50, 5, 0, 0, 5], [2, 18, 0, 0, 0], [0, 0, 20, 0, 0], [0] * 5, [0] * 5])
    m = metrics_from_confusion(cm, list("abcde"))
    iou = [pc["iou"] for pc in m["per_class"]]
    assert iou[3] is None and iou[4] == 0.0 and m["per_class"][3]["precision"] is None
    assert m["miou"] == pytest.approx((50 / 62 + 18 / 25 + 1.0 + 0.0) / 4)
    assert m["tail_classes"] == [] and m["tail_miou"] is None
    # 4 present classes 40/30/20/10 px: median 0.25, tail = the two below it.
    m = metrics_from_confusion(np.diag([40, 30, 20, 10]), list("abcd"))
    assert m["tail_classes"] == ["c", "d"] and m["tail_miou"] == 1.0 and m["kappa"] == 1.0
    # A single class everywhere: kappa undefined.
    assert metrics_from_confusion(np.array([[7, 0], [0, 0]]), ["a", "b"])["kappa"] is None


# -- class rasters -------------------------------------------------------------------------------------
def test_dubai_label_vs_shifted_copy_and_outputs(tmp_path, dubai_ids):
    pred = shifted(dubai_ids, *SHIFT)
    p = write_raster(tmp_path / "pred.tif", pred)
    r = write_raster(tmp_path / "ref.tif", dubai_ids, names=None, nodata=None)
    out_json, out_csv = tmp_path / "eval.json", tmp_path / "eval.csv"
    res = evaluate_rasters(p, r, output_json=out_json, output_csv=out_csv)  # classes: the category names
    cm = count_matrix(pred, dubai_ids, 5)
    assert_matches(res, cm)
    assert 0.5 < res["overall_accuracy"] < 0.99 and res["tail_classes"]  # a real, imperfect agreement
    assert [c["name"] for c in res["classes"]] == NAMES
    # JSON: the returned dict, parseable.
    assert json.loads(out_json.read_text()) == res
    assert res["json"] == str(out_json) and res["csv"] == str(out_csv)
    # CSV: one row per class, then summary rows.
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    per = {row["name"]: row for row in rows if row["id"] != ""}
    summary = {row["name"]: row["value"] for row in rows if row["id"] == ""}
    exp = loop_metrics(cm)
    for i, name in enumerate(NAMES):
        assert int(per[name]["support"]) == sum(cm[i])
        assert float(per[name]["iou"]) == pytest.approx(exp["iou"][i], abs=1e-6)
        assert per[name]["tail_class"] == ("yes" if i in exp["tail"] else "no")
    assert float(summary["overall_accuracy"]) == pytest.approx(exp["oa"], abs=1e-6)
    assert float(summary["kappa"]) == pytest.approx(exp["kappa"], abs=1e-6)
    assert int(summary["pixels_evaluated"]) == exp["n"]
    # The confusion-matrix CSV beside it.
    cm_rows = list(csv.reader(io.StringIO(confusion_csv_path(out_csv).read_text())))
    assert cm_rows[0] == ["reference \\ prediction", *NAMES, "total"]
    assert [[int(v) for v in row[1:6]] for row in cm_rows[1:6]] == cm
    assert int(cm_rows[-1][-1]) == exp["n"]
    assert sorted(f.name for f in tmp_path.iterdir() if ".tif" not in f.name) == \
        ["eval.csv", "eval.json", "eval_confusion.csv"]  # and no temporary file left


def test_reference_values_nodata_mask_and_prediction_nodata(tmp_path, dubai_ids):
    """Reference stored as uint16 values 10..14 (class table 'value'), nodata 0 on unlabelled pixels, a
    block masked out by a mask band (its values are valid classes), stripes of values of no class; the
    prediction has its own nodata value (200) on a block and 255 along the shifted border."""
    pred = shifted(dubai_ids, *SHIFT)
    pred[100:180, 300:420] = 200
    ref16 = np.where(dubai_ids == 255, 0, dubai_ids.astype(np.uint16) + 10).astype(np.uint16)
    ref16[600:610, :] = 99  # a value of no class: ignored, with a warning
    ref16[620:625, :] = 98  # a value the class table lists under "ignore": ignored silently
    p = write_raster(tmp_path / "pred.tif", pred, names=None, nodata=200)
    ds = gdal.GetDriverByName("GTiff").Create(str(tmp_path / "ref.tif"), 797, 644, 1, gdal.GDT_UInt16)
    ds.GetRasterBand(1).WriteArray(ref16)
    ds.CreateMaskBand(gdal.GMF_PER_DATASET)
    mask = np.full(ref16.shape, 255, dtype=np.uint8)
    mask[400:520, 50:250] = 0
    ds.GetRasterBand(1).GetMaskBand().WriteArray(mask)
    ds = None
    table = class_table(tmp_path, [{"name": n, "colour": "#%02X%02X%02X" % c, "prompt": f"A satellite image of {n}",
                                    "value": 10 + k} for k, (n, c) in enumerate(DUBAI_COLOURS)], ignore=[98])
    lines = io.StringIO()
    res = evaluate_rasters(p, tmp_path / "ref.tif", classes=table, reporter=Reporter(json_mode=True, stream=lines))
    ref_ids = np.where((ref16 >= 10) & (ref16 <= 14), ref16.astype(np.int64) - 10, 255)
    ref_ids[400:520, 50:250] = 255
    assert np.count_nonzero(ref_ids[400:520, 50:250] != 255) == 0 < np.count_nonzero(ref16[400:520, 50:250] >= 10)
    cm = count_matrix(np.where(pred == 200, 255, pred), ref_ids, 5)
    assert_matches(res, cm)
    assert res["ignored_pixels"]["prediction_nodata"] == int(np.count_nonzero((pred == 200) | (pred == 255)))
    assert res["json"] is None and res["csv"] is None
    msgs = [json.loads(line) for line in lines.getvalue().splitlines()]
    warnings = [m["message"] for m in msgs if m.get("level") == "warning"]
    # "98 (": the value with its count — the bare "98" also matched a pytest-98 temporary folder in the path
    assert len(warnings) == 1 and "99 (7970 px)" in warnings[0] and "98 (" not in warnings[0]


def test_colour_coded_reference_is_decoded_with_the_class_colours(tmp_path, dubai_ids):
    """The mask PNG itself (RGB) as the reference: decoded with the prediction's colour table."""
    pred = shifted(dubai_ids, *SHIFT)
    p = write_raster(tmp_path / "pred.tif", pred, colours=True)
    res = evaluate_rasters(p, DUBAI_MASK)
    assert_matches(res, count_matrix(pred, dubai_ids, 5))


def test_reference_on_another_grid_is_resampled_nearest(tmp_path, dubai_ids):
    """A reference that is a crop of the label on its own (coarser-extent) grid, both in EPSG:32616."""
    gt = (733601.0, 0.5, 0.0, 3725139.0, 0.0, -0.5)
    pred = shifted(dubai_ids, *SHIFT)
    p = write_raster(tmp_path / "pred.tif", pred, gt=gt, epsg=32616)
    y0, y1, x0, x1 = 30, 560, 40, 700
    crop_gt = (gt[0] + x0 * 0.5, 0.5, 0.0, gt[3] - y0 * 0.5, 0.0, -0.5)
    # Its nodata value is declared as 4 (water): the water pixels of the reference are ignored too.
    r = write_raster(tmp_path / "ref.tif", dubai_ids[y0:y1, x0:x1], gt=crop_gt, epsg=32616, names=None, nodata=4)
    res = evaluate_rasters(p, r)
    placed = np.full_like(dubai_ids, 255)
    placed[y0:y1, x0:x1] = dubai_ids[y0:y1, x0:x1]
    placed[placed == 4] = 255
    assert_matches(res, count_matrix(pred, placed, 5))


def test_sizes_differ_without_crs_is_refused(tmp_path, dubai_ids):
    p = write_raster(tmp_path / "pred.tif", shifted(dubai_ids, *SHIFT))
    r = write_raster(tmp_path / "ref.tif", dubai_ids[:500, :600], names=None)
    before = sorted(f.name for f in tmp_path.iterdir())
    with pytest.raises(InputError, match=r"600 x 500 px.*no CRS"):
        evaluate_rasters(p, r, output_json=tmp_path / "e.json", output_csv=tmp_path / "e.csv")
    assert sorted(f.name for f in tmp_path.iterdir()) == before


def test_prediction_ids_outside_the_class_table_are_refused(tmp_path, dubai_ids):
    pred = shifted(dubai_ids, *SHIFT)
    pred[:5, :5] = 7
    p = write_raster(tmp_path / "pred.tif", pred)
    r = write_raster(tmp_path / "ref.tif", dubai_ids, names=None)
    with pytest.raises(InputError, match=r"not in the class table.*7 \(25 px\)"):
        evaluate_rasters(p, r, output_json=tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()


def test_existing_output_needs_overwrite(tmp_path, dubai_ids):
    p = write_raster(tmp_path / "pred.tif", shifted(dubai_ids, *SHIFT))
    r = write_raster(tmp_path / "ref.tif", dubai_ids, names=None)
    out_json, out_csv = tmp_path / "e.json", tmp_path / "e.csv"
    out_csv.write_text("keep me")
    with pytest.raises(InputError, match=r"e\.csv exists.*--overwrite"):
        evaluate_rasters(p, r, output_json=out_json, output_csv=out_csv)
    assert out_csv.read_text() == "keep me" and not out_json.exists()
    assert not confusion_csv_path(out_csv).exists()
    res = evaluate_rasters(p, r, output_json=out_json, output_csv=out_csv, overwrite=True)
    assert out_csv.read_text().startswith("id,name,") and json.loads(out_json.read_text()) == res


# -- polygons ----------------------------------------------------------------------------------------
def test_polygon_reference_spacenet(tmp_path, atlanta_buildings):
    assert atlanta_buildings.mean() == pytest.approx(0.042, abs=0.002)  # SOURCES.md: 4.2 % of the pixels
    p = atlanta_prediction(tmp_path, atlanta_buildings)
    pred = read_band(p)
    table = class_table(tmp_path, [{"name": "background"}, {"name": "building", "value": "yes"}],
                        background="background")
    out_json = tmp_path / "poly.json"
    res = evaluate_rasters(p, ATLANTA_POLYGONS, reference_field="building", classes=table, output_json=out_json)
    cm = count_matrix(pred, atlanta_buildings, 2)
    assert_matches(res, cm, names=["background", "building"])
    assert res["tail_classes"] == ["building"]  # two classes: the median is their mean
    assert json.loads(out_json.read_text())["confusion_matrix"] == cm
    # Without a background class, pixels covered by no polygon are ignored: only the building row counts.
    table2 = class_table(tmp_path, [{"name": "background"}, {"name": "building", "value": "yes"}], "c2.json")
    res2 = evaluate_rasters(p, ATLANTA_POLYGONS, reference_field="building", classes=table2)
    assert res2["confusion_matrix"] == [[0, 0], cm[1]]
    assert res2["pixels_evaluated"] == int(atlanta_buildings.sum())


def test_polygons_in_another_crs_and_named_field_give_the_same_numbers(tmp_path, atlanta_buildings):
    """The polygons reprojected to EPSG:4326 (GeoPackage), with the class in a text field holding the
    class name in another case: the same confusion matrix as the original layer."""
    p = atlanta_prediction(tmp_path, atlanta_buildings)
    gpkg = tmp_path / "buildings_4326.gpkg"
    gdal.VectorTranslate(str(gpkg), str(ATLANTA_POLYGONS), format="GPKG", dstSRS="EPSG:4326",
                         SQLStatement="SELECT *, 'Building' AS landcover FROM geotiff_labels",
                         layerName="buildings")
    ds = gdal.OpenEx(str(gpkg), gdal.OF_VECTOR)
    lyr = ds.GetLayer(0)
    assert lyr.GetSpatialRef().GetAuthorityCode(None) == "4326" and lyr.GetFeatureCount() == 43
    lyr = None
    ds = None
    table = class_table(tmp_path, [{"name": "background"}, {"name": "building"}], background="background")
    lines = io.StringIO()
    res = evaluate_rasters(p, str(gpkg) + "|layername=buildings", reference_field="landcover", classes=table,
                           reporter=Reporter(json_mode=True, stream=lines))
    assert "reprojected from EPSG:4326 to the prediction's EPSG:32616" in lines.getvalue()
    assert_matches(res, count_matrix(read_band(p), atlanta_buildings, 2), names=["background", "building"])


def test_polygon_bad_input(tmp_path, atlanta_buildings):
    p = atlanta_prediction(tmp_path, atlanta_buildings)
    table = class_table(tmp_path, [{"name": "background"}, {"name": "building", "value": "yes"}])
    before = sorted(f.name for f in tmp_path.iterdir())
    with pytest.raises(InputError, match=r"no field 'class'.*building"):
        evaluate_rasters(p, ATLANTA_POLYGONS, reference_field="class", classes=table,
                         output_json=tmp_path / "e.json", output_csv=tmp_path / "e.csv")
    with pytest.raises(InputError, match="--reference-field"):
        evaluate_rasters(p, ATLANTA_POLYGONS, classes=table, output_json=tmp_path / "e.json")
    with pytest.raises(InputError, match=r"No polygon .* maps to a class.*'yes'"):
        evaluate_rasters(p, ATLANTA_POLYGONS, reference_field="building",
                         classes=class_table(tmp_path, [{"name": "background"}, {"name": "house"}], "c2.json"))
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(before + ["c2.json"])


# -- command line and predict-first ----------------------------------------------------------------------
def _parser():
    from core.cli import _Parser

    p = _Parser(prog="python -m core")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_evaluate_arguments(sub.add_parser("evaluate"))
    return p


def test_cli_function_reports_json_lines_and_a_table(tmp_path, dubai_ids):
    pred = shifted(dubai_ids, *SHIFT)
    p = write_raster(tmp_path / "pred.tif", pred)
    r = write_raster(tmp_path / "ref.tif", dubai_ids, names=None)
    args = _parser().parse_args(["evaluate", str(p), str(r), "--output-json", str(tmp_path / "e.json"),
                                 "--output-csv", str(tmp_path / "e.csv"), "--json"])
    stream = io.StringIO()
    run_evaluate_command(args, Reporter(json_mode=args.json, stream=stream, min_interval=0.0))
    msgs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert msgs[-1]["type"] == "result" and [m for m in msgs if m["type"] == "progress"][-1]["percent"] == 100.0
    assert msgs[-1]["confusion_matrix"] == count_matrix(pred, dubai_ids, 5)
    assert msgs[-1]["json"] == str(tmp_path / "e.json") and (tmp_path / "e_confusion.csv").exists()
    # Terminal mode: a readable table; the outputs exist now, so --overwrite is needed.
    args = _parser().parse_args(["evaluate", str(p), str(r), "--output-csv", str(tmp_path / "e.csv"), "--overwrite"])
    text = io.StringIO()
    run_evaluate_command(args, Reporter(json_mode=False, stream=text))
    out = text.getvalue()
    assert "overall accuracy" in out and "tail mIoU" in out and all(n in out for n in NAMES)


def test_model_predicts_first(tmp_path, random_model, dubai_ids):
    """--model: the PREDICTION argument is the image; the result equals segmenting it, then evaluating."""
    from core.segment.job import segment_raster

    image = tmp_path / "image.tif"  # a 320 px crop keeps it to one window on the CPU
    gdal.Translate(str(image), str(DUBAI_IMAGE), srcWin=[200, 150, 320, 320], format="GTiff")
    ref = dubai_ids[150:470, 200:520]
    r = write_raster(tmp_path / "ref.tif", ref, names=None)
    before = sorted(f.name for f in tmp_path.iterdir())
    res = evaluate_rasters(image, r, model=random_model, device="cpu",
                           reporter=Reporter(json_mode=True, stream=io.StringIO()))
    assert sorted(f.name for f in tmp_path.iterdir()) == before  # the temporary prediction is gone
    seg = tmp_path / "seg.tif"
    segment_raster(image, seg, random_model, device="cpu", reporter=Reporter(json_mode=True, stream=io.StringIO()))
    assert_matches(res, count_matrix(read_band(seg), ref, 5))
    assert res["model"] == str(random_model) and [c["name"] for c in res["classes"]] == NAMES
    # A wrong reference fails before the (long) segmentation starts: nothing is segmented or written.
    stream = io.StringIO()
    with pytest.raises(InputError, match="no field 'nope'"):
        evaluate_rasters(image, ATLANTA_POLYGONS, reference_field="nope", model=random_model, device="cpu",
                         output_json=tmp_path / "e.json", reporter=Reporter(json_mode=True, stream=stream))
    assert "segmenting" not in stream.getvalue() and not (tmp_path / "e.json").exists()
