"""The plugin's pure-Python parts: the class table, the interpreter choice, partial-file clean-up,
messages. Fast; no engine run."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from qgis.core import QgsSettings

from srmf_qgis import classtable, runtime
from srmf_qgis.classtable import ClassEntry, ClassTableError


def test_class_table_validation_messages():
    classtable.validate([ClassEntry("a", "#112233", "", 5), ClassEntry("b", "", "", None)])
    with pytest.raises(ClassTableError, match="empty"):
        classtable.validate([])
    with pytest.raises(ClassTableError, match="Row 2 .*no class name"):
        classtable.validate([ClassEntry("a"), ClassEntry(" ")])
    with pytest.raises(ClassTableError, match="appears twice"):
        classtable.validate([ClassEntry("Water"), ClassEntry("water")])
    with pytest.raises(ClassTableError, match="#RRGGBB"):
        classtable.validate([ClassEntry("a", "blue")])
    # a blank label value stands for the row's position: row 2 (index 1) clashes with an explicit 1
    with pytest.raises(ClassTableError, match="position"):
        classtable.validate([ClassEntry("a", value=1), ClassEntry("b")])
    with pytest.raises(ClassTableError, match="no label value"):
        classtable.validate([ClassEntry("a")], need_values=True)


def test_class_table_matrix_and_json_round_trip(tmp_path):
    entries = [ClassEntry("building", "#3C1098", "A satellite image of building", 0, "building"),
               ClassEntry("bare soil", "#C08040", "", 1, "land"),
               ClassEntry("greenhouse", "", "", "gh", None)]
    assert classtable.from_matrix(classtable.to_matrix(entries)) == entries
    four = classtable.to_matrix(entries, 4)
    assert len(four) == 12 and [e.source for e in classtable.from_matrix(four, 4)] == [None] * 3
    with pytest.raises(ClassTableError, match="5 columns"):
        classtable.from_matrix(["a", "b", "c"])
    path = classtable.write_json(entries, tmp_path / "classes.json")
    data = json.loads(path.read_text())["classes"]
    assert data[1] == {"name": "bare soil", "colour": "#C08040", "prompt": "A satellite image of bare soil",
                       "value": 1, "from": "land"}
    assert data[2]["colour"].startswith("#") and data[2]["colour"] not in ("#3C1098", "#C08040")
    back = classtable.read_json(path)
    assert [(e.name, e.value, e.source) for e in back] == [("building", 0, "building"), ("bare soil", 1, "land"),
                                                           ("greenhouse", "gh", None)]
    assert classtable.coerce_value("3") == 3 and classtable.coerce_value("3", numeric=False) == "3"
    assert classtable.coerce_value("yes") == "yes" and classtable.coerce_value(" ") is None
    with pytest.raises(ClassTableError):
        classtable.coerce_value("yes", numeric=True)


def test_interpreter_choice_order(tmp_path, monkeypatch):
    settings = QgsSettings()
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SRMF_PYTHON", str(fake))
    assert runtime.resolve_python() == runtime.Interpreter(str(fake), "SRMF_PYTHON")
    settings.setValue("srmf/python", "/usr/bin/python3")
    try:
        assert runtime.resolve_python() == runtime.Interpreter("/usr/bin/python3", "SRMF settings")
        settings.setValue("srmf/python", str(tmp_path / "missing"))
        with pytest.raises(runtime.EngineNotConfigured, match="does not exist.*Install dependencies"):
            runtime.resolve_python()
    finally:
        settings.remove("srmf/python")
    monkeypatch.delenv("SRMF_PYTHON")
    home = tmp_path / "home"
    monkeypatch.setenv("SRMF_HOME", str(home))
    venv_py = runtime.venv_python(runtime.managed_venv_dir())
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text("")
    assert runtime.resolve_python().source == "managed environment"
    venv_py.unlink()
    # then the plugin folder's .venv (this checkout has one)
    assert runtime.resolve_python() == runtime.Interpreter(str(runtime.venv_python(runtime.PLUGIN_DIR / ".venv")),
                                                           "the plugin folder's .venv")


def test_model_classes_are_read_without_the_engine(tmp_path):
    """Dialogs list a model's classes from its JSON header at once (no engine, no torch)."""
    from srmf_qgis.modelheader import read_header

    header = read_header(runtime.DEFAULT_MODEL)
    assert [c["name"] for c in header["classes"]] == ["building", "land", "road", "vegetation", "water"]
    bad = tmp_path / "bad.srmf"
    bad.write_bytes(b"\x80\x04\x95 not a model")
    with pytest.raises(ValueError):
        read_header(bad)


def test_remove_partials_only_touches_this_jobs_temporary_files(tmp_path):
    out = tmp_path / "classes.tif"
    old = tmp_path / ".classes.abc.partial.tif"
    old.write_text("old")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    started = time.time()
    new = tmp_path / ".classes.xyz.partial.tif"
    new.write_text("new")
    other = tmp_path / ".other.q.partial.tif"
    other.write_text("x")
    keep = tmp_path / "classes.qml"
    keep.write_text("x")
    assert runtime.remove_partials([str(out)], started) == [str(new)]
    assert old.exists() and other.exists() and keep.exists() and not new.exists()


def test_messages_for_the_analyst():
    assert "lacks the module 'torch'" in runtime._explain_crash("/x/python", 1, "ModuleNotFoundError: No module named 'torch'")
    assert "SIGKILL" in runtime._explain_crash("/x/python", -signal.SIGKILL, "") and "memory" in runtime._explain_crash(
        "/x/python", -signal.SIGKILL, "")
    assert runtime.format_metrics({"iteration": 40, "loss": 0.51234, "lr": 6e-5}) == \
        "Iteration 40: training loss 0.5123, learning rate 6.00e-05"
    line = runtime.format_metrics({"iteration": 200, "miou": 0.5, "per_class_iou": {"a": 0.25, "b": None}})
    assert line == "Validation at iteration 200: mIoU 0.500 (a 0.250, b n/a)"
    assert runtime.command_line(["/p y/python", "-m", "core", "info"]).endswith("'/p y/python' -m core info")


def test_worker_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONHOME", "/opt/qgis/apps/Python39")
    monkeypatch.setenv("PYTHONPATH", "/opt/qgis/python")
    own = runtime.engine_env(runtime.qgis_python())
    assert own["PYTHONPATH"].split(os.pathsep)[0] == str(runtime.PLUGIN_DIR)
    assert "/opt/qgis/python" in own["PYTHONPATH"] and own["PYTHONHOME"] == "/opt/qgis/apps/Python39"
    foreign = runtime.engine_env(str(tmp_path / "conda" / "bin" / "python"))  # another Python: QGIS's paths break it
    assert foreign["PYTHONPATH"] == str(runtime.PLUGIN_DIR) and "PYTHONHOME" not in foreign
    assert foreign["PYTHONUNBUFFERED"] == "1"


def test_remove_partials_removes_every_temporary_file_the_engine_names(tmp_path):
    """The partial-file contract: core.files (the engine's one writer of temporary outputs) and
    runtime.remove_partials (what the plugin removes after killing a worker) agree on the names."""
    from core.files import atomic_output, partial_path  # stdlib only: no torch in QGIS's process

    started = time.time()
    outputs = [tmp_path / n for n in ("classes.tif", "candidates.gpkg", "tuned.srmf", "report.csv", "r.json")]
    temps = [partial_path(o) for o in outputs]
    assert all(t.exists() and t.parent == tmp_path for t in temps)
    assert sorted(runtime.remove_partials([str(o) for o in outputs], started)) == sorted(map(str, temps))
    assert not any(t.exists() for t in temps)
    # an interrupted write leaves nothing and keeps the earlier file
    keep = tmp_path / "classes.tif"
    keep.write_text("earlier result")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(keep) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert keep.read_text() == "earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif"]
