"""Models of more than three bands (issue 15, part 3; core/model/bands.py), on a real 4-band raster.

No real RGB + near-infrared scene is in ../shared/data, so the 4-band raster is built from real pixels of two
sources (tests/rgbn.py): the RGB of a Dubai aerial tile and, as its 4th band (described "NIR"), the SpaceNet
Atlanta panchromatic band resampled onto its pixels — a stand-in that is not physically near-infrared, so what
is tested is the plumbing (the widened first convolution, the statistics, the band mapping, the refusals), not
what NIR buys.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from osgeo import gdal

from conftest import ATLANTA, DATA, ROOT, engine_env, make_random_model, read_band
from core.classtable import dubai_class_table
from core.errors import InputError
from core.protocol import Reporter
from rgbn import write_rgbn

gdal.UseExceptions()
DUBAI_IMAGE = DATA / "dubai_hitl_aerial" / "tile_1" / "images" / "image_part_001.jpg"
DUBAI_MASK = DATA / "dubai_hitl_aerial" / "tile_1" / "masks" / "image_part_001.png"


@pytest.fixture(scope="module")
def rgbn(tmp_path_factory):
    """(the 4-band GeoTIFF, the same RGB as a 3-band GeoTIFF, the class raster of the Dubai mask)."""
    from core.finetune.sources import load_raster_pair

    folder = tmp_path_factory.mktemp("rgbn")
    paths = write_rgbn(folder, DUBAI_IMAGE, ATLANTA)
    w, h = 797, 644
    table = dubai_class_table()
    pair = load_raster_pair(paths["rgb"], DUBAI_MASK, table)  # the colour-coded mask as class ids
    labels = folder / "labels.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(labels), w, h, 1, gdal.GDT_Byte)
    ds.GetRasterBand(1).WriteArray(pair.label)
    ds.GetRasterBand(1).SetNoDataValue(255)
    ds = None
    classes = folder / "classes.json"
    classes.write_text(json.dumps({"classes": [{"name": c["name"], "colour": c["colour"], "prompt": c["prompt"],
                                               "value": i} for i, c in enumerate(table.to_obj()["classes"])]}))
    return {"rgbn": paths["rgbn"], "rgb": paths["rgb"], "labels": labels, "classes": classes}


def test_band_names_from_colour_interpretation_and_description(rgbn):
    from core.geo.raster import select_bands
    from core.model.bands import canonical_band_name, check_band_names, raster_band_name

    ds = gdal.Open(str(rgbn["rgbn"]))
    assert [raster_band_name(ds, b) for b in (1, 2, 3, 4)] == ["red", "green", "blue", "nir"]
    assert canonical_band_name("Band 4: Near-Infrared") == "nir" and canonical_band_name("NIR (0.85 um)") == "nir"
    assert canonical_band_name("elevation") is None
    assert select_bands(ds, "rgbn.tif", None, ["red", "green", "blue", "nir"]) == [1, 2, 3, 4]
    assert select_bands(ds, "rgbn.tif", None, ["red", "green", "blue"]) == [1, 2, 3]  # a 3-band model: RGB
    with pytest.raises(InputError, match=r"has 3 bands but the model reads 4 \(red, green, blue, nir\)"):
        select_bands(gdal.Open(str(rgbn["rgb"])), "rgb.tif", None, ["red", "green", "blue", "nir"])
    bare = gdal.Translate("", ds, format="VRT")
    bare.GetRasterBand(4).SetDescription("")
    with pytest.raises(InputError, match=r"no nir band by colour interpretation or description.*4: unnamed"):
        select_bands(bare, "bare.vrt", None, ["red", "green", "blue", "nir"])
    assert select_bands(bare, "bare.vrt", [1, 2, 3, 4], ["red", "green", "blue", "nir"]) == [1, 2, 3, 4]
    with pytest.raises(InputError, match="first three bands must be red, green, blue"):
        check_band_names(["nir", "red", "green"])
    with pytest.raises(InputError, match="unknown band name 'thermal'"):
        check_band_names(["red", "green", "blue", "thermal"])


def test_the_widened_first_convolution_keeps_the_rgb_logits_when_the_added_kernels_are_zero(tmp_path):
    from core.model.bands import widen_first_conv
    from core.model.modelfile import load_model

    lm = load_model(make_random_model(tmp_path / "m.srmf", n_concepts=6, dim=16))
    model = lm.model.float().eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        rgb_logits = model(x)
    name, old = widen_first_conv(model, 4)
    conv = dict(model.encoder.named_modules())[name]
    assert old == 3 and conv.in_channels == 4
    w = conv.weight.detach()
    first = torch.nn.Conv2d  # the added kernel is the RGB kernels' mean, scaled 3/N
    assert isinstance(conv, first) and torch.allclose(w[:, 3], w[:, :3].mean(1) * 0.75, atol=1e-6)
    with torch.no_grad():
        conv.weight[:, 3:] = 0
        logits = model(torch.cat([x, torch.randn(1, 1, 64, 64) * 5], 1))
    assert torch.equal(logits, rgb_logits)


def test_a_4_band_fine_tune_runs_and_its_model_segments_a_4_band_raster(rgbn, tmp_path):
    from core.model.modelfile import load_model, read_header

    base = make_random_model(tmp_path / "base.srmf", n_concepts=6, dim=16)
    out = tmp_path / "rgbn.srmf"
    env = engine_env()
    env["SRMF_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-m", "core", "finetune", str(out), "--raster", str(rgbn["rgbn"]),
                          "--labels", str(rgbn["labels"]), "--classes", str(rgbn["classes"]), "--base-model", str(base),
                          "--model-bands", "red,green,blue,nir", "--iterations", "3", "--batch-size", "2",
                          "--crop", "96", "--val-share", "0", "--device", "cpu", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "first convolution widened from 3 to 4 bands" in run.stdout
    header = read_header(out)
    inp = header["input"]
    assert inp["bands"] == ["red", "green", "blue", "nir"] and len(inp["mean"]) == len(inp["std"]) == 4
    assert inp["mean"][:3] == read_header(base)["input"]["mean"]  # ImageNet's RGB statistics kept
    nir = read_band(rgbn["rgbn"], 4).astype(np.float64)
    labelled = gdal.Open(str(rgbn["labels"])).ReadAsArray() != 255
    assert inp["mean"][3] == pytest.approx(nir[labelled].mean(), rel=1e-6)
    assert inp["std"][3] == pytest.approx(nir[labelled].std(), rel=1e-6)
    assert load_model(out).model.encoder is not None
    seg = subprocess.run([sys.executable, "-m", "core", "segment", str(rgbn["rgbn"]), str(tmp_path / "c.tif"),
                          "--model", str(out), "--device", "cpu", "--resolution", "native", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert seg.returncode == 0, seg.stdout[-2000:] + seg.stderr[-2000:]
    assert "bands [1, 2, 3, 4]" in seg.stdout
    classes = gdal.Open(str(tmp_path / "c.tif")).ReadAsArray()
    assert classes.shape == (644, 797) and set(np.unique(classes)) <= set(range(5))
    refused = subprocess.run([sys.executable, "-m", "core", "segment", str(rgbn["rgb"]), str(tmp_path / "d.tif"),
                              "--model", str(out), "--device", "cpu", "--json"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "the model reads 4 (red, green, blue, nir)" in refused.stdout, refused.stdout[-800:]
    assert not (tmp_path / "d.tif").exists()


def test_a_3_band_model_is_unchanged_by_a_4_band_raster_and_bad_band_lists_are_refused(rgbn, tmp_path):
    from core.finetune.job import finetune
    from core.finetune.sources import load_raster_pair
    from core.finetune.config import TrainConfig

    base = make_random_model(tmp_path / "base.srmf", n_concepts=6, dim=16)
    table = json.loads(rgbn["classes"].read_text())["classes"]
    images = [load_raster_pair(rgbn["rgbn"], rgbn["labels"], rgbn["classes"])]  # RGB by colour interpretation
    assert images[0].image.shape[0] == 3
    with pytest.raises(InputError, match="first three bands must be red, green, blue"):
        finetune(tmp_path / "x.srmf", images=images, classes=[{k: c[k] for k in ("name", "colour", "prompt")}
                                                             for c in table],
                 base_model=base, config=TrainConfig(iterations=1, batch_size=1, crop=64), device="cpu",
                 reporter=Reporter(json_mode=True, stream=io.StringIO()), model_bands=["red", "green", "nir"])
    with pytest.raises(InputError, match="another number"):
        finetune(tmp_path / "x.srmf", images=images, classes=[{k: c[k] for k in ("name", "colour", "prompt")}
                                                             for c in table],
                 base_model=base, config=TrainConfig(iterations=1, batch_size=1, crop=64), device="cpu",
                 reporter=Reporter(json_mode=True, stream=io.StringIO()), model_bands=["red", "green", "blue", "nir"])
    assert not (tmp_path / "x.srmf").exists()
