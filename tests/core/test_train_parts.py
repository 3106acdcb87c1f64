"""Pieces of the training loop: the schedule, the parameter groups, checkpoints without pickle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.model.network import SRMFNet
from core.metrics import confusion, iou_from_confusion
from core.checkpoint import load_checkpoint, save_checkpoint
from core.finetune.config import lr_factor, time_budget_factor
from core.finetune.loop import param_groups, tune_cpu_allocator


def test_schedule_is_linear_warmup_then_poly():
    assert lr_factor(0, 1000, 100) == pytest.approx(1e-6)
    assert lr_factor(50, 1000, 100) == pytest.approx(0.5, abs=1e-5)
    assert lr_factor(100, 1000, 100) == pytest.approx(1.0)
    assert lr_factor(550, 1000, 100) == pytest.approx(0.5)
    assert lr_factor(1000, 1000, 100) == pytest.approx(0.0)
    vals = [lr_factor(i, 1000, 100) for i in range(100, 1000)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_time_budget_decay_reaches_zero_at_the_end_of_the_budget():
    # warm-up ended at 10 s of a 110 s budget: half-way through the rest the factor is 0.5, at the end 0
    assert time_budget_factor(10.0, 110.0, 10.0) == pytest.approx(1.0)
    assert time_budget_factor(60.0, 110.0, 10.0) == pytest.approx(0.5)
    assert time_budget_factor(110.0, 110.0, 10.0) == pytest.approx(0.0)
    assert time_budget_factor(500.0, 110.0, 10.0) == pytest.approx(0.0)
    assert time_budget_factor(60.0, 110.0, 10.0, power=2.0) == pytest.approx(0.25)
    vals = [time_budget_factor(t, 110.0, 10.0) for t in np.linspace(0, 120, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # the loop takes the smaller of the iteration and time factors: a slow run still ends at ~0
    assert min(lr_factor(300, 3000, 100), time_budget_factor(109.0, 110.0, 10.0)) < 0.011


def test_cpu_allocator_tuning_applies_on_glibc():
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tune_cpu_allocator() is True
    else:
        assert tune_cpu_allocator() is False


def test_param_groups_head_lr_and_no_decay_on_norms():
    torch.manual_seed(0)
    net = SRMFNet("mit_b0", 3, text_bank=torch.randn(4, 8))
    groups = {g["name"]: g for g in param_groups(net, 6e-5, 0.01, 10.0)}
    assert set(groups) == {"backbone", "backbone-no_decay", "head", "head-no_decay"}
    assert groups["head"]["lr"] == pytest.approx(6e-4) and groups["backbone"]["lr"] == pytest.approx(6e-5)
    assert groups["head-no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 0.01
    ids = {id(p): name for name, p in net.named_parameters()}
    nd = {ids[id(p)] for p in groups["backbone-no_decay"]["params"]}
    assert any("norm" in n for n in nd)  # LayerNorms of MiT (smp's MiT has no pos_block)
    assert not any(n.endswith("attn.q.weight") for n in nd)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(net.parameters()))


def test_checkpoint_round_trip_is_exact_and_not_a_pickle(tmp_path):
    torch.manual_seed(0)
    net = SRMFNet("efficientnet_lite0", 3, text_bank=torch.randn(4, 8))
    opt = torch.optim.AdamW(param_groups(net, 1e-3, 0.01, 10.0))
    x = torch.randn(2, 3, 64, 64)
    net(x).mean().backward()
    opt.step()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, net, opt, {"iteration": 7, "history": [{"iteration": 7, "loss": 1.5}]})
    assert path.read_bytes()[:1] != b"\x80"
    torch.manual_seed(1)
    net2 = SRMFNet("efficientnet_lite0", 3, text_bank=torch.randn(4, 8))
    opt2 = torch.optim.AdamW(param_groups(net2, 1e-3, 0.01, 10.0))
    state = load_checkpoint(path, net2, opt2)
    assert state["iteration"] == 7
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))


def test_confusion_and_iou():
    ref = np.array([0, 0, 1, 1, 2, 255], dtype=np.uint8)
    pred = np.array([0, 1, 1, 1, 0, 2], dtype=np.uint8)
    cm = confusion(pred, ref, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou = iou_from_confusion(cm)
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3) and iou[2] == 0.0
