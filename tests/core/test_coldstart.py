"""Cold-start class discovery (CAT transfer, arXiv 2308.02844) on a real Dubai tile.

The model is the real SRMF architecture with the real ImageNet EfficientNet-Lite0 backbone (offline
weights) and a seeded random head: its fused features separate water from buildings (the head is
random, the backbone's ImageNet features are not). The raster is a GeoTIFF copy of the real image
``tile_2/image_part_005`` (510 x 544 px; buildings in the top half, a lagoon in the bottom half) with a
made-up UTM 40N geotransform (0.8 m pixels); the example polygons are the water of its real mask in the
left third of the image, polygonised — the right two thirds are what findclass has to find.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from osgeo import gdal, ogr, osr

from conftest import ROOT, engine_env
from polygons import polygonize_mask, write_rgb_geotiff
from core.findclass.candidates import Patch, order_candidates, read_candidates
from core.findclass.params import CANDIDATES_NAME
from core.findclass.job import find_class
from core.findclass.params import NODATA, RELEVANCE_NAME
from core.findclass.cells import CellGrid, image_cell_features
from core.findclass.prototypes import calibrate_threshold, fit_prototypes, relevance, spherical_kmeans
from core.findclass.handoff import handoff, write_handoff
from core.findclass.examples import read_examples
from core.finetune.sources import load_dubai, load_sources
from core.errors import InputError
from core.model.modelfile import load_model, save_model
from core.protocol import Reporter

gdal.UseExceptions()
ogr.UseExceptions()
WATER, BUILDING = 4, 0
GT = (500000.0, 0.8, 0.0, 2780000.0, 0.0, -0.8)
PATCH = 32
# Bounds stated by the tests, measured on this tile with this model (see the report):
PURITY_MIN = 0.95   # k-means (K=2) purity on 300 water + 300 building cells (measured 0.987)
CENTROID_COS_MIN = 0.9  # recovered centroid vs the class's own mean direction (measured 0.999)
PRECISION_AT_20_MIN = 0.8  # top-20 candidates mostly (>= 50 %) on water (measured 0.95; base rate 0.31)


class StubEncoder:
    """A deterministic text encoder of the model's D=32 (the real encoders are tested in test_text)."""

    encoder_id = "test-encoder"
    dim = 32

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), self.dim, generator=g)


def quiet():
    return Reporter(json_mode=True, stream=io.StringIO())


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory) -> Path:
    """The real architecture, ImageNet EfficientNet-Lite0 backbone, seeded random head, 5 Dubai classes."""
    from core.model.network import SRMFNet, architecture_config
    from conftest import DUBAI_CLASSES

    torch.manual_seed(0)
    bank = F.normalize(torch.randn(12, 32), dim=1)
    model = SRMFNet("efficientnet_lite0", len(DUBAI_CLASSES), text_bank=bank, encoder_weights="imagenet")
    classes = [{"id": i, "name": n, "colour": c, "prompt": f"A satellite image of {n}"}
               for i, (n, c) in enumerate(DUBAI_CLASSES)]
    header = {"architecture": architecture_config(model), "classes": classes,
              "text_encoder": {"id": "test-encoder", "dim": 32},
              "text_bank": {"prompts": [f"A satellite image of concept {i}" for i in range(12)]},
              "provenance": {"untrained": True, "note": "ImageNet backbone, random head (seed 0)"}}
    return save_model(tmp_path_factory.mktemp("models") / "imagenet_lite0.srmf", model, header)


@pytest.fixture(scope="module")
def tile():
    return load_dubai(["tile_2"], parts=[5])[0]


@pytest.fixture(scope="module")
def scene(tmp_path_factory, tile):
    """dubai.tif (real pixels, made-up UTM 40N georeferencing) and water.gpkg (real water, left third)."""
    d = tmp_path_factory.mktemp("scene")
    H, W = tile.label.shape
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32640)
    write_rgb_geotiff(d / "dubai.tif", tile.image, GT, srs)
    examples = tile.label == WATER
    examples[:, W // 3:] = False
    examples[::96] = False  # cut into bands: several example polygons, as an analyst draws them
    n = polygonize_mask(d / "water.gpkg", examples, GT, srs)
    assert n >= 4
    return {"dir": d, "raster": d / "dubai.tif", "examples": d / "water.gpkg", "label": tile.label, "srs": srs,
            "H": H, "W": W, "example_mask": examples}


@pytest.fixture(scope="module")
def found(scene, imagenet_model, tmp_path_factory):
    """``python -m core findclass`` as a user runs it, once for the tests that read its outputs."""
    out = tmp_path_factory.mktemp("found") / "water_search"
    run = subprocess.run([sys.executable, "-m", "core", "findclass", str(scene["raster"]), str(scene["examples"]),
                          str(out), "--model", str(imagenet_model), "--clusters", "3", "--top-n", "40",
                          "--patch", str(PATCH), "--device", "cpu", "--json"],
                         cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    msgs = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    return {"out": out, "msgs": msgs, "result": msgs[-1]}


@pytest.fixture(scope="module")
def cell_features(tile, imagenet_model):
    lm = load_model(imagenet_model)
    feats = image_cell_features(tile.image, lm.model, lm.header["input"]["mean"], lm.header["input"]["std"])
    H, W = tile.label.shape
    grid = CellGrid(H, W)
    lab = tile.label[np.floor(grid.cy).astype(int)][:, np.floor(grid.cx).astype(int)]
    return feats, lab


# -- spherical k-means on real embeddings -----------------------------------------------------------------
def test_spherical_kmeans_recovers_water_and_building_centroids(cell_features):
    feats, lab = cell_features
    z = feats["z"]
    C = z.shape[0]
    assert torch.isfinite(z).all()
    flat = z.reshape(C, -1).T
    background = flat.mean(0)
    x = F.normalize(flat - background, dim=1)
    lab = torch.from_numpy(lab.ravel().astype(np.int64))
    rng = np.random.default_rng(0)
    w = np.nonzero((lab == WATER).numpy())[0]
    b = np.nonzero((lab == BUILDING).numpy())[0]
    pick = np.concatenate([rng.choice(w, 300, replace=False), rng.choice(b, 300, replace=False)])
    truth = (lab[pick] == WATER).long()
    cl = spherical_kmeans(x[pick], 2, seed=0)
    assert cl.centroids.shape == (2, C) and torch.allclose(cl.centroids.norm(dim=1), torch.ones(2), atol=1e-5)
    agree = (cl.labels == truth).float().mean().item()
    purity = max(agree, 1 - agree)
    assert purity >= PURITY_MIN, purity
    # the centroids are the two classes' mean directions (matched by the majority)
    means = torch.stack([F.normalize(x[pick][truth == k].mean(0), dim=0) for k in (0, 1)])
    cos = cl.centroids @ means.T
    assert cos.max(1).values.min().item() >= CENTROID_COS_MIN, cos
    assert sorted(cos.argmax(1).tolist()) == [0, 1]
    # same seed, same result; the global RNG plays no part
    torch.manual_seed(123)
    again = spherical_kmeans(x[pick], 2, seed=0)
    assert torch.equal(again.labels, cl.labels)


def test_kmeans_reduces_k_for_few_points_and_drops_tiny_clusters(cell_features):
    feats, lab = cell_features
    flat = feats["z"].reshape(feats["z"].shape[0], -1).T
    x = F.normalize(flat - flat.mean(0), dim=1)
    lab = lab.ravel()
    water = x[torch.from_numpy(np.nonzero(lab == WATER)[0][:400])]
    build = x[torch.from_numpy(np.nonzero(lab == BUILDING)[0][:3])]
    few = spherical_kmeans(water[:25], 10, seed=0)
    assert few.k_requested == 10 and few.k_used == 2 and "K reduced from 10 to 2" in few.notes[0]
    data = torch.cat([water, build])
    free = spherical_kmeans(data, 2, seed=0, min_cluster_share=0.0, min_cluster_size=1)
    assert len(free.sizes) == 2 and sum(free.sizes) == 403 and free.dropped == []
    small = min(free.sizes)
    # a cluster under the size floor is dropped, reported, and its cells go to the remaining one
    cl = spherical_kmeans(data, 2, seed=0, min_cluster_share=(small + 1) / 403)
    assert cl.dropped == [small] and cl.sizes == [403] and cl.centroids.shape[0] == 1
    assert any("dropped 1 tiny cluster" in n for n in cl.notes)
    assert torch.allclose(cl.centroids[0], F.normalize(data.mean(0), dim=0), atol=1e-5)
    with pytest.raises(InputError, match="--clusters must be at least 1"):
        spherical_kmeans(water, 0)


def test_baselines_and_relevance_modes(cell_features):
    feats, lab = cell_features
    x = F.normalize(feats["z"].reshape(feats["z"].shape[0], -1).T, dim=1)
    sup = x[torch.from_numpy(np.nonzero(lab.ravel() == WATER)[0][:200])]
    assert fit_prototypes(sup, "prototype").shape == (1, x.shape[1])
    assert fit_prototypes(sup, "nn").shape == sup.shape
    assert fit_prototypes(sup, "nn", max_nn=50).shape == (50, x.shape[1])
    assert fit_prototypes(sup, "cat", k=3).shape[0] <= 3
    assert fit_prototypes(sup, "random", seed=1).shape == (1, x.shape[1])
    cen = fit_prototypes(sup, "cat", k=3)
    s_max, cl = relevance(x, cen, "max")
    s_mean, _ = relevance(x, cen, "mean")
    assert (s_max >= s_mean - 1e-6).all() and cl.max() < cen.shape[0]
    # a negative centroid nearer than every positive one lowers the score by the margin
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    s, _ = relevance(z, torch.tensor([[1.0, 0.0]]), "max", negatives=torch.tensor([[0.0, 1.0]]))
    assert s.tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(InputError, match="unknown method"):
        fit_prototypes(sup, "svm")


def test_threshold_from_leave_one_polygon_out_recall(cell_features):
    feats, lab = cell_features
    x = F.normalize(feats["z"].reshape(feats["z"].shape[0], -1).T, dim=1)
    idx = np.nonzero(lab.ravel() == WATER)[0]
    groups = [x[torch.from_numpy(idx[i::3][:150])] for i in range(3)]
    fit = lambda s: fit_prototypes(s, "cat", k=2)  # noqa: E731
    score = lambda z, c: relevance(z, c)[0]  # noqa: E731
    thr = calibrate_threshold(groups, fit, score, recall_target=0.9)
    assert thr["method"] == "leave-one-polygon-out" and thr["folds"] == 3
    # by construction ~90 % of the held-out support lies above it; check on the fitted centroids too
    s = score(torch.cat(groups), fit(torch.cat(groups)))
    assert (s >= thr["threshold"]).float().mean().item() >= 0.85
    one = calibrate_threshold(groups[:1], fit, score, 0.9)
    assert "one polygon" in one["method"]
    with pytest.raises(InputError, match="recall target"):
        calibrate_threshold(groups, fit, score, 1.5)


def test_review_order_alternates_between_clusters():
    patches = [Patch(0, i, 1.0 - i / 100, 0, 1.0) for i in range(5)] + \
              [Patch(1, i, 0.5 - i / 100, 1, 1.0) for i in range(5)] + [Patch(2, 0, 0.2, 2, 1.0)]
    ranked = order_candidates(patches, 7)
    assert [p.cluster for p in ranked] == [0, 1, 2, 0, 1, 0, 1]
    assert [p.col for p in ranked if p.cluster == 0] == [0, 1, 2]  # best first within a cluster
    # with a threshold, only patches above it alternate; a weak cluster does not jump the queue
    gated = order_candidates(patches, 8, threshold=0.475)
    assert [(p.cluster, p.col) for p in gated] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (0, 4)]


# -- findclass on the real tile ---------------------------------------------------------------------------
def _water_share(label, x, y, size=PATCH):
    lab = label[y:y + size, x:x + size]
    lab = lab[lab != 255]
    return float((lab == WATER).mean()) if lab.size else 0.0


def test_findclass_finds_water_and_writes_the_relevance_raster(found, scene):
    res, out = found["result"], found["out"]
    assert res["type"] == "result" and res["crs"] == "EPSG:32640"
    assert sorted(p.name for p in out.iterdir()) == [CANDIDATES_NAME, RELEVANCE_NAME]  # no temp files left
    ds = gdal.Open(str(out / RELEVANCE_NAME))
    assert ds.GetSpatialRef().IsSame(scene["srs"])
    assert (ds.RasterXSize, ds.RasterYSize) == (-(-scene["W"] // 4), -(-scene["H"] // 4))
    assert ds.GetGeoTransform() == pytest.approx((GT[0], GT[1] * 4, 0.0, GT[3], 0.0, GT[5] * 4))
    band = ds.GetRasterBand(1)
    assert band.DataType == gdal.GDT_Float32 and band.GetNoDataValue() == NODATA
    rel = band.ReadAsArray()
    band = None
    ds = None
    assert np.isfinite(rel).all() and (rel >= -1.0001).all() and (rel <= 1.0001).all()
    # relevance is higher on water than on buildings (cells by their centre pixel's label)
    grid = CellGrid(scene["H"], scene["W"])
    lab = scene["label"][np.floor(grid.cy).astype(int)][:, np.floor(grid.cx).astype(int)]
    assert np.median(rel[lab == WATER]) > np.percentile(rel[lab == BUILDING], 95)
    # precision at 20 of the review list (patches mostly on water), against the base rate
    cands = res["candidate_patches"]
    hits = [_water_share(scene["label"], c["pixel_x"], c["pixel_y"]) >= 0.5 for c in cands[:20]]
    px = [(x, y) for y in range(0, scene["H"], PATCH) for x in range(0, scene["W"], PATCH)]
    base = np.mean([_water_share(scene["label"], x, y) >= 0.5 for x, y in px])
    assert np.mean(hits) >= PRECISION_AT_20_MIN, (np.mean(hits), base)
    assert base < 0.5
    # the examples' own patches are not candidates: the top candidates lie mostly right of the examples
    assert np.mean([c["pixel_x"] + PATCH > scene["W"] // 3 for c in cands[:20]]) >= 0.9
    # the threshold is calibrated and reported; "resembles" is logged
    thr = res["threshold"]
    assert thr["method"] == "leave-one-polygon-out" and thr["recall_target"] == 0.9
    assert 0.0 < res["share_above_threshold"] < 1.0
    logs = [m["message"] for m in found["msgs"] if m["type"] == "log"]
    assert any(m.startswith("resembles: ") for m in logs) and any(m.startswith("threshold ") for m in logs)
    assert any(m["type"] == "progress" and m["percent"] == 100.0 for m in found["msgs"])


def test_candidate_layer_fields_statuses_and_alternating_order(found, scene):
    meta, rows = read_candidates(found["out"] / CANDIDATES_NAME)
    ds = ogr.Open(str(found["out"] / CANDIDATES_NAME))
    lyr = ds.GetLayerByName("candidates")
    defn = lyr.GetLayerDefn()
    fields = {defn.GetFieldDefn(i).GetName(): defn.GetFieldDefn(i).GetTypeName() for i in range(defn.GetFieldCount())}
    assert fields == {"rank": "Integer", "score": "Real", "cluster": "Integer", "status": "String"}
    assert lyr.GetSpatialRef().IsSame(scene["srs"]) and lyr.GetGeomType() == ogr.wkbPolygon
    minx, maxx, miny, maxy = lyr.GetExtent()
    assert minx >= GT[0] - 1e-6 and maxx <= GT[0] + scene["W"] * GT[1] + 1e-6
    assert miny >= GT[3] + scene["H"] * GT[5] - 1e-6 and maxy <= GT[3] + 1e-6
    lyr = None
    ds = None
    assert [r["rank"] for r in rows] == list(range(1, 41))
    assert {r["status"] for r in rows} == {"pending"}
    clusters = [r["cluster"] for r in rows]
    k = len(set(clusters))
    assert set(clusters) <= set(range(1, 4))
    assert len(set(clusters[:k])) == k  # the first k ranks show every cluster once
    assert meta["raster"] == str(scene["raster"].resolve()) and len(meta["init_centroids"][0]) == 256


def test_handoff_excludes_rejected_and_starts_the_row_from_the_centroids(found, scene, imagenet_model, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path / "cache"))
    gpkg = tmp_path / "reviewed.gpkg"
    shutil.copy(found["out"] / CANDIDATES_NAME, gpkg)
    ds = ogr.Open(str(gpkg), 1)
    lyr = ds.GetLayerByName("candidates")
    for f in lyr:
        r = f.GetField("rank")
        f.SetField("status", "accepted" if r <= 5 else ("rejected" if r <= 10 else "pending"))
        lyr.SetFeature(f)
    lyr = None
    ds = None
    meta, rows = read_candidates(gpkg)
    h = handoff(gpkg, "lagoon")
    assert h.counts["accepted"] == 5 and h.counts["rejected"] == 5 and h.counts["pending"] == 30
    n_examples = h.counts["examples"]
    assert n_examples >= 2 and len(h.polygons) == n_examples + 5
    wkts = {w for w, _ in h.polygons}
    assert all(r["wkt"] not in wkts for r in rows if r["status"] == "rejected")
    assert all(r["wkt"] in wkts for r in rows if r["status"] == "accepted")
    out = write_handoff(gpkg, tmp_path / "handoff", "lagoon", base_model=imagenet_model, text_encoder=StubEncoder())
    # the new class's classifier row = the normalised mean of the centroids, at the old rows' mean norm
    base = load_model(imagenet_model)
    tuned = load_model(out["base_model"])
    assert [c["name"] for c in tuned.classes][-1] == "lagoon"
    row = tuned.model.head.classifier.weight[5].detach().flatten()
    cen = torch.tensor(meta["init_centroids"])
    expect = F.normalize(cen.mean(0), dim=0)
    assert torch.allclose(row / row.norm(), expect, atol=1e-5)
    old_norm = base.model.head.classifier.weight.detach().flatten(1).norm(dim=1).mean()
    assert row.norm().item() == pytest.approx(old_norm.item(), rel=1e-4)
    # the command form (for the QGIS side), with the model's own text encoder
    import argparse

    import core.model.text.encoders
    from core.findclass.command import add_handoff_arguments, run_handoff_command

    monkeypatch.setattr(core.model.text.encoders, "get_text_encoder", lambda spec=None, device="cpu": StubEncoder())
    ap = argparse.ArgumentParser()
    add_handoff_arguments(ap)
    args = ap.parse_args([str(gpkg), str(tmp_path / "handoff2"), "--class-name", "lagoon", "--base-model",
                          str(imagenet_model), "--colour", "#00AAFF", "--json"])
    stream = io.StringIO()
    run_handoff_command(args, Reporter(json_mode=True, stream=stream))
    done = json.loads(stream.getvalue().splitlines()[-1])
    assert done["type"] == "result" and done["counts"]["accepted"] == 5
    assert done["finetune_command"].startswith("python -m core finetune OUT.srmf --base-model ")
    assert json.loads(Path(done["classes"]).read_text())["classes"][-1]["colour"] == "#00AAFF"
    # the label source fine-tuning reads: accepted candidates are the new class, rejected ones are not
    classes = json.loads(Path(out["classes"]).read_text())
    sources = json.loads(Path(out["sources"]).read_text())
    img = load_sources(sources, classes)[0]
    new_id = len(classes["classes"]) - 1
    for r in rows:
        c = next(c for c in found["result"]["candidate_patches"] if c["rank"] == r["rank"])
        x, y = c["pixel_x"], c["pixel_y"]
        patch = img.label[y:y + PATCH, x:x + PATCH]
        in_examples = scene["example_mask"][y:y + PATCH, x:x + PATCH]
        assert (patch[in_examples] == new_id).all()  # the examples are always labels
        if r["status"] == "accepted":
            assert (patch == new_id).all()
        else:  # rejected and pending candidates are no labels
            assert (patch[~in_examples] == 255).all()


# -- bad input --------------------------------------------------------------------------------------------
def test_polygons_in_another_crs_are_reprojected_not_rejected(scene, imagenet_model, tmp_path):
    # the same water polygons in EPSG:4326
    wgs = tmp_path / "water_4326.gpkg"
    gdal.VectorTranslate(str(wgs), str(scene["examples"]), dstSRS="EPSG:4326", reproject=True)
    ds = gdal.Open(str(scene["raster"]))
    grid = CellGrid(ds.RasterYSize, ds.RasterXSize)
    utm, info_u = read_examples(scene["examples"], ds, grid, max_per_polygon=10 ** 6)
    geo, info_g = read_examples(wgs, ds, grid, max_per_polygon=10 ** 6)
    ds = None
    assert info_g["reprojected"] and not info_u["reprojected"]
    a = {tuple(c) for p in utm for c in p.covered}
    b = {tuple(c) for p in geo for c in p.covered}
    assert len(a & b) / len(a | b) > 0.97
    # and the whole job runs on them (a 256 x 256 crop of the raster, one window)
    crop = tmp_path / "crop.tif"
    gdal.Translate(str(crop), str(scene["raster"]), srcWin=[0, scene["H"] - 256, 256, 256])
    res = find_class(crop, wgs, tmp_path / "out", imagenet_model, clusters=2, top_n=5, patch=32, window=256,
                     stride=256, device="cpu", reporter=quiet())
    assert res["examples"]["reprojected"] and res["support_cells"] > 50 and res["candidates_written"] == 5


def _assert_nothing_left(folder: Path, existed: bool):
    if existed:
        assert sorted(p.name for p in folder.iterdir()) == []
    else:
        assert not folder.exists()


def test_bad_examples_give_clear_errors_and_leave_nothing(scene, imagenet_model, tmp_path):
    srs = scene["srs"]
    # no example polygons: an empty layer
    empty = tmp_path / "empty.gpkg"
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(empty))
    ds.CreateLayer("examples", srs=srs, geom_type=ogr.wkbPolygon)
    ds = None
    out = tmp_path / "out"
    with pytest.raises(InputError, match="has no example polygons"):
        find_class(scene["raster"], empty, out, imagenet_model, device="cpu", reporter=quiet())
    _assert_nothing_left(out, False)
    # polygons outside the raster: the water polygons moved 10 km east
    far = tmp_path / "far.gpkg"
    shifted = (GT[0] + 10000.0,) + GT[1:]
    ex = scene["example_mask"]
    polygonize_mask(far, ex, shifted, srs)
    with pytest.raises(InputError, match="none of the .* example polygon.* falls on"):
        find_class(scene["raster"], far, out, imagenet_model, device="cpu", reporter=quiet())
    _assert_nothing_left(out, False)
    # K < 1, a bad patch size, a missing negative field, only negative examples
    with pytest.raises(InputError, match="--clusters must be at least 1"):
        find_class(scene["raster"], scene["examples"], out, imagenet_model, clusters=0, reporter=quiet())
    with pytest.raises(InputError, match="--patch must be a multiple of 4"):
        find_class(scene["raster"], scene["examples"], out, imagenet_model, patch=30, reporter=quiet())
    with pytest.raises(InputError, match="no field 'is_neg'.*value"):
        find_class(scene["raster"], scene["examples"], out, imagenet_model, negative_field="is_neg",
                   device="cpu", reporter=quiet())
    neg = tmp_path / "neg.gpkg"
    polygonize_mask(neg, ex, GT, srs, negative=True)
    with pytest.raises(InputError, match="every example polygon .* is a negative example"):
        find_class(scene["raster"], neg, out, imagenet_model, negative_field="negative", device="cpu",
                   reporter=quiet())
    _assert_nothing_left(out, False)
    # existing outputs are not replaced without --overwrite
    out.mkdir()
    (out / RELEVANCE_NAME).write_text("keep me")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        find_class(scene["raster"], scene["examples"], out, imagenet_model, device="cpu", reporter=quiet())
    assert (out / RELEVANCE_NAME).read_text() == "keep me"


def test_a_failure_midway_leaves_no_output(scene, imagenet_model, tmp_path, monkeypatch):
    import core.findclass.job as cs

    def boom(*a, **k):
        raise RuntimeError("simulated failure while scoring")

    monkeypatch.setattr(cs, "stream_cell_maps", boom)
    crop = tmp_path / "crop.tif"
    gdal.Translate(str(crop), str(scene["raster"]), srcWin=[0, scene["H"] - 256, 256, 256])
    for out, existed in ((tmp_path / "new_folder", False), (tmp_path / "existing", True)):
        if existed:
            out.mkdir()
        with pytest.raises(RuntimeError, match="simulated"):
            find_class(crop, scene["examples"], out, imagenet_model, window=256, stride=256, device="cpu",
                       reporter=quiet())
        _assert_nothing_left(out, existed)


def test_cli_bad_k_is_a_json_error_with_exit_code_2(scene, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "core", "findclass", str(scene["raster"]), str(scene["examples"]),
                          str(out), "--clusters", "0", "--json"],
                         cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    err = [json.loads(line) for line in run.stdout.splitlines() if line.strip()][-1]
    assert err["type"] == "error" and "--clusters must be at least 1" in err["message"]
    assert not out.exists()
