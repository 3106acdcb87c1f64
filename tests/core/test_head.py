"""The SRMF head (DESIGN.md "Method" item 3): shapes, normalisation, frozen text bank."""
from __future__ import annotations

import pytest
import torch

from core.model.network import SRMFHead, SRMFNet, architecture_config


@pytest.fixture
def head():
    torch.manual_seed(0)
    bank = torch.randn(54, 384) * 3.0  # not normalised on purpose
    return SRMFHead([24, 40, 112, 320], num_classes=6, text_bank=bank).eval()


def _features(b=2, h=32, w=48, zero=False):
    f = torch.zeros if zero else torch.randn
    return [f(b, c, h // s, w // s) for c, s in zip([24, 40, 112, 320], [1, 2, 4, 8])]


def test_shapes_follow_the_paper(head):
    out = head.forward_features(_features())
    assert "stages" not in out  # F = concat of the branches is never built (re-associated head, issue 11)
    assert head.forward_features(_features(), reference=True)["stages"].shape == (2, 1024, 32, 48)
    assert out["embedding"].shape == (2, 384, 32, 48)
    assert out["similarity"].shape == (2, 54, 32, 48)
    assert out["fused"].shape == (2, 256, 32, 48)
    assert head(_features()).shape == (2, 6, 32, 48)
    # the fusion conv reads concat[F, S]: 1024 + N input channels
    assert head.fusion[0].in_channels == 1024 + 54
    assert head.projection[0].in_channels == 1024 and head.projection[0].out_channels == 384
    assert all(b[0].kernel_size == (1, 1) and b[0].out_channels == 256 for b in head.branches)
    assert head.dropout.p == pytest.approx(0.1) and isinstance(head.dropout, torch.nn.Dropout2d)


def test_embedding_is_unit_norm_and_similarity_is_cosine(head):
    out = head.forward_features(_features())
    norms = out["embedding"].norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]), atol=1e-5)
    bank = head.text_bank
    assert torch.allclose(bank.norm(dim=1), torch.ones(54), atol=1e-6)
    p = out["embedding"][0, :, 5, 7]
    assert torch.allclose(out["similarity"][0, :, 5, 7], bank @ p, atol=1e-5)
    assert out["similarity"].abs().max() <= 1.0 + 1e-5


def test_all_zero_features_give_no_nan(head):
    # ReLU of BN of zero can be exactly zero: the eps in the normalisation must keep it finite
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(1.0)  # (0 - 1) / sqrt(1) → ReLU → exactly 0
        out = head.forward_features(_features(zero=True))
        logits = head(_features(zero=True))
    assert (out["embedding"] == 0).all()  # the degenerate case is really exercised
    assert torch.isfinite(logits).all() and torch.isfinite(out["similarity"]).all()


def test_text_bank_is_a_frozen_buffer(head):
    names = dict(head.named_parameters())
    assert "text_bank" not in names and "text_bank" in dict(head.named_buffers())
    head.train()
    loss = head(_features()).sum()
    loss.backward()
    assert head.text_bank.grad is None and head.classifier.weight.grad is not None


def test_plain_segformer_head_without_text_bank():
    h = SRMFHead([32, 64, 160, 256], num_classes=3, text_bank=None).eval()
    assert h.projection is None and h.fusion[0].in_channels == 1024
    assert "embedding" not in h.forward_features(_features_mit())


def _features_mit():
    return [torch.randn(1, c, 16 // s, 16 // s) for c, s in zip([32, 64, 160, 256], [1, 2, 4, 8])]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2", "mit_b0"])
def test_network_outputs_stride_4_logits(backbone):
    torch.manual_seed(0)
    net = SRMFNet(backbone, 5, text_bank=torch.randn(10, 32)).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 128, 96))
    assert y.shape == (1, 5, 32, 24)
    assert architecture_config(net) == {"name": "srmf", "backbone": backbone, "head_channels": 256,
                                        "dropout": 0.1, "text_fusion": True}
