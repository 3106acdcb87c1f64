"""The opt-in class-balanced contrastive regulariser (BCL transfer, arXiv 2308.02844) on real Dubai crops."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from conftest import make_random_model
from core.finetune.contrastive import (ContrastiveRegulariser, FeatureCapture, labels_at, region_embeddings,
                                       sample_anchors, supcon_loss)
from core.classtable import dubai_class_table
from core.finetune.sources import load_dubai
from core.errors import InputError
from core.model.modelfile import load_model
from core.protocol import Reporter
from core.finetune.sampler import TrainingSampler
from core.finetune.loop import SampleBatcher, train_loop
from core.finetune.config import TrainConfig


def _sampler(images):
    """Plain random crops of the real images (MARS/SRR-TA off: they are tested in test_sampling)."""
    return SampleBatcher(TrainingSampler(images, 5, crop=96, seed=1, mars=False, srr=False))


@pytest.fixture(scope="module")
def images():
    """Two real images of tile_2: part 1 (no water, no vegetation) and part 5 (all five classes)."""
    return load_dubai(["tile_2"], parts=[1, 5])


@pytest.fixture(scope="module")
def batch(images):
    """A fixed batch of 4 real 96 px training crops (MARS + SRR-TA sampler) and their labels."""
    imgs, labels = SampleBatcher(TrainingSampler(images, 5, crop=96, seed=1)).batch(np.random.default_rng(0), 4)
    return imgs, labels


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("models") / "random.srmf")


def _normalised(lm, imgs):
    mean = torch.tensor(lm.header["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(lm.header["input"]["std"]).view(1, 3, 1, 1)
    return (torch.from_numpy(imgs) - mean) / std


def test_anchor_sampling_is_uniform_per_class(batch):
    # the real labels of the batch (4 crops of 96 px) at stride 4: building ~1 % of the cells, land ~40 %
    lab = labels_at(torch.from_numpy(batch[1]).long(), (24, 24))
    counts = torch.bincount(lab[lab != 255].flatten(), minlength=5)
    assert counts.min() * 10 < counts.max()  # a long tail really is there
    g = torch.Generator().manual_seed(0)
    idx, cls = sample_anchors(lab, 64, g)
    assert torch.bincount(cls, minlength=5).tolist() == [64] * 5  # every class the same number of anchors
    assert torch.equal(lab.flatten()[idx], cls)
    # within a class, every pixel is equally likely (chi-square over many draws)
    rare = int(counts.argmin())
    hits = torch.zeros(lab.numel(), dtype=torch.int64)
    for _ in range(400):
        i, c = sample_anchors(lab, 16, g)
        hits += torch.bincount(i[c == rare], minlength=lab.numel())
    observed = hits[lab.flatten() == rare].numpy()
    assert observed.sum() == 400 * 16
    assert chisquare(observed).pvalue > 1e-3
    # a class with fewer pixels than anchors is drawn with replacement; 255 is never an anchor
    tiny = torch.full((1, 8, 8), 255)
    tiny[0, 0, :3] = 2
    tiny[0, 5] = 1
    i, c = sample_anchors(tiny, 10, g)
    assert torch.bincount(c, minlength=3).tolist() == [0, 10, 10] and (tiny.flatten()[i] != 255).all()


def test_labels_at_cell_centres():
    lab = torch.arange(16).view(1, 4, 4)
    assert labels_at(lab, (2, 2)).tolist() == [[[5, 7], [13, 15]]]
    assert torch.equal(labels_at(lab, (4, 4)), lab)


def test_disabled_regulariser_has_no_effect_and_no_gradient(batch, model_file, images, tmp_path, monkeypatch):
    lm = load_model(model_file)
    model = lm.model.train()
    x = _normalised(lm, batch[0])
    y = torch.from_numpy(batch[1]).long()
    x, y = x[:2], y[:2]
    off = ContrastiveRegulariser(5, weight=0.0)
    assert not off.enabled
    with FeatureCapture(model.head.fusion) as cap:
        logits = model(x)
        fused = cap.output
    out = off(fused, y)
    assert out.item() == 0.0 and not out.requires_grad  # a constant: no graph, no gradient
    ce = F.cross_entropy(F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False), y,
                         ignore_index=255)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    with_off = torch.autograd.grad(ce + out, params, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(plain, with_off))
    # the training loop with the default config never builds the regulariser nor hooks the fusion block
    import core.finetune.contrastive as contrastive

    def refuse(*a, **k):
        raise AssertionError("the contrastive regulariser was built although it is off")

    monkeypatch.setattr(contrastive.ContrastiveRegulariser, "__init__", refuse)
    monkeypatch.setattr(contrastive.FeatureCapture, "__init__", refuse)
    config = TrainConfig(iterations=2, batch_size=2, crop=96, warmup_iterations=0, log_interval=1, seed=3)
    assert config.contrastive_weight == 0.0
    stream = io.StringIO()
    res = train_loop(lm.model, [c.name for c in dubai_class_table()], _sampler(images), [], config,
                     lm.header["input"]["mean"], lm.header["input"]["std"], torch.device("cpu"), tmp_path / "work",
                     lambda m, metrics: None, reporter=Reporter(json_mode=True, stream=stream))
    assert res.iterations == 2 and np.isfinite(res.last_loss)
    assert "contrastive" not in stream.getvalue()


def test_enabled_loss_is_finite_and_decreases_on_real_data(batch, model_file):
    lm = load_model(model_file)
    model = lm.model.train()
    x = _normalised(lm, batch[0])
    y = torch.from_numpy(batch[1]).long()
    reg = ContrastiveRegulariser(5, weight=1.0, temperature=0.1, anchors_per_class=32)
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    values = []
    for it in range(6):
        with FeatureCapture(model.head.fusion) as cap:
            model(x)
            fused = cap.output
        loss = reg(fused, y, torch.Generator().manual_seed(it))
        assert torch.isfinite(loss) and loss.requires_grad
        opt.zero_grad()
        loss.backward()
        head_grad = sum(float(p.grad.abs().sum()) for p in model.head.fusion.parameters() if p.grad is not None)
        assert head_grad > 0
        opt.step()
        values.append(float(loss.detach()))
    assert reg.last["anchors"] == 32 * len(torch.unique(y[y != 255]))
    assert values[-1] < values[0] * 0.9, values


def test_supcon_prefers_separated_embeddings_and_uses_the_queue():
    g = torch.Generator().manual_seed(0)
    cls = torch.arange(4).repeat_interleave(8)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    tight = F.normalize(centres[cls] + 0.05 * torch.randn(32, 16, generator=g), dim=1)
    loose = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    assert supcon_loss(tight, cls, 0.1)[0] < supcon_loss(loose, cls, 0.1)[0]
    # one anchor per class has no positive in the batch: skipped, unless the queue holds its class
    single = torch.arange(4)
    loss, used = supcon_loss(tight[::8], single, 0.1)
    assert used == 0 and loss.item() == 0.0
    reg = ContrastiveRegulariser(4, weight=1.0, anchors_per_class=2, queue_size=8)
    feats = tight.T.reshape(1, 16, 4, 8)
    labels = cls.view(1, 4, 8)
    reg(feats, labels, torch.Generator().manual_seed(1))
    assert reg.queue_fill.tolist() == [2, 2, 2, 2]
    reg(feats, labels, torch.Generator().manual_seed(2))
    assert reg.queue_fill.tolist() == [4, 4, 4, 4] and reg.last["anchors"] == 8
    # region embeddings: one per (image, class)
    r, rc = region_embeddings(F.normalize(feats, dim=1), labels)
    assert r.shape == (4, 16) and rc.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveRegulariser(4, temperature=0.0)


def test_finetune_with_the_contrastive_option(images, model_file, tmp_path, monkeypatch):
    from core.finetune.job import finetune

    monkeypatch.setenv("SRMF_CACHE_DIR", str(tmp_path / "cache"))
    stream = io.StringIO()
    config = TrainConfig(iterations=3, batch_size=2, lr=5e-4, crop=96, checkpoint_interval=3, warmup_iterations=1,
                         seed=3, log_interval=1, mars=False, srr=False,
                         contrastive_weight=0.1, contrastive_temperature=0.2, contrastive_anchors=16)
    res = finetune(tmp_path / "c.srmf", images=images[1:], classes=[dict(c) for c in dubai_class_table().to_header()],
                   base_model=load_model(model_file), config=config, device="cpu", val_share=0.0,
                   reporter=Reporter(json_mode=True, stream=stream))
    msgs = [json.loads(line) for line in stream.getvalue().splitlines()]
    metrics = [m for m in msgs if m["type"] == "metrics" and "contrastive" in m]
    assert len(metrics) == 3 and all(np.isfinite(m["contrastive"]) and m["contrastive"] > 0 for m in metrics)
    assert any("contrastive regularisation on" in m.get("message", "") for m in msgs if m["type"] == "log")
    from core.model.modelfile import read_header

    recipe = read_header(res["output"])["provenance"]["recipe"]
    assert recipe["contrastive_weight"] == 0.1 and "InfoNCE" in recipe["loss"]
    with pytest.raises(InputError, match="--contrastive-temperature must be positive"):
        finetune(tmp_path / "d.srmf", images=images[:1], classes=[dict(c) for c in dubai_class_table().to_header()],
                 base_model=load_model(model_file), config=TrainConfig(contrastive_weight=0.1,
                                                                        contrastive_temperature=0.0),
                 device="cpu", reporter=Reporter(json_mode=True, stream=io.StringIO()))


def test_cli_flags(capsys):
    from core.cli import build_parser, main

    args = build_parser("finetune").parse_args(["finetune", "m.srmf", "--contrastive-weight", "0.2",
                                                "--contrastive-temperature", "0.07"])
    assert args.contrastive_weight == 0.2 and args.contrastive_temperature == 0.07
    assert build_parser("finetune").parse_args(["finetune", "m.srmf"]).contrastive_weight == 0.0
    assert main(["finetune", "m.srmf", "--raster", "x.tif", "--labels", "y.tif", "--contrastive-weight", "-1",
                 "--json"]) == 2
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "--contrastive-weight must be 0 (off) or positive" in err["message"]
    args = build_parser("finetune").parse_args(["finetune", "m.srmf", "--contrastive-weight", "0.1",
                                                "--contrastive-anchors", "32", "--contrastive-queue", "128"])
    assert args.contrastive_anchors == 32 and args.contrastive_queue == 128
    for flag, value, message in (("--contrastive-anchors", "1", "--contrastive-anchors must be at least 2"),
                                 ("--contrastive-queue", "-5", "--contrastive-queue must be 0 (none) or positive")):
        assert main(["finetune", "m.srmf", "--raster", "x.tif", "--labels", "y.tif", "--contrastive-weight", "0.1",
                     flag, value, "--json"]) == 2
        assert message in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]
