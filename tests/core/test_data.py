"""Training data from real labels: Dubai colour masks (RGB and palette), SpaceNet polygons, class rasters
on other grids, LoveDA/ISPRS indexed masks, and bad input (core/data.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from osgeo import gdal, osr
from PIL import Image

from core.classtable import (IGNORE, ClassTable, dubai_class_table, isprs_class_table, load_class_table,
                             loveda_class_table)
from core.finetune.sources import (TrainingImage, class_pixel_counts, load_dubai, load_image_mask_folder,
                                   load_mmseg_folder, load_polygon_pair, load_raster_pair, load_sources,
                                   split_by_group)
from core.errors import InputError
from conftest import ATLANTA, DATA, DUBAI_CLASSES, read_band

DUBAI = DATA / "dubai_hitl_aerial"
SPACENET_POLYGONS = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"
MMSEG = DATA / "srmf_mmseg_testdata"
BUILDINGS = [{"name": "building", "colour": "#FF0000", "value": "yes"}]
# The documented mask colours (SOURCES.md), decoded independently of core.data.
TRUE_COLOURS = {(60, 16, 152): 0, (132, 41, 246): 1, (110, 193, 228): 2, (254, 221, 58): 3, (226, 169, 41): 4,
                (155, 155, 155): 255, (0, 0, 0): 255}


def decode_with_pil(mask_path) -> np.ndarray:
    rgb = np.asarray(Image.open(mask_path).convert("RGB"))
    out = np.full(rgb.shape[:2], 77, np.uint8)
    for colour, cid in TRUE_COLOURS.items():
        out[np.all(rgb == colour, axis=-1)] = cid
    assert (out != 77).all()
    return out


@pytest.fixture(scope="module")
def dubai_all():
    return load_dubai()


@pytest.fixture(scope="module")
def spacenet():
    return load_polygon_pair(ATLANTA, SPACENET_POLYGONS, "building", BUILDINGS)


# -- class tables ------------------------------------------------------------------------------------
def test_dubai_table_has_the_true_mask_colours_and_the_default_model_order():
    t = dubai_class_table()
    assert [(c.name, c.colour) for c in t] == DUBAI_CLASSES
    assert t.kind == "rgb" and len(t) == 5
    assert t.lookup("#9b9b9b") == IGNORE and t.lookup("#000000") == IGNORE
    assert t.prompts[1] == "A satellite image of unpaved land"


def test_class_table_json_round_trip_and_defaults(tmp_path):
    p = tmp_path / "classes.json"
    p.write_text(json.dumps({"classes": [{"name": "Forest", "value": 10}, {"name": "Water", "colour": "#0000ff",
                                                                           "value": [20, 21]}],
                             "ignore": [0]}))
    t = load_class_table(p)
    assert t.names == ["Forest", "Water"] and t.kind == "value"
    assert t.prompts[0] == "A satellite image of forest"
    assert t.colours[1] == "#0000FF"
    assert [t.lookup(v) for v in (10, "20", 21.0, 0, 5)] == [0, 1, 1, IGNORE, None]
    again = ClassTable.from_obj(t.to_obj())
    assert again.names == t.names and [c.values for c in again] == [c.values for c in t]
    assert t.to_header()[1] == {"id": 1, "name": "Water", "colour": "#0000FF", "prompt": "A satellite image of water"}


@pytest.mark.parametrize("doc, words", [
    ({"classes": []}, ["no classes"]),
    ({"classes": [{"name": "a", "value": 1}, {"name": "b", "value": 1}]}, ["value 1", "'a'", "'b'"]),
    ({"classes": [{"name": "a"}, {"name": "A"}]}, ["'A'", "twice"]),
    ({"classes": [{"name": "a", "colour": "red"}]}, ["'a'", "red", "#RRGGBB"]),
    ({"classes": [{"name": "a", "value": "#112233"}, {"name": "b", "value": 3}]}, ["mix"]),
])
def test_bad_class_tables_are_named(tmp_path, doc, words):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError) as e:
        load_class_table(p)
    for w in [str(p)] + words:
        assert w in str(e.value)


def test_class_table_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_class_table(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_class_table(tmp_path / "x.json")


# -- Dubai (colour-coded masks, RGB and palette) ----------------------------------------------------
def test_dubai_rgb_mask_decodes_to_the_true_classes():
    [s] = load_dubai(["tile_8"], parts=[3])
    assert s.name == "tile_8/image_part_003" and s.group == "tile_8"
    assert s.image.dtype == np.uint8 and s.image.shape == (3,) + s.label.shape
    expected = decode_with_pil(DUBAI / "tile_8" / "masks" / "image_part_003.png")
    np.testing.assert_array_equal(s.label, expected)
    # SOURCES.md: 17.2 % of this mask is the undocumented black (unannotated); it and Unlabeled -> ignore.
    rgb = np.asarray(Image.open(DUBAI / "tile_8" / "masks" / "image_part_003.png").convert("RGB"))
    black = np.all(rgb == 0, axis=-1)
    assert black.mean() == pytest.approx(0.172, abs=0.001)
    np.testing.assert_array_equal(s.label == IGNORE, black | np.all(rgb == 155, axis=-1))
    # The image is the JPEG, read as RGB.
    jpeg = np.asarray(Image.open(DUBAI / "tile_8" / "images" / "image_part_003.jpg").convert("RGB"))
    assert np.abs(np.moveaxis(s.image, 0, -1).astype(int) - jpeg.astype(int)).max() <= 2


def test_dubai_palette_masks_of_tile_2_decode_through_their_own_colour_tables():
    samples = load_dubai(["tile_2"])
    assert len(samples) == 9 and {s.group for s in samples} == {"tile_2"}
    for s in samples:
        mask = DUBAI / "tile_2" / "masks" / (s.name.split("/")[1] + ".png")
        assert Image.open(mask).mode == "P"
        np.testing.assert_array_equal(s.label, decode_with_pil(mask))
    first = samples[0]
    # tile_2/image_part_001 holds building, land and road only (counted with PIL).
    ids, counts = np.unique(first.label, return_counts=True)
    assert ids.tolist() == [0, 1, 2] and counts.tolist() == [63406, 155233, 58257]


def test_dubai_class_shares_match_sources(dubai_all):
    assert len(dubai_all) == 63
    assert sorted({s.group for s in dubai_all}) == ["tile_1", "tile_2", "tile_3", "tile_5", "tile_6", "tile_7", "tile_8"]
    counts = class_pixel_counts(dubai_all, 5)
    total = sum(s.label.size for s in dubai_all)
    shares = counts / total * 100
    # SOURCES.md shares of all pixels: building 10.82, land 54.52, road 9.00, vegetation 10.64, water 13.87.
    np.testing.assert_allclose(shares, [10.82, 54.52, 9.00, 10.64, 13.87], atol=0.02)
    ignored = sum(int((s.label == IGNORE).sum()) for s in dubai_all) / total * 100
    assert ignored == pytest.approx(0.55 + 0.61, abs=0.02)


def test_dubai_known_bad_label_can_be_excluded():
    names = [s.name for s in load_dubai(["tile_7"], exclude_bad=True, parts=[7, 8])]
    assert names == ["tile_7/image_part_007"]


def test_split_by_group_never_splits_a_tile(dubai_all):
    train, val = split_by_group(dubai_all, val_groups=["tile_3"])
    assert {s.group for s in val} == {"tile_3"} and len(val) == 9
    assert "tile_3" not in {s.group for s in train} and len(train) == 54
    tr, va = split_by_group(dubai_all, val_fraction=0.2, seed=1)
    assert va and tr and not ({s.group for s in tr} & {s.group for s in va})
    with pytest.raises(InputError, match="tile_4"):
        split_by_group(dubai_all, val_groups=["tile_4"])


# -- LoveDA / ISPRS (indexed masks) -----------------------------------------------------------------
def test_loveda_raw_codes_map_like_reduce_zero_label():
    samples = load_mmseg_folder(MMSEG / "pseudo_loveda_dataset", loveda_class_table())
    assert [s.name for s in samples] == ["pseudo_loveda_dataset/0", "pseudo_loveda_dataset/1",
                                         "pseudo_loveda_dataset/2"]
    assert len({s.group for s in samples}) == 3
    present = {0: {1, 2, 3, 4, 7}, 1: {1, 2, 3, 4, 6, 7}, 2: {1, 4, 6, 7}}  # SOURCES.md raw codes
    for i, s in enumerate(samples):
        raw = read_band(MMSEG / "pseudo_loveda_dataset" / "ann_dir" / f"{i}.png")
        expected = np.where(raw == 0, 255, raw.astype(int) - 1).astype(np.uint8)
        np.testing.assert_array_equal(s.label, expected)
        assert set(np.unique(s.label).tolist()) - {255} == {v - 1 for v in present[i]}


def test_vaihingen_zero_is_ignored():
    [s] = load_mmseg_folder(MMSEG / "pseudo_vaihingen_dataset", isprs_class_table())
    raw = read_band(MMSEG / "pseudo_vaihingen_dataset" / "ann_dir" / "area1_0_0_512_512.png")
    assert ((s.label == IGNORE) == (raw == 0)).all()
    assert set(np.unique(s.label).tolist()) == {0, 1, 2, 3, 4, 255}


# -- polygons ----------------------------------------------------------------------------------------
def test_spacenet_polygons_rasterise_to_about_4_2_percent(spacenet):
    s = spacenet
    assert s.label.shape == (900, 900) and s.image.shape == (3, 900, 900)
    assert s.image.dtype == np.float32 and 0.0 <= s.image.min() and s.image.max() <= 255.0
    np.testing.assert_array_equal(s.image[0], s.image[2])  # one panchromatic band replicated
    assert set(np.unique(s.label).tolist()) == {0, 255}
    assert (s.label == 0).mean() == pytest.approx(0.042, abs=0.002)
    assert s.source["field"] == "building" and s.source["features"] == 43


def test_polygons_in_another_crs_give_the_same_mask(tmp_path, spacenet):
    wgs84 = tmp_path / "buildings_4326.geojson"
    gdal.VectorTranslate(str(wgs84), str(SPACENET_POLYGONS), format="GeoJSON", dstSRS="EPSG:4326")
    s = load_polygon_pair(ATLANTA, wgs84, "building", BUILDINGS)
    assert "reprojected" in s.source
    assert (s.label == spacenet.label).mean() >= 0.99


def test_background_class_fills_unlabelled_pixels(spacenet):
    classes = [{"name": "background", "value": "no"}, {"name": "building", "value": "yes"}]
    s = load_polygon_pair(ATLANTA, SPACENET_POLYGONS, "building", classes, background="background")
    assert set(np.unique(s.label).tolist()) == {0, 1}
    np.testing.assert_array_equal(s.label == 1, spacenet.label == 0)


def test_missing_class_field_lists_the_fields():
    with pytest.raises(InputError) as e:
        load_polygon_pair(ATLANTA, SPACENET_POLYGONS, "landcover", BUILDINGS)
    msg = str(e.value)
    assert "'landcover'" in msg and "geotiff_labels.geojson" in msg
    for f in ("building", "osm_id", "origarea"):
        assert f in msg


def test_field_values_outside_the_table_are_listed():
    with pytest.raises(InputError) as e:
        load_polygon_pair(ATLANTA, SPACENET_POLYGONS, "building", [{"name": "house", "value": "house"}])
    assert "yes (43 features)" in str(e.value) and "'building'" in str(e.value)


def test_empty_polygon_layer_is_refused(tmp_path):
    empty = tmp_path / "empty.geojson"
    gdal.VectorTranslate(str(empty), str(SPACENET_POLYGONS), format="GeoJSON", where="osm_id < 0")
    with pytest.raises(InputError) as e:
        load_polygon_pair(ATLANTA, empty, "building", BUILDINGS)
    assert "empty" in str(e.value) and "empty.geojson" in str(e.value)


def test_polygons_off_the_raster_are_refused(tmp_path):
    # The same coordinates declared in the wrong CRS (UTM 17N) land hundreds of km away.
    wrong = tmp_path / "wrong_crs.geojson"
    gdal.VectorTranslate(str(wrong), str(SPACENET_POLYGONS), format="GeoJSON", srcSRS="EPSG:32617",
                         dstSRS="EPSG:32617")
    with pytest.raises(InputError, match="none of the 43 polygon"):
        load_polygon_pair(ATLANTA, wrong, "building", BUILDINGS)


# -- class rasters on other grids -------------------------------------------------------------------
def _write_label(path, array, gt, epsg=32616, nodata=None):
    drv = gdal.GetDriverByName("GTiff")
    ds = drv.Create(str(path), array.shape[1], array.shape[0], 1, gdal.GDT_Byte)
    ds.SetGeoTransform(gt)
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetSpatialRef(srs)
    band = ds.GetRasterBand(1)
    if nodata is not None:
        band.SetNoDataValue(nodata)
    band.WriteArray(array)
    band = None
    ds = None
    return path


BUILDING_RASTER_CLASSES = [{"name": "background", "value": 0}, {"name": "building", "value": 1}]


def test_class_raster_on_the_same_grid(tmp_path, spacenet):
    truth = (spacenet.label == 0).astype(np.uint8)
    lab = _write_label(tmp_path / "same.tif", truth, (733601, 0.5, 0, 3725139, 0, -0.5))
    s = load_raster_pair(ATLANTA, lab, BUILDING_RASTER_CLASSES)
    np.testing.assert_array_equal(s.label, truth)
    assert "resampled" not in s.source


def test_class_raster_on_a_coarser_grid_is_resampled_nearest(tmp_path, spacenet):
    truth = (spacenet.label == 0).astype(np.uint8)
    coarse = truth[::2, ::2]  # a real label at 1 m instead of 0.5 m
    lab = _write_label(tmp_path / "coarse.tif", coarse, (733601, 1.0, 0, 3725139, 0, -1.0))
    s = load_raster_pair(ATLANTA, lab, BUILDING_RASTER_CLASSES)
    assert "resampled" in s.source
    np.testing.assert_array_equal(s.label, np.repeat(np.repeat(coarse, 2, 0), 2, 1))


def test_class_raster_in_another_crs_and_extent_aligns(tmp_path, spacenet):
    truth = (spacenet.label == 0).astype(np.uint8)
    utm = _write_label(tmp_path / "utm.tif", truth, (733601, 0.5, 0, 3725139, 0, -0.5))
    # Only the western half, in EPSG:4326: the eastern half has no label -> 255.
    wgs = tmp_path / "wgs84_west.tif"
    gdal.Warp(str(wgs), str(utm), options="-t_srs EPSG:4326 -r near -tr 4.5e-6 4.5e-6 "
                                           "-te_srs EPSG:32616 -te 733601 3724689 733826 3725139")
    s = load_raster_pair(ATLANTA, wgs, BUILDING_RASTER_CLASSES)
    west, east = s.label[:, 30:420], s.label[:, 480:]
    assert (east == IGNORE).all()
    agree = (west == truth[:, 30:420]).mean()
    assert agree >= 0.97, agree


def test_label_nodata_becomes_ignore(tmp_path, spacenet):
    truth = (spacenet.label == 0).astype(np.uint8)
    truth[:100] = 9
    lab = _write_label(tmp_path / "nd.tif", truth, (733601, 0.5, 0, 3725139, 0, -0.5), nodata=9)
    s = load_raster_pair(ATLANTA, lab, BUILDING_RASTER_CLASSES)
    assert (s.label[:100] == IGNORE).all() and (s.label[100:] != IGNORE).all()


def test_values_outside_the_class_table_are_listed_with_counts(tmp_path, spacenet):
    truth = (spacenet.label == 0).astype(np.uint8)
    lab = _write_label(tmp_path / "vals.tif", truth, (733601, 0.5, 0, 3725139, 0, -0.5))
    with pytest.raises(InputError) as e:
        load_raster_pair(ATLANTA, lab, [{"name": "building", "value": 1}])
    n0 = int((truth == 0).sum())
    assert f"0 ({n0} px)" in str(e.value) and "vals.tif band 1" in str(e.value)
    # A real LoveDA label with forest (6) missing from the table.
    classes = [{"name": n, "value": v} for n, v in (("background", 1), ("building", 2), ("road", 3), ("water", 4),
                                                     ("agriculture", 7))]
    with pytest.raises(InputError) as e:
        load_raster_pair(MMSEG / "pseudo_loveda_dataset" / "img_dir" / "1.png",
                         MMSEG / "pseudo_loveda_dataset" / "ann_dir" / "1.png", {"classes": classes, "ignore": [0]})
    raw = read_band(MMSEG / "pseudo_loveda_dataset" / "ann_dir" / "1.png")
    assert f"6 ({int((raw == 6).sum())} px)" in str(e.value) and "1.png" in str(e.value)


def test_unknown_mask_colour_is_listed(tmp_path):
    table = ClassTable([{"name": n, "value": c} for n, c in DUBAI_CLASSES])  # no ignore list
    with pytest.raises(InputError) as e:
        load_raster_pair(DUBAI / "tile_8" / "images" / "image_part_003.jpg",
                         DUBAI / "tile_8" / "masks" / "image_part_003.png", table)
    rgb = np.asarray(Image.open(DUBAI / "tile_8" / "masks" / "image_part_003.png").convert("RGB"))
    n_black = int(np.all(rgb == 0, axis=-1).sum())
    assert f"#000000 ({n_black} px)" in str(e.value) and "#9B9B9B" in str(e.value)
    assert "tile_8/masks/image_part_003.png" in str(e.value)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for part in ("image_part_001", "image_part_002"):
        (tmp_path / "images" / f"{part}.jpg").symlink_to(DUBAI / "tile_1" / "images" / f"{part}.jpg")
    (tmp_path / "masks" / "image_part_001.png").symlink_to(DUBAI / "tile_1" / "masks" / "image_part_001.png")
    with pytest.raises(InputError, match="no mask for image.*image_part_002.jpg"):
        load_image_mask_folder(tmp_path / "images", tmp_path / "masks", dubai_class_table())


def test_mismatched_sizes_without_crs_are_refused():
    with pytest.raises(InputError) as e:
        load_raster_pair(DUBAI / "tile_1" / "images" / "image_part_001.jpg",
                         DUBAI / "tile_2" / "masks" / "image_part_001.png", dubai_class_table())
    assert "mismatched sizes and no CRS to align them" in str(e.value)
    assert "image_part_001.jpg" in str(e.value) and "tile_2" in str(e.value)


def test_colour_table_against_an_indexed_label_is_refused():
    with pytest.raises(InputError, match="colour"):
        load_raster_pair(MMSEG / "pseudo_loveda_dataset" / "img_dir" / "0.png",
                         MMSEG / "pseudo_loveda_dataset" / "ann_dir" / "0.png", dubai_class_table())


def test_load_sources_mixes_kinds(spacenet):
    classes = [{"name": "building", "value": "yes"}]
    out = load_sources([{"raster": str(ATLANTA), "polygons": str(SPACENET_POLYGONS), "field": "building",
                         "name": "atlanta"}], classes)
    assert len(out) == 1 and isinstance(out[0], TrainingImage) and out[0].name == "atlanta"
    np.testing.assert_array_equal(out[0].label, spacenet.label)
    with pytest.raises(InputError, match="training source 1"):
        load_sources([{"raster": str(ATLANTA)}], classes)


def test_palette_mask_in_another_crs_is_warped_and_decoded(tmp_path):
    """A colour-coded palette mask (tile_2) georeferenced, then reprojected to EPSG:4326: nearest
    resampling keeps palette indices, which are decoded through the mask's own colour table."""
    src = DUBAI / "tile_2"
    bounds = [300000, 2800000 + 544 * 0.8, 300000 + 509 * 0.8, 2800000]  # made-up UTM 40N placement, 0.8 m
    img = tmp_path / "img.tif"
    mask = tmp_path / "mask_utm.tif"
    gdal.Translate(str(img), str(src / "images" / "image_part_004.jpg"), outputSRS="EPSG:32640", outputBounds=bounds)
    gdal.Translate(str(mask), str(src / "masks" / "image_part_004.png"), outputSRS="EPSG:32640", outputBounds=bounds)
    wgs = tmp_path / "mask_4326.tif"
    gdal.Warp(str(wgs), str(mask), dstSRS="EPSG:4326", resampleAlg="near")
    s = load_raster_pair(img, wgs, dubai_class_table())
    assert "resampled" in s.source
    expected = decode_with_pil(src / "masks" / "image_part_004.png")
    assert (s.label == expected).mean() >= 0.99
