"""``python -m core segment`` as a user runs it: JSON protocol, bad input, cancel, nothing left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ADELAIDE, ATLANTA, OSBS, ROOT, engine_env


def run_core(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=ROOT, env=engine_env(),
                          capture_output=True, text=True, timeout=timeout)


def json_lines(stdout: str):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def test_segment_json_protocol_and_result(tmp_path, random_model):
    out = tmp_path / "osbs_classes.tif"
    run = run_core("segment", OSBS, out, "--model", random_model, "--window", 256, "--stride", 171,
                   "--device", "cpu", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    msgs = json_lines(run.stdout)
    types = [m["type"] for m in msgs]
    assert types[-1] == "result" and "progress" in types and "log" in types
    progress = [m["percent"] for m in msgs if m["type"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert any(m["type"] == "log" and m["level"] == "warning" and "UNTRAINED" in m["message"] for m in msgs)
    res = msgs[-1]
    assert res["output"] == str(out) and res["crs"] == "EPSG:32617" and res["width"] == 400
    areas = {a["name"]: a for a in res["class_areas"]}
    assert sum(a["pixels"] for a in areas.values()) + res["nodata_pixels"] == 400 * 400
    assert all(a["area_m2"] == pytest.approx(a["pixels"] * 0.01) for a in areas.values())  # 10 cm pixels
    assert out.exists()


def test_terminal_mode_prints_a_table(tmp_path, random_model):
    run = run_core("segment", ATLANTA, tmp_path / "a.tif", "--model", random_model, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "area (ha)" in run.stdout and "UNTRAINED" in run.stdout
    assert "scaling: band 1 (UInt16)" in run.stderr


def _bad(tmp_path, expect_words, *args, out_name="out.tif"):
    run = run_core("segment", *args, "--json")
    assert run.returncode != 0
    msgs = json_lines(run.stdout)
    err = [m for m in msgs if m["type"] == "error"]
    assert len(err) == 1, run.stdout + run.stderr
    for w in expect_words:
        assert w.lower() in err[0]["message"].lower(), err[0]["message"]
    return run, err[0]


def test_missing_input(tmp_path, random_model):
    run, err = _bad(tmp_path, ["not found", "missing.tif"], tmp_path / "missing.tif", tmp_path / "out.tif",
                    "--model", random_model)
    assert run.returncode == 2 and leftovers(tmp_path) == []


def test_input_that_is_not_a_raster(tmp_path, random_model):
    txt = tmp_path / "notes.tif"
    txt.write_text("not a raster\n" * 10)
    _bad(tmp_path, ["notes.tif", "not a raster"], txt, tmp_path / "out.tif", "--model", random_model)
    assert leftovers(tmp_path) == ["notes.tif"]


def test_too_few_bands_for_bands(tmp_path, random_model):
    _bad(tmp_path, ["--bands", "band 4", "3 bands"], ADELAIDE, tmp_path / "out.tif", "--model", random_model,
         "--bands", "1,2,4")
    _bad(tmp_path, ["--bands", "band 2", "1 band"], ATLANTA, tmp_path / "out.tif", "--model", random_model,
         "--bands", "1,2,3")
    assert leftovers(tmp_path) == []


def test_unwritable_output_folder(tmp_path, random_model):
    if os.geteuid() == 0:
        folder = Path("/sys")  # read-only for everybody, root included
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    _bad(tmp_path, ["not writable", str(folder)], ADELAIDE, folder / "out.tif", "--model", random_model)
    assert not (folder / "out.tif").exists()
    _bad(tmp_path, ["does not exist"], ADELAIDE, tmp_path / "no" / "such" / "out.tif", "--model", random_model)


def test_existing_output_needs_overwrite(tmp_path, random_model):
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    _bad(tmp_path, ["exists", "--overwrite"], ADELAIDE, out, "--model", random_model)
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == ["out.tif"]


def test_corrupt_truncated_and_pickle_models(tmp_path, random_model):
    data = random_model.read_bytes()
    trunc = tmp_path / "trunc.srmf"
    trunc.write_bytes(data[: len(data) // 2])
    _bad(tmp_path, ["trunc.srmf", "truncated"], ADELAIDE, tmp_path / "out.tif", "--model", trunc)
    corrupt = tmp_path / "corrupt.srmf"
    corrupt.write_bytes(b"\x00" * 64 + data[64:])
    _bad(tmp_path, ["corrupt.srmf"], ADELAIDE, tmp_path / "out.tif", "--model", corrupt)
    import pickle

    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    _bad(tmp_path, ["model.pkl", "pickle"], ADELAIDE, tmp_path / "out.tif", "--model", pkl)
    assert leftovers(tmp_path) == ["corrupt.srmf", "model.pkl", "trunc.srmf"]


@pytest.mark.parametrize("args,words", [
    (["--window", "100"], ["--window", "multiple of 32"]),
    (["--window", "0"], ["--window"]),
    (["--window", "abc"], ["--window", "abc"]),
    (["--stride", "0"], ["--stride"]),
    (["--stride", "600", "--window", "512"], ["--stride", "between 1 and the window"]),
    (["--device", "gpu7"], ["--device"]),
    (["--batch-size", "0"], ["--batch-size"]),
])
def test_invalid_parameters(tmp_path, random_model, args, words):
    run, _ = _bad(tmp_path, words, ADELAIDE, tmp_path / "out.tif", "--model", random_model, *args)
    assert run.returncode == 2 and leftovers(tmp_path) == []


def test_cancel_terminates_and_leaves_nothing(tmp_path, random_model):
    out = tmp_path / "out.tif"
    proc = subprocess.Popen([sys.executable, "-m", "core", "segment", str(ADELAIDE), str(out), "--model",
                             str(random_model), "--window", "128", "--stride", "64", "--batch-size", "1",
                             "--device", "cpu", "--probabilities", str(tmp_path / "p.tif"), "--json"],
                            cwd=ROOT, env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saw_progress = False
    deadline = time.time() + 120
    for line in proc.stdout:
        if json.loads(line)["type"] == "progress":
            saw_progress = True
            break
        assert time.time() < deadline
    assert saw_progress
    assert any(p.name.endswith(".partial.tif") for p in tmp_path.iterdir())  # it was writing
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert json_lines(rest)[-1]["type"] == "error" and "cancel" in json_lines(rest)[-1]["message"]
    assert leftovers(tmp_path) == []
