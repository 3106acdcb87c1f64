"""Self-supervised pretraining (issue 14): NT-Xent, GraSS's gradient map and crops, the raster pool, the
loop (decreasing loss, exact resume), the model it writes (fine-tune from it, segment refuses it), bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ADELAIDE, ATLANTA, OSBS, engine_env  # noqa: F401 - engine_env: the CLI helper's
from test_cli import json_lines, leftovers, run_core

from core.errors import InputError
from core.losses import nt_xent, supcon_loss
from core.pretrain.config import PretrainConfig
from core.pretrain.grass import (ProjectionHead, crop_and_resize, gradient_cam, gradient_guided_boxes,
                                 peak_region_box)
from core.pretrain.views import RasterPool, box_in_window, box_iou, purity, simclr_views

SMALL = ["--view", "64", "--patch", "128", "--batch-size", "4", "--device", "cpu"]


# -- NT-Xent ------------------------------------------------------------------------------------------
def _nt_xent_direct(z1, z2, t):
    """SimCLR's Eq. 1 written out: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), mean over 2N."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total += -torch.log(torch.exp(z[i] @ z[j] / t) / den)
    return total / n2


def test_nt_xent_matches_the_direct_formula_and_supcon_with_pair_ids():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    for t in (0.5, 0.1):
        assert float(nt_xent(z1, z2, t)) == pytest.approx(float(_nt_xent_direct(z1, z2, t)), rel=1e-5)
    ids = torch.arange(5).repeat(2)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    assert float(nt_xent(z1, z2, 0.5)) == pytest.approx(float(supcon_loss(z, ids, 0.5)[0]), rel=1e-5)
    # a positive pair closer than the negatives lowers the loss
    assert float(nt_xent(z1, z1 + 0.01 * z2, 0.5)) < float(nt_xent(z1, z2, 0.5))
    with pytest.raises(ValueError):
        nt_xent(z1[:1], z2[:1])


# -- the gradient map ---------------------------------------------------------------------------------
class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.b = nn.Conv2d(6, 5, 3, stride=2, padding=1)

    def forward(self, x):
        f = torch.relu(self.a(x))
        return [f, self.b(f)]


def test_gradient_cam_equals_a_direct_computation_on_a_tiny_model():
    torch.manual_seed(0)
    enc, proj = _TinyEncoder(), ProjectionHead(5, hidden=7, out_dim=4)
    v1, v2 = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    loss_fn = lambda a, b: nt_xent(a, b, 0.5)  # noqa: E731
    boxes1, boxes2, cam1, cam2, loss = gradient_guided_boxes(enc, proj, v1, v2, loss_fn, 0.5, "loss", 64)
    # the reference way: a full backward with the parameters' gradients, F's gradient retained
    f1, f2 = enc(v1)[-1], enc(v2)[-1]
    f1.retain_grad()
    f2.retain_grad()
    full = loss_fn(proj(f1), proj(f2))
    full.backward()
    assert loss == pytest.approx(float(full.detach()), rel=1e-6)
    for f, cam in ((f1, cam1), (f2, cam2)):
        g, F_ = f.grad, f.detach()
        direct = torch.zeros(F_.shape[0], F_.shape[2], F_.shape[3])
        for b in range(F_.shape[0]):
            for c in range(F_.shape[1]):
                direct[b] += g[b, c].mean() * F_[b, c]
        assert torch.allclose(cam, direct, atol=1e-6)
    assert torch.allclose(gradient_cam(f1.detach(), f1.grad, "negative"), -cam1, atol=1e-6)
    # no parameter gradient was accumulated by the GS pass itself (only by the reference backward above)
    enc.zero_grad()
    gradient_guided_boxes(enc, proj, v1, v2, loss_fn, 0.5, "loss", 64)
    assert all(p.grad is None or not p.grad.any() for p in enc.parameters())
    for y0, x0, y1, x1 in boxes1 + boxes2:
        assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64 and y1 - y0 >= 32 and x1 - x0 >= 32


def test_peak_region_box_on_hand_made_maps():
    cam = np.zeros((100, 100), dtype=np.float32)
    cam[10:20, 60:90] = 1.0          # a region above the threshold...
    cam[70:90, 5:25] = 0.8
    cam[75, 10] = 2.0                # ...and the one holding the peak wins
    assert peak_region_box(cam, 0.3, min_side=1) == (70, 5, 90, 25)
    # the threshold is relative to the range: 0.8 is under min + 0.45 * 2, so only the peak's pixel is left
    assert peak_region_box(cam, 0.45, min_side=1) == (75, 10, 76, 11)
    # a small box grows to min_side around its centre, kept inside the map
    assert peak_region_box(cam, 0.45, min_side=32) == (60, 0, 92, 32)
    # negative maps: the peak is the maximum (the least negative), not turned upside down
    assert peak_region_box(cam - 5.0, 0.3, min_side=1) == (70, 5, 90, 25)
    # no range or not finite: the whole view
    assert peak_region_box(np.full((50, 40), 3.0), 0.5) == (0, 0, 50, 40)
    assert peak_region_box(np.zeros((50, 40)), 0.5) == (0, 0, 50, 40)
    nan = cam.copy()
    nan[0, 0] = np.nan
    assert peak_region_box(nan, 0.5) == (0, 0, 100, 100)


def test_crop_and_resize_and_boxes_back_in_the_window():
    views = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = crop_and_resize(views, [(0, 0, 4, 4), (4, 4, 8, 8)], 8)
    assert out.shape == (2, 1, 8, 8)
    assert torch.equal(out[0, 0, ::2, ::2], views[0, 0, :4, :4])  # nearest: each pixel doubled
    assert torch.equal(out[1, 0, ::2, ::2], views[1, 0, 4:, 4:])
    # a view of the window box (top 10, left 20, 100 x 50), 50 px a side, its left half cropped
    assert box_in_window((10, 20, 100, 50), False, (0, 0, 50, 25), 50) == (10, 20, 110, 45)
    # flipped: the view's left half is the window box's right half
    assert box_in_window((10, 20, 100, 50), True, (0, 0, 50, 25), 50) == (10, 45, 110, 70)
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[:, 15:] = 1
    labels[0, 0] = 255
    assert purity(labels, (0, 0, 20, 20)) == pytest.approx(299 / 399)  # class 0: 15 columns less the ignored pixel
    assert purity(np.full((4, 4), 255, np.uint8), (0, 0, 4, 4)) is None
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


# -- the pool and the views ---------------------------------------------------------------------------
def _header():
    from core.model.modelfile import DEFAULT_MODEL_PATH, read_header

    return read_header(DEFAULT_MODEL_PATH)


def test_pool_reads_real_rasters_nodata_aware_and_1_band_replicated():
    notes = []
    pool = RasterPool([str(ADELAIDE), str(ATLANTA)], _header(), None, 256, 128, log=notes.append)
    assert [r.reader.bands for r in pool.rasters] == [[1, 2, 3], [1, 1, 1]]
    assert "percentiles" in notes[1]  # uint16 scaled by the model's rule, and said so
    rng = np.random.default_rng(0)
    mean = np.asarray(_header()["input"]["mean"], dtype=np.float32)
    seen = set()
    for _ in range(12):
        data, i, (x0, y0) = pool.sample(rng)
        seen.add(i)
        assert data.shape == (3, 256, 256) and data.dtype == np.float32 and np.isfinite(data).all()
        assert 0 <= data.min() and data.max() <= 255
        r = pool.rasters[i]
        assert 0 <= x0 <= r.reader.width - 256 and 0 <= y0 <= r.reader.height - 256
        if i == 1:  # Atlanta's nodata (0) pixels take the model's mean; valid pixels are at least half
            raw = r.reader.ds.GetRasterBand(1).ReadAsArray(x0, y0, 256, 256)
            assert (raw != 0).mean() >= 0.5 - 0.1
            assert np.allclose(data[:, raw == 0], mean[:, None])
    assert seen == {0, 1}
    v = simclr_views([pool.sample(rng)[0] for _ in range(3)], 64, pool.mean, pool.std)
    assert v.images.shape == (3, 3, 64, 64) and v.boxes.shape == (3, 4) and v.flipped.shape == (3,)
    assert (v.boxes[:, 2:] >= 1).all() and (v.boxes[:, 0] + v.boxes[:, 2] <= 256).all()


def test_config_checks_name_the_parameter():
    for kwargs, name in [(dict(batch_size=1), "--batch-size"), (dict(view=100), "--view"),
                         (dict(iterations=None), "budget"), (dict(method="byol"), "--method"),
                         (dict(method="grass", warmup_iterations=10), "--warmup-iterations"), (dict(cam_threshold=1.0), "--cam-threshold"),
                         (dict(temperature=0), "--temperature"), (dict(patch=32), "--patch")]:
        with pytest.raises(InputError, match=name):
            PretrainConfig(**{"iterations": 10, **kwargs}).validate()
    c = PretrainConfig(method="grass", iterations=10)
    assert c.in_warmup(4, 0) and not c.in_warmup(5, 0)      # half the budget by default
    assert PretrainConfig(iterations=10).method == "simclr" and PretrainConfig(iterations=10).in_warmup(9, 0)
    g = PretrainConfig(method="grass", minutes=2)
    assert g.in_warmup(3, 59) and not g.in_warmup(3, 61)


# -- the loop ------------------------------------------------------------------------------------------
def test_real_data_steps_give_finite_decreasing_loss():
    from core.pretrain.job import _Run, starting_model

    config = PretrainConfig(iterations=6, batch_size=4, view=64, patch=128, lr=1e-3, seed=0)
    model, header, _ = starting_model(None, 0)
    pool = RasterPool([str(ADELAIDE)], header, None, config.patch_size, config.view)
    run = _Run(model, pool, config, torch.device("cpu"), __import__("pathlib").Path("/nonexistent"), None)
    # the same step (same windows and views) five times: the contrastive loss falls on it
    losses = [run.one_step(gs=False) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    gs = [run.one_step(gs=True) for _ in range(3)]
    assert all(np.isfinite(gs))


def test_cli_pretrain_resume_continues_exactly_and_the_model_is_usable(tmp_path):
    from core.model.modelfile import load_model, read_header
    from core.pretrain.job import pretrain

    args = dict(rasters=[str(ADELAIDE)], device="cpu")
    cfg = dict(method="grass", iterations=4, warmup_iterations=2, batch_size=3, view=64, patch=128, checkpoint_interval=2,
               seed=3)
    straight = pretrain(tmp_path / "straight.srmf", config=PretrainConfig(**cfg), **args)
    assert straight["gs_iterations"] == 2 and straight["iterations"] == 4
    with pytest.raises(Exception, match="stop_after"):
        pretrain(tmp_path / "resumed.srmf", config=PretrainConfig(**cfg), stop_after=2, **args)
    assert not (tmp_path / "resumed.srmf").exists()
    assert (tmp_path / "resumed.srmf.work" / "checkpoint.safetensors").exists()
    # the CLI continues it: same recipe, --resume
    run = run_core("pretrain", tmp_path / "resumed.srmf", "--raster", ADELAIDE, "--method", "grass", "--iterations", 4,
                   "--warmup-iterations", 2, "--batch-size", 3, "--view", 64, "--patch", 128,
                   "--checkpoint-interval", 2, "--seed", 3, "--device", "cpu", "--resume", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    msgs = json_lines(run.stdout)
    assert any(m["type"] == "log" and "resumed at step 2" in m["message"] for m in msgs)
    assert [(m["iteration"], m["stage"]) for m in msgs if m["type"] == "metrics"] == [(4, "gs")]
    a, b = load_model(tmp_path / "straight.srmf"), load_model(tmp_path / "resumed.srmf")
    for (k, va), (_, vb) in zip(a.model.encoder.state_dict().items(), b.model.encoder.state_dict().items()):
        assert torch.equal(va, vb), k
    assert leftovers(tmp_path) == ["resumed.srmf", "straight.srmf"]  # work folders removed
    h = read_header(tmp_path / "resumed.srmf")
    assert h["provenance"]["untrained_head"] is True and a.head_untrained
    pre = h["pretraining"]
    assert pre["method"] == "grass" and pre["iterations"] == 4 and pre["gs_iterations"] == 2
    assert pre["rasters"] == [str(ADELAIDE)] and pre["loss_curve"] and pre["seconds"] > 0
    # the encoder moved away from ImageNet's
    from core.pretrain.job import starting_model

    imagenet = starting_model(None, 0)[0].encoder.state_dict()
    assert any(not torch.equal(imagenet[k], v) for k, v in a.model.encoder.state_dict().items())
    info = run_core("info", tmp_path / "resumed.srmf")
    assert "UNTRAINED HEAD" in info.stdout and "Pretraining: grass, 4 steps (2 gradient-guided)" in info.stdout


def test_segment_refuses_and_finetune_trains_from_a_pretrained_model(tmp_path):
    from core.pretrain.job import pretrain

    model = tmp_path / "pre.srmf"
    pretrain(model, rasters=[str(ADELAIDE)], device="cpu",
             config=PretrainConfig(method="simclr", iterations=2, batch_size=2, view=64, patch=128))
    seg = run_core("segment", ADELAIDE, tmp_path / "classes.tif", "--model", model, "--json")
    assert seg.returncode == 2
    err = [m for m in json_lines(seg.stdout) if m["type"] == "error"][0]["message"]
    assert "pretrained encoder with an untrained decode head" in err and "--base-model pre.srmf" in err
    assert leftovers(tmp_path) == ["pre.srmf"]
    # fine-tune from it: its encoder, a fresh head for six classes of its own (a real ISPRS Potsdam tile)
    from conftest import DATA

    tile = DATA / "srmf_mmseg_testdata" / "pseudo_potsdam_dataset"
    img, ann = tile / "img_dir" / "2_10_0_0_512_512.png", tile / "ann_dir" / "2_10_0_0_512_512.png"
    names = ["impervious", "building", "low vegetation", "tree", "car", "clutter"]
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [
        {"name": n, "colour": "#%02x%02x%02x" % (40 * i, 200 - 30 * i, 90), "value": i} for i, n in enumerate(names)]}))
    out = tmp_path / "ft.srmf"
    ft = run_core("finetune", out, "--raster", img, "--labels", ann, "--base-model", model,
                  "--classes", tmp_path / "classes.json",
                  "--iterations", 2, "--crop", 64, "--batch-size", 2, "--val-share", 0.4, "--device", "cpu",
                  "--freeze-encoder", "--json")
    assert ft.returncode == 0, ft.stdout + ft.stderr
    from core.model.modelfile import load_model

    pre, tuned = load_model(model), load_model(out)
    assert not tuned.head_untrained and tuned.header["encoder_pretraining"]["method"] == "simclr"
    assert [c["name"] for c in tuned.classes] == names and tuned.model.head.classifier.out_channels == 6
    for k, v in pre.model.encoder.state_dict().items():  # frozen: the encoder is the pretrained one
        assert torch.equal(v, tuned.model.encoder.state_dict()[k]), k
    assert any(m["type"] == "log" and "encoder is frozen" in m["message"] for m in json_lines(ft.stdout))


def _all_nodata(path):
    from osgeo import gdal

    src = gdal.Open(str(ADELAIDE))
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 300, 300, 3, gdal.GDT_Byte)
    ds.SetGeoTransform(src.GetGeoTransform())
    ds.SetProjection(src.GetProjection())
    for b in range(1, 4):
        ds.GetRasterBand(b).SetNoDataValue(0)
        ds.GetRasterBand(b).Fill(0)
    ds = None


def test_bad_input_is_refused_clearly_with_nothing_left(tmp_path):
    from osgeo import gdal

    small = tmp_path / "small.tif"
    gdal.Translate(str(small), str(ADELAIDE), srcWin=[0, 0, 48, 40])
    empty = tmp_path / "empty.tif"
    _all_nodata(empty)
    before = leftovers(tmp_path)
    cases = [
        ([], "No rasters to pretrain on"),
        (["--raster", small], "small.tif is 48 x 40 pixels: smaller than a view (64 px)"),
        (["--raster", empty], "empty.tif: no window of 128 px is at least 50% valid data"),
        (["--raster", ADELAIDE, "--batch-size", "1"], "--batch-size must be at least 2"),
        (["--raster", tmp_path / "missing.tif"], "not found"),
        (["--raster", ADELAIDE, "--bands", "4,2,1"], "band 4 does not exist"),
    ]
    for extra, message in cases:
        args = ["pretrain", tmp_path / "out.srmf", "--iterations", 2] + SMALL + list(extra)
        if "--batch-size" in extra:
            args = ["pretrain", tmp_path / "out.srmf", "--iterations", 2, "--view", 64, "--patch", 128] + list(extra)
        run = run_core(*args, "--json")
        assert run.returncode == 2, (extra, run.stdout, run.stderr)
        err = [m for m in json_lines(run.stdout) if m["type"] == "error"]
        assert err and message in err[0]["message"], (extra, err)
        assert "Traceback" not in run.stdout + run.stderr
        assert leftovers(tmp_path) == before, extra
    # an existing output is kept without --overwrite
    (tmp_path / "out.srmf").write_bytes(b"earlier")
    run = run_core("pretrain", tmp_path / "out.srmf", "--raster", ADELAIDE, "--iterations", 2, *SMALL)
    assert run.returncode == 2 and (tmp_path / "out.srmf").read_bytes() == b"earlier"


def test_a_minutes_budget_stops_on_the_clock(tmp_path):
    from core.pretrain.job import pretrain

    res = pretrain(tmp_path / "timed.srmf", rasters=[str(ADELAIDE)], device="cpu",
                   config=PretrainConfig(method="grass", minutes=0.02, batch_size=2, view=64, patch=128))
    # no step budget: it ran until 1.2 s of training were spent, then wrote the model; GraSS's sampling took
    # the second half of the clock
    assert res["iterations"] >= 1 and res["seconds"] >= 1.2
    assert res["gs_iterations"] <= res["iterations"] and (tmp_path / "timed.srmf").exists()
    # a budget spent before the first step still trains one (a model is never written untrained)
    tiny = pretrain(tmp_path / "tiny.srmf", rasters=[str(ADELAIDE)], device="cpu",
                    config=PretrainConfig(minutes=1e-5, batch_size=2, view=64, patch=128))
    assert tiny["iterations"] == 1 and tiny["first_loss"] is not None
