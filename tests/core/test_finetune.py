"""Fine-tuning on real Dubai tiles: the loss goes down, the model file is right, resume, DDP, bad input."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ATLANTA, DATA, ROOT, engine_env, make_random_model
from core.classtable import dubai_class_table
from core.finetune.sources import load_dubai
from core.errors import Cancelled
from core.finetune.job import finetune
from core.model.modelfile import load_model, read_header
from core.protocol import Reporter
from core.finetune.loop import SampleBatcher
from core.finetune.config import TrainConfig
from core.finetune.sampler import TrainingSampler

DUBAI = DATA / "dubai_hitl_aerial"


@pytest.fixture(scope="module")
def tiles():
    """Three real images of tile_2 (the smallest tile): two to train on, one held out."""
    imgs = load_dubai(["tile_2"], parts=[1, 2, 3])
    return imgs[:2], [imgs[2]]


def quiet():
    return Reporter(json_mode=True, stream=io.StringIO())


def small_config(**over):
    base = dict(iterations=8, batch_size=4, lr=5e-4, crop=96, eval_interval=4, checkpoint_interval=4,
                warmup_iterations=1, val_window=256, val_stride=256, seed=3, log_interval=1)
    base.update(over)
    return TrainConfig(**base)


def _loss(model, images, labels, mean, std):
    model.eval()
    x = (torch.from_numpy(images) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = F.interpolate(model(x), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return float(F.cross_entropy(logits, torch.from_numpy(labels).long(), ignore_index=255))


def test_real_finetune_lowers_the_loss_and_writes_a_valid_model(tmp_path, tiles, random_model, monkeypatch):
    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path / "cache"))
    train, val = tiles
    base = load_model(random_model)
    classes = [dict(c) for c in dubai_class_table().to_header()]
    # a fixed batch of real training crops, to compare the loss before and after
    probe = SampleBatcher(TrainingSampler(train, 5, crop=96, seed=99)).batch(np.random.default_rng(0), 8)
    mean, std = base.header["input"]["mean"], base.header["input"]["std"]
    before = _loss(base.model, *probe, mean, std)
    out = tmp_path / "tuned.srmf"
    res = finetune(out, images=train, classes=classes, base_model=base, config=small_config(), device="cpu",
                   val_images=val, reporter=quiet())
    assert res["output"] == str(out) and res["iterations"] == 8
    tuned = load_model(out)
    after = _loss(tuned.model, *probe, mean, std)
    assert after < before * 0.9, (before, after)
    h = read_header(out)
    assert [c["name"] for c in h["classes"]] == ["building", "land", "road", "vegetation", "water"]
    assert h["classes"][0]["colour"] == "#3C1098" and h["classes"][1]["prompt"] == "A satellite image of unpaved land"
    # the text bank is the base model's, untouched (nothing on the text side is trained)
    assert torch.equal(tuned.model.head.text_bank, base.model.head.text_bank)
    assert h["text_bank"]["prompts"] == base.header["text_bank"]["prompts"]
    assert h["provenance"]["untrained"] is False and h["provenance"]["recipe"]["lr"] == 5e-4
    assert 0.0 <= h["metrics"]["miou"] <= 1.0 and set(h["metrics"]["per_class_iou"]) == set(c["name"] for c in classes)
    assert h["inference"] == {"window": 256, "stride": 256}
    assert not (tmp_path / "tuned.srmf.work").exists()


@pytest.mark.parametrize("extra", [{}, {"contrastive_weight": 0.5, "contrastive_queue": 16}],
                         ids=["plain", "contrastive-queue"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, tiles, random_model, monkeypatch, extra):
    """With the contrastive option the memory queue of earlier anchors is checkpointed too: without it
    the resumed iterations would contrast against an empty queue and drift from the uninterrupted run."""
    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path / "cache"))
    train, _ = tiles
    classes = [dict(c) for c in dubai_class_table().to_header()]
    cfg = small_config(iterations=6, checkpoint_interval=3, batch_size=2, **extra)
    whole = tmp_path / "whole.srmf"
    finetune(whole, images=train, classes=classes, base_model=random_model, config=cfg, device="cpu",
             val_share=0, reporter=quiet())
    killed = tmp_path / "killed.srmf"
    with pytest.raises(Cancelled):
        finetune(killed, images=train, classes=classes, base_model=random_model, config=cfg, device="cpu",
                 val_share=0, reporter=quiet(), stop_after=3)
    assert not killed.exists() and (tmp_path / "killed.srmf.work" / "checkpoint.safetensors").exists()
    log = io.StringIO()
    res = finetune(killed, images=train, classes=classes, base_model=random_model, config=cfg, device="cpu",
                   val_share=0, reporter=Reporter(json_mode=True, stream=log), resume=True)
    assert res["iterations"] == 6 and "resumed from" in log.getvalue() and "at iteration 3" in log.getvalue()
    if extra:
        assert "contrastive regularisation on" in log.getvalue()
    a, b = load_model(whole).model.state_dict(), load_model(killed).model.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_ddp_two_cpu_processes_write_one_model(tmp_path):
    base = make_random_model(tmp_path / "base.srmf", n_concepts=6, dim=16)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(dubai_class_table().to_obj()))
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps([{"images": str(DUBAI / "tile_2" / "images"), "masks": str(DUBAI / "tile_2" / "masks")}]))
    out = tmp_path / "ddp.srmf"
    env = engine_env()
    env["SRMF_CACHE_DIR"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          "-m", "core", "finetune", str(out), "--sources", str(sources), "--classes", str(classes),
                          "--base-model", str(base), "--iterations", "3", "--batch-size", "2", "--crop", "96",
                          "--val-share", "0", "--device", "cpu", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads(l) for l in run.stdout.splitlines() if l.startswith("{") and '"type": "result"' in l]
    assert len(results) == 2  # one per rank ...
    assert sum(1 for r in results if r.get("output")) == 1  # ... and only rank 0 writes the model
    assert load_model(out).num_classes == 5 and read_header(out)["provenance"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.srmf", "cache", "classes.json", "ddp.srmf", "sources.json"]


def _cli_finetune(tmp_path, *args):
    out = tmp_path / "bad.srmf"
    run = subprocess.run([sys.executable, "-m", "core", "finetune", str(out), *map(str, args), "--iterations", "1",
                          "--device", "cpu", "--json"], cwd=ROOT, env=engine_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    err = [json.loads(l) for l in run.stdout.splitlines() if '"type": "error"' in l]
    assert len(err) == 1
    assert not out.exists() and not (tmp_path / "bad.srmf.work").exists()
    return err[0]["message"]


def test_bad_input_mismatched_sizes_without_crs(tmp_path, random_model):
    img = DUBAI / "tile_2" / "images" / "image_part_001.jpg"
    mask = DUBAI / "tile_1" / "masks" / "image_part_001.png"  # another tile: other size, no CRS
    classes = tmp_path / "c.json"
    classes.write_text(json.dumps(dubai_class_table().to_obj()))
    msg = _cli_finetune(tmp_path, "--raster", img, "--labels", mask, "--classes", classes, "--base-model", random_model)
    assert "no crs" in msg.lower() or "size" in msg.lower()


def test_bad_input_missing_class_field(tmp_path, random_model):
    gj = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"
    msg = _cli_finetune(tmp_path, "--raster", ATLANTA, "--labels", gj, "--label-field", "no_such_field",
                        "--base-model", random_model)
    assert "no_such_field" in msg


def test_bad_input_label_values_outside_the_class_table(tmp_path, random_model):
    # LoveDA raw codes 0..7 against the default 5-class table (values 0..4)
    img = DATA / "srmf_mmseg_testdata" / "pseudo_loveda_dataset" / "img_dir" / "1.png"
    ann = DATA / "srmf_mmseg_testdata" / "pseudo_loveda_dataset" / "ann_dir" / "1.png"
    msg = _cli_finetune(tmp_path, "--raster", img, "--labels", ann, "--base-model", random_model)
    assert "6" in msg and ("class table" in msg.lower() or "not in" in msg.lower())


def test_bad_input_empty_polygon_layer(tmp_path, random_model):
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": [],
                                 "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32616"}}}))
    msg = _cli_finetune(tmp_path, "--raster", ATLANTA, "--labels", empty, "--label-field", "class",
                        "--base-model", random_model)
    assert "empty" in msg.lower() or "no feature" in msg.lower()


def test_a_time_budget_stops_early_with_the_rate_decayed(tmp_path, tiles, random_model, monkeypatch):
    """``max_seconds`` (``--minutes``): training stops when the budget is spent, validates, writes the
    model, and the learning rate has decayed towards 0 by then instead of stopping at its peak."""
    import time as real_time

    class Clock:  # a clock that advances 0.25 s per reading: the test does not depend on the CPU's speed
        now = 0.0

        def perf_counter(self):
            Clock.now += 0.25
            return Clock.now

        def __getattr__(self, name):
            return getattr(real_time, name)

    monkeypatch.setattr("core.finetune.loop.time", Clock())
    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path / "cache"))
    train, val = tiles
    stream = io.StringIO()
    out = tmp_path / "budget.srmf"
    res = finetune(out, images=train, classes=[dict(c) for c in dubai_class_table().to_header()],
                   base_model=load_model(random_model),
                   config=small_config(iterations=100000, eval_interval=100000, max_seconds=6.0, srr=False),
                   device="cpu",
                   val_images=val, reporter=Reporter(json_mode=True, stream=stream))
    assert 5 <= res["iterations"] < 100
    msgs = [json.loads(line) for line in stream.getvalue().splitlines()]
    lrs = [m["lr"] for m in msgs if m.get("type") == "metrics" and "lr" in m]
    assert len(lrs) == res["iterations"]
    # group 0 (backbone) at lr 5e-4 after the 1-iteration warm-up; from then on the rate only decays
    assert lrs[1] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] < 0.9 * lrs[1]
    assert any("time budget" in m.get("message", "") for m in msgs if m.get("type") == "log")
    assert read_header(out)["metrics"]["iteration"] == res["iterations"]
