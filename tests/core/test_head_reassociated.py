"""The re-associated head (issue 11, item 3) equals the textbook formulation — upsample the four branch maps,
concatenate, then the projection and fusion convolutions — on a real image, through the real architecture
(ImageNet EfficientNet-Lite0 backbone, offline weights; seeded random head), in eval and train mode,
outputs and gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA
from core.model.network import SRMFNet

IMAGE = DATA / "dubai_hitl_aerial" / "tile_8" / "images" / "image_part_003.jpg"  # roads, buildings, a pitch


@pytest.fixture(scope="module")
def net_and_image():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(63, 384), dim=1)
    model = SRMFNet("efficientnet_lite0", 5, text_bank=bank, encoder_weights="imagenet")
    for m in model.modules():  # BN statistics off their defaults, so eval mode is not trivially flat
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"), dtype=np.float32)[:512, :512]
    x = torch.from_numpy((rgb - 127.0) / 64.0).permute(2, 0, 1)[None]
    x = torch.cat([x, torch.flip(x, dims=[3])])  # batch of 2 (BN batch statistics in train mode)
    return model, x


def _logits(model, x, reference: bool, seed: int = 0):
    torch.manual_seed(seed)  # the same Dropout2d mask in train mode
    feats = model.stage_features(x)
    head = model.head
    return head.classifier(head.dropout(head.forward_features(feats, reference=reference)["fused"]))


def test_eval_mode_logits_and_classes_equal_the_reference(net_and_image):
    model, x = net_and_image
    model.eval()
    with torch.no_grad():
        fast, ref = _logits(model, x, False), _logits(model, x, True)
        emb_fast = model.head.forward_features(model.stage_features(x))["embedding"]
        emb_ref = model.head.forward_features(model.stage_features(x), reference=True)["embedding"]
    assert fast.shape == ref.shape == (2, 5, 128, 128)
    assert float(ref.std()) > 0.05  # a real signal, not a flat map
    assert float((fast - ref).abs().max()) < 1e-4
    assert float((emb_fast - emb_ref).abs().max()) < 1e-4
    agree = float((fast.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= 0.9999


def test_train_mode_outputs_and_gradients_equal_the_reference(net_and_image):
    model, x = net_and_image
    model.train()
    target = torch.randint(0, 5, (2, 128, 128), generator=torch.Generator().manual_seed(1))
    grads, outs = [], []
    for reference in (False, True):
        model.zero_grad(set_to_none=True)
        out = _logits(model, x, reference)
        torch.nn.functional.cross_entropy(out, target).backward()
        outs.append(out.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    model.eval()
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    # The two formulations sum the same float32 terms in another order (32 768 pixels per weight of the fusion
    # conv), and the order depends on the CPU's vector width: on AVX-512 every element is within 1e-3 of its
    # tensor's largest gradient, on AVX2 within 4e-3 (head.fusion) with the tensors' norms within 8e-4. A wrong
    # slice or a missed branch is off by O(1): the bounds below stay far from that.
    for name in grads[0]:
        g, r = grads[0][name], grads[1][name]
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-6 + 1e-2 * float(r.abs().max())), name
        assert float((g - r).norm()) <= 2e-3 * float(r.norm()) + 1e-6 * r.numel() ** 0.5, name
    # the head's projection and fusion convs did get gradients (the re-associated slices are trained)
    assert float(grads[0]["head.fusion.0.weight"].abs().sum()) > 0
    assert float(grads[0]["head.projection.0.weight"].abs().sum()) > 0
