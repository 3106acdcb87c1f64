"""The .srmf model file: round trip, header, and refusal of corrupt, truncated, foreign and pickle files."""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, engine_env, make_random_model
from core.errors import ModelFileError
from core.model.modelfile import FORMAT, describe, load_model, read_header, save_model


def test_round_trip_keeps_weights_header_and_text_bank(tmp_path):
    path = make_random_model(tmp_path / "m.srmf", n_concepts=7, dim=16)
    header = read_header(path)
    assert header["format"] == FORMAT and header["format_version"] == 1
    assert [c["name"] for c in header["classes"]] == ["building", "land", "road", "vegetation", "water"]
    assert all(c["colour"].startswith("#") and c["prompt"] for c in header["classes"])
    assert header["input"]["bands"] == ["red", "green", "blue"] and len(header["input"]["mean"]) == 3
    assert header["inference"] == {"window": 512, "stride": 341}
    assert "created" in header["provenance"]
    lm = load_model(path)
    assert lm.model.training is False and lm.untrained
    bank = lm.model.head.text_bank
    assert bank.shape == (7, 16) and len(header["text_bank"]["prompts"]) == 7
    assert torch.allclose(bank.norm(dim=1), torch.ones(7), atol=1e-6)
    # saving what was loaded gives back the same tensors
    again = save_model(tmp_path / "again.srmf", lm.model, {k: v for k, v in header.items() if k not in ("format", "format_version")})
    sd1, sd2 = lm.model.state_dict(), load_model(again).model.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert "text_bank" not in dict(lm.model.named_parameters()) and "head.text_bank" in sd1
    assert "UNTRAINED" in describe(header)


def test_plain_segformer_variant_round_trips(tmp_path):
    path = make_random_model(tmp_path / "plain.srmf", text_fusion=False)
    lm = load_model(path)
    assert lm.header["architecture"]["name"] == "segformer" and lm.model.head.text_bank is None


def test_lite2_model_round_trips_and_lite0_weights_do_not_pass_for_it(tmp_path):
    path = make_random_model(tmp_path / "lite2.srmf", backbone="efficientnet_lite2")
    lm = load_model(path)
    assert lm.header["architecture"]["backbone"] == "efficientnet_lite2"
    assert list(lm.model.encoder.out_channels[-4:]) == [24, 48, 120, 352]
    lite0 = make_random_model(tmp_path / "lite0.srmf")
    header = read_header(lite0)
    forged = tmp_path / "forged.srmf"  # Lite0 weights under a header that says Lite2
    save_model(forged, load_model(lite0).model, {**{k: v for k, v in header.items()
                                                     if k not in ("format", "format_version")},
                                                  "architecture": {**header["architecture"],
                                                                   "backbone": "efficientnet_lite2"}})
    _expect_error(forged, "efficientnet_lite2")


def _expect_error(path, *words):
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg or path.name in msg
    for w in words:
        assert w in msg.lower()
    return msg


def test_truncated_file_is_refused(tmp_path, random_model):
    data = random_model.read_bytes()
    for cut in (len(data) - 1000, 100, 5, 0):
        bad = tmp_path / f"cut{cut}.srmf"
        bad.write_bytes(data[:cut])
        _expect_error(bad)


def test_corrupt_header_is_refused(tmp_path, random_model):
    data = bytearray(random_model.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n // 2] = ord("\x01")  # a control byte inside the JSON header
    bad = tmp_path / "corrupt.srmf"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "corrupt")
    (tmp_path / "text.srmf").write_text("this is not a model at all, just text, long enough to have 8 bytes")
    _expect_error(tmp_path / "text.srmf", "not an srmf model")


def test_pickles_are_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    plain = tmp_path / "plain_pickle.srmf"
    plain.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    _expect_error(plain, "pickle")
    zipped = tmp_path / "torch_save.srmf"
    torch.save({"weight": torch.zeros(3)}, zipped)
    _expect_error(zipped, "torch.save")
    assert not marker.exists()


def test_foreign_safetensors_is_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(4)}, str(foreign), metadata={"format": "pt"})
    _expect_error(foreign, "not an srmf model")


def test_weights_that_do_not_fit_the_header_are_refused(tmp_path, random_model):
    header = read_header(random_model)
    header["architecture"]["backbone"] = "mit_b0"  # lite0 weights under a MiT header
    from safetensors.torch import load_file

    state = load_file(str(random_model))
    bad = tmp_path / "mismatch.srmf"
    save_file(state, str(bad), metadata={"srmf": json.dumps(header)})
    _expect_error(bad, "do not fit")


def test_missing_model_file(tmp_path):
    _expect_error(tmp_path / "nope.srmf", "not found")


def test_info_command_prints_the_header(random_model):
    run = subprocess.run([sys.executable, "-m", "core", "info", str(random_model), "--json"], cwd=ROOT,
                         env=engine_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    msg = json.loads(run.stdout.strip().splitlines()[-1])
    assert msg["type"] == "result" and msg["header"]["architecture"]["backbone"] == "efficientnet_lite0"
    # the QGIS modelinfo algorithm logs this description instead of keeping its own copy
    assert msg["description"].startswith(f"Model: {random_model}") and "building" in msg["description"]
    text = subprocess.run([sys.executable, "-m", "core", "info", str(random_model)], cwd=ROOT, env=engine_env(),
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "building" in text.stdout and "efficientnet_lite0" in text.stdout


def test_a_header_length_that_looks_like_a_pickle_opcode_is_still_a_model(tmp_path, random_model):
    """Regression: a safetensors header length whose first byte is 0x80 (a pickle opcode) was refused."""
    from safetensors.torch import load_file

    header = read_header(random_model)
    state = load_file(str(random_model))
    for pad in range(300):  # safetensors pads the header to 8 bytes: n mod 256 takes 32 values
        header["provenance"]["note"] = "x" * pad
        path = tmp_path / f"pad{pad}.srmf"
        save_file(state, str(path), metadata={"srmf": json.dumps(header)})
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert load_model(path).num_classes == 5


def test_info_does_not_import_torch(random_model):
    code = ("import sys; from core.cli import main; rc = main(['info', sys.argv[1], '--json']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    run = subprocess.run([sys.executable, "-c", code, str(random_model)], cwd=ROOT, env=engine_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == "NO-TORCH 0", run.stdout + run.stderr


def test_saved_model_is_readable_by_others_like_any_file(tmp_path):
    """The model file gets the mode a plain open() gives (0o666 less the umask), not mkstemp's or
    safetensors' 0o600: a model saved for colleagues on a shared drive must be readable by them."""
    import os
    import stat

    from core.files import default_file_mode

    path = make_random_model(tmp_path / "shared.srmf", n_concepts=3, dim=8)
    assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()
