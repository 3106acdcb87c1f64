"""How the network runs (core.execution, issue 11): bf16 detection, --precision, the guarded auto check,
the head-only bf16 scope, channels_last on real windows through the embedded default model, and the CPU
batch from the free memory."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from osgeo import gdal

from conftest import ADELAIDE, ROOT as REPO
from core import execution
from core.errors import InputError
from core.execution import (CPU_BATCH_MAX, FP32, GuardedRun, Precision, bf16_from_cpuinfo, cpu_batch_size,
                            precision_scope, resolve_precision)

CPU = torch.device("cpu")
BF16_HEAD = Precision("bf16", torch.bfloat16, True, "test", scope="head")


@pytest.fixture(scope="module")
def default_model_and_windows():
    """The embedded (trained) default model and two real 512² Adelaide windows, normalised, NCHW float32."""
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model

    lm = load_model(DEFAULT_MODEL_PATH, device="cpu")
    inp = lm.header["input"]
    a = gdal.Open(str(ADELAIDE)).ReadAsArray()[:3].astype(np.float32)
    a = (a - np.float32(inp["mean"])[:, None, None]) / np.float32(inp["std"])[:, None, None]
    x = torch.from_numpy(np.stack([a[:, :512, :512], a[:, 512:, 512:]]).copy())
    return lm, x


def test_bf16_flags_are_read_from_cpuinfo():
    assert bf16_from_cpuinfo("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n") == "AVX512-BF16"
    assert bf16_from_cpuinfo("flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n") == "AMX-BF16"
    assert bf16_from_cpuinfo("Features\t: fp asimd bf16 i8mm\n") == "ARM-BF16"
    assert bf16_from_cpuinfo("flags\t\t: fpu sse avx2 avx512f\n") is None


def test_precision_specs(monkeypatch):
    assert resolve_precision("fp32", CPU).dtype is None
    with pytest.raises(InputError, match="--precision"):
        resolve_precision("fp16", CPU)
    monkeypatch.setattr(execution, "cpu_bf16_support", lambda: None)
    assert resolve_precision("auto", CPU).name == "fp32"
    with pytest.raises(InputError, match="not run bf16 natively"):
        resolve_precision("bf16", CPU)
    monkeypatch.setattr(execution, "cpu_bf16_support", lambda: "AVX512-BF16")
    auto = resolve_precision("auto", CPU)
    assert (auto.name, auto.dtype, auto.guarded, auto.scope) == ("bf16", torch.bfloat16, True, "head")
    assert resolve_precision("bf16", CPU).guarded is False


def test_head_scope_runs_the_head_in_bf16_and_the_encoder_in_float32(default_model_and_windows):
    lm, x = default_model_and_windows
    model = lm.model.eval()
    seen = {}
    def note(key):
        def hook(module, inputs, output):
            seen[key] = (output[-1] if isinstance(output, (list, tuple)) else output).dtype
        return hook

    hooks = [model.encoder.register_forward_hook(note("encoder")),
             model.head.fusion.register_forward_hook(note("fused"))]
    try:
        with torch.inference_mode(), precision_scope(model, CPU, BF16_HEAD):
            logits = model(x[:1, :, :128, :128])
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"encoder": torch.float32, "fused": torch.bfloat16}
    assert model.head_autocast is None and logits.shape[1] == lm.num_classes


def test_guard_falls_back_to_float32_when_the_low_precision_disagrees():
    logs = []
    model = torch.nn.Identity()
    calls = {"n": 0}

    def fn():  # under autocast it "disagrees": bf16 is active only inside the guard's low-precision call
        calls["n"] += 1
        return torch.zeros(100) if torch.is_autocast_enabled("cpu") else torch.arange(100) % 3

    run = GuardedRun(model, CPU, Precision("bf16", torch.bfloat16, True, "test"), lambda t, lvl: logs.append(lvl))
    first = run(fn, lambda r: r)
    assert torch.equal(first, torch.arange(100) % 3)  # the first call returns float32's result
    assert run.precision.name == "fp32" and run.agreement < 0.5 and logs == ["warning"]
    run(fn, lambda r: r)
    assert calls["n"] == 3  # one low + one float32 for the check, then float32 only


def test_channels_last_and_auto_keep_the_classes_on_real_windows(default_model_and_windows):
    """fp32 through the WindowPredictor (channels_last) equals the NCHW network; auto's figure is reported."""
    from core.windows import WindowPredictor

    lm, x = default_model_and_windows
    with torch.inference_mode():
        ref = torch.nn.functional.interpolate(lm.model.eval()(x.contiguous()), size=(512, 512), mode="bilinear",
                                              align_corners=False)
    exact = WindowPredictor(lm.model, CPU, "fp32")(x)
    assert (exact - ref).abs().max() < 1e-3
    assert (exact.argmax(1) == ref.argmax(1)).float().mean() >= 0.9999
    if execution.cpu_bf16_support() is None:
        pytest.skip("this CPU has no native bf16: auto is float32")
    auto = WindowPredictor(lm.model, CPU, "auto")
    out = auto(x)
    assert torch.equal(out.argmax(1), exact.argmax(1))  # the guarded first batch is float32's
    assert auto.run.agreement is not None and auto.run.agreement >= 0.99
    out2 = auto(x)
    assert (out2.argmax(1) == exact.argmax(1)).float().mean() >= 0.99


def test_cpu_batch_from_free_memory(monkeypatch):
    lo, note = cpu_batch_size(512, "efficientnet_lite0", FP32, available=200 * 2 ** 20)
    assert lo == 1 and "memory is short" in note
    hi, note = cpu_batch_size(512, "efficientnet_lite0", FP32, available=64 * 2 ** 30)
    assert hi == CPU_BATCH_MAX and "memory is short" not in note
    assert cpu_batch_size(512, "efficientnet_lite0", FP32, available=None)[0] == CPU_BATCH_MAX
    monkeypatch.setattr(execution, "CPU_BATCH_MAX", 8)  # the memory rule itself, under a larger maximum
    assert cpu_batch_size(512, "efficientnet_lite0", FP32, available=4 * 420 * 2 ** 20)[0] == 4  # 105 MiB/window
    assert cpu_batch_size(512, "efficientnet_lite0", BF16_HEAD, available=4 * 420 * 2 ** 20)[0] == 8  # 50
    assert cpu_batch_size(1024, "mit_b5", FP32, available=4 * 2 * 2 ** 30)[0] == 1  # 4× the area, 3× the encoder


def test_segment_precision_is_checked_before_anything_is_opened(tmp_path):
    out = tmp_path / "classes.tif"
    proc = subprocess.run([sys.executable, "-m", "core", "segment", str(tmp_path / "missing.tif"), str(out),
                           "--precision", "fp16", "--json"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    err = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{") and '"error"' in ln]
    assert err and "--precision" in err[-1]["message"] and "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_segment_reports_its_precision_and_batch(tmp_path):
    from core.protocol import Reporter
    from core.segment.job import segment_raster

    res = segment_raster(ADELAIDE, tmp_path / "c.tif", precision="fp32", device="cpu",
                         reporter=Reporter(json_mode=True, stream=open(tmp_path / "log.jsonl", "w")))
    assert res["precision"] == "fp32" and res["precision_agreement"] is None
    assert 1 <= res["batch_size"] <= CPU_BATCH_MAX
    log = (tmp_path / "log.jsonl").read_text()
    assert "windows per batch: batch" in log and "float32 (asked for)" in log


def test_every_inference_command_takes_precision_and_refuses_a_bad_one(tmp_path):
    """segment, findclass, finetune and evaluate all accept --precision; a bad value exits 2 naming it."""
    from core.cli import build_parser

    for cmd, rest in (("segment", ["in.tif", "out.tif"]), ("findclass", ["in.tif", "ex.gpkg", "out"]),
                      ("finetune", ["m.srmf"]), ("evaluate", ["p.tif", "r.tif"])):
        assert build_parser(cmd).parse_args([cmd, *rest, "--precision", "fp32"]).precision == "fp32"
    out = tmp_path / "o.tif"
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", str(ADELAIDE), str(ADELAIDE), "--model",
                           "resources/models/default.srmf", "--precision", "half", "--output-json", str(out),
                           "--json"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--precision" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()
