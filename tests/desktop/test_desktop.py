"""The plugin in the real QGIS desktop application (``qgis`` on Xvfb), driven as an analyst drives it.

One QGIS run (``driver.py`` passed to ``qgis --code``) does every flow on copies of the real rasters
of ``../shared/data``: right-click ▸ *Segment with SRMF* on adelaide_2.tif, the same on OSBS_029.tif
while the first runs, a third run cancelled from the task manager, *Segment with SRMF…* (the
Processing dialog) run on OSBS_029.tif, and *Raster ▸ SRMF ▸ Fine-tune model…* on a real Dubai tile
followed by *Segment with the new model*; then it saves the project. A second QGIS run reopens that
project. The tests below check the report and what was on screen: the map canvas saved to PNG,
mapped pixel by pixel onto the class raster, must show each class in the model's colour (and not
grey), the legend patches must carry the class colours, and the message bar must say what was done.
Screenshots stay in tests/artifacts/desktop/. ``make test-desktop``.
"""
from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qgis"))

from desktop_helpers import (DATA, ROOT, VENV_PYTHON, compare_canvas, model_classes, run_qgis,  # noqa: E402
                             make_profile)

ADELAIDE = DATA / "openearthmap_adelaide" / "adelaide_2.tif"
OSBS = DATA / "deepforest_neon_osbs" / "OSBS_029.tif"
DUBAI_IMAGE = DATA / "dubai_hitl_aerial" / "tile_1" / "images" / "image_part_001.jpg"
DEFAULT_MODEL = ROOT / "resources" / "models" / "default.srmf"
ARTIFACTS = ROOT / "tests" / "artifacts" / "desktop"
# The analyst's own colours in the fine-tune dialog (the Dubai label values 0..4), unlike the default model's.
FINETUNE_CLASSES = [{"name": "building", "colour": "#D0021B", "value": 0},
                    {"name": "bare land", "colour": "#F5A623", "value": 1},
                    {"name": "road", "colour": "#DE597F", "value": 2},
                    {"name": "vegetation", "colour": "#417505", "value": 3},
                    {"name": "water", "colour": "#50E3C2", "value": 4}]
FLOWS_TIMEOUT = 1500   # s, the whole first QGIS run (typically 2-3 min on 2 cores)
REOPEN_TIMEOUT = 300
SUCCESS, INFO = 3, 0   # Qgis.MessageLevel


def check_prerequisites():
    missing = [p for p in (ADELAIDE, OSBS, DUBAI_IMAGE, DEFAULT_MODEL, VENV_PYTHON) if not p.exists()]
    if missing:
        raise pytest.UsageError(f"the desktop tests need {missing} (../shared/data, make default-model, make venv)")
    if shutil.which("qgis") is None or shutil.which("xvfb-run") is None:
        raise pytest.UsageError("the desktop tests need the Debian packages qgis and xvfb (make apt)")


@pytest.fixture(scope="module")
def desktop(tmp_path_factory):
    """Both QGIS runs; returns their reports and the paths they used."""
    from srmf_qgis_testing import dubai_label_raster

    check_prerequisites()
    base = tmp_path_factory.mktemp("desktop")
    work = base / "work"
    work.mkdir()
    for src in (ADELAIDE, OSBS, DUBAI_IMAGE):  # one-click results are written beside the input
        shutil.copy(src, work / src.name)
    labels = dubai_label_raster(work / "image_part_001_labels.tif")
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    profiles = make_profile(base / "qgis-profiles")
    home = base / "home"
    home.mkdir()
    project = str(work / "srmf_desktop.qgz")
    config = {"mode": "flows", "out": str(ARTIFACTS), "work": str(work), "timeout": FLOWS_TIMEOUT - 60,
              "job_timeout": 600, "finetune_timeout": 900, "project": project,
              "adelaide": str(work / ADELAIDE.name), "osbs": str(work / OSBS.name),
              "finetune": {"image": str(work / DUBAI_IMAGE.name), "labels": str(labels), "iterations": 2,
                           "model": str(work / "dubai_finetuned.srmf"), "classes": FINETUNE_CLASSES}}
    flows = run_qgis(config, base / "flows.json", profiles, home, ARTIFACTS / "qgis_flows.log", FLOWS_TIMEOUT)
    reopen = None
    if flows.get("project_saved"):
        rconfig = dict(config, mode="reopen", timeout=REOPEN_TIMEOUT - 60,
                       reopen_raster=str(work / "adelaide_2_srmf_classes.tif"))
        reopen = run_qgis(rconfig, base / "reopen.json", profiles, home, ARTIFACTS / "qgis_reopen.log",
                          REOPEN_TIMEOUT, project=project)
    return {"flows": flows, "reopen": reopen, "work": work, "config": config}


def flow(desktop, name) -> dict:
    rep = desktop["flows"]
    errors = [e for e in rep["errors"] if e.startswith(name + ":") or e.startswith("driver:") or "watchdog" in e]
    assert not errors, "\n".join(errors)
    assert name in rep["flows"], f"the flow {name} did not run; errors: {rep['errors']}"
    return rep["flows"][name]


# -- the checks on what QGIS shows ----------------------------------------------------------------------
def assert_styled(layer: dict, classes: list, what: str):
    """What the analyst sees: the map canvas in the class colours (see below), the legend patches in the
    Layers panel in the same colours, and a paletted renderer holding the model's class table."""
    assert layer["valid"], f"{what}: the layer is not valid"
    assert_canvas_in_class_colours(layer, classes, what)
    names = {c["name"] for c in classes}
    patches = [(p["label"], p["patch"]) for p in layer["legend"] if p["label"] in names]
    assert patches == [(c["name"], c["colour"]) for c in classes], \
        f"{what}: legend patches {patches}, the model's classes {[(c['name'], c['colour']) for c in classes]}"
    assert layer["renderer"] == "paletted", f"{what}: renderer {layer['renderer']}"
    got = [(c["value"], c["label"], c["colour"]) for c in layer["classes"]]
    want = [(c["id"], c["name"], c["colour"]) for c in classes]
    assert got == want, f"{what}: renderer classes {got}, the model's are {want}"


def assert_canvas_in_class_colours(layer: dict, classes: list, what: str, min_pixels: int = 5000):
    """The saved map canvas, mapped onto the class raster: every class drawn in its colour, no grey."""
    shot = layer["shot"]
    assert shot["world_file"], f"{what}: the canvas screenshot has no world file"
    cmp = compare_canvas(shot, layer["source"], classes)
    summary = ", ".join(f"{n}: {cmp['matching'].get(n, 0)}/{k} in "
                        f"{next(c['colour'] for c in classes if c['name'] == n)}" for n, k in cmp["compared"].items())
    detail = (f"{what} ({Path(shot['png']).name}): grey #808080 on {100 * cmp['grey_share']:.1f} % of the layer's "
              f"{cmp['canvas_px_on_layer']} canvas pixels; class-colour matches per class: {summary}")
    total = sum(cmp["compared"].values())
    assert total >= min_pixels, f"{detail} — only {total} canvas pixels could be compared"
    assert cmp["grey_share"] < 0.005, detail
    for name, n in cmp["compared"].items():
        if n >= 50:
            assert cmp["matching"][name] / n >= 0.97, detail
    for name, share in cmp["class_share"].items():  # every class that covers 1 % of the raster was seen
        if share >= 0.01:
            assert cmp["compared"].get(name, 0) >= 50, f"{detail} — class {name} ({100 * share:.1f} %) not compared"
    return cmp


def qml_colours(raster: Path) -> list:
    root = ET.parse(raster.with_suffix(".qml")).getroot()
    return [(int(e.get("value")), e.get("label"), e.get("color").upper()) for e in root.iter("paletteEntry")]


def messages(desktop, run="flows"):
    return desktop[run]["messages"]


# -- the tests --------------------------------------------------------------------------------------------
def test_qgis_desktop_loads_the_plugin_from_the_checkout_and_exits_cleanly(desktop):
    for run in ("flows", "reopen"):
        rep = desktop[run]
        assert rep is not None, f"the {run} run did not happen (the project was not saved: {desktop['flows']['errors']})"
        assert rep["plugin"]["active"], f"{run}: SRMF is not among the active plugins"
        assert Path(rep["plugin"]["module"]).resolve().is_relative_to(ROOT.resolve())  # this checkout, linked
        assert rep["plugin"]["qgis"].startswith("3."), rep["plugin"]
        assert rep["complete"], f"{run}: the driver did not finish: {rep['errors']}"
        assert rep["errors"] == [], "\n".join(rep["errors"])
        assert rep["srmf_tasks_left"] == [], f"{run}: tasks still running at exit: {rep['srmf_tasks_left']}"
        assert rep["_rc"] == 0, f"{run}: QGIS exited with {rep['_rc']}\n{rep['_log_tail']}"
        assert rep["_leftover_processes"] == [], f"{run}: processes left after QGIS exited"
    assert desktop["flows"]["project_saved"]


def test_one_click_segment_paints_the_model_colours_on_the_map_and_in_the_legend(desktop):
    rec = flow(desktop, "one_click")
    assert rec["menu"]["is_plugin_action"], rec["menu"]
    assert "Segment with SRMF" in rec["menu"]["entries"] and "Fine-tune SRMF on this layer\u2026" in rec["menu"]["entries"]
    assert rec["ok"], rec["error"]
    out = desktop["work"] / "adelaide_2_srmf_classes.tif"
    assert rec["output"] == str(out) and out.exists()
    assert Path(rec["model"]).resolve() == DEFAULT_MODEL.resolve()
    classes = model_classes(DEFAULT_MODEL)
    layer = rec["layer"]
    assert layer["name"] == "adelaide_2 \u2014 SRMF classes" and layer["source"] == str(out)
    assert layer["crs"] == "EPSG:4326"
    assert_styled(layer, classes, "one-click adelaide_2")
    assert qml_colours(out) == [(c["id"], c["name"], c["colour"]) for c in classes]  # the style beside the file
    # the message bar: what is happening, then what was done (the area of each class)
    texts = [(m["level"], m["text"]) for m in messages(desktop)]
    assert (INFO, "Segmenting 'adelaide_2' with the default model \u2014 progress in the task manager "
                  "(bottom right).") in texts, texts
    done = [t for lvl, t in texts if lvl == SUCCESS and t.startswith(f"Segmented into {out}: ")]
    assert len(done) == 1, texts
    for a in rec["class_areas"]:  # EPSG:4326: shares in %, no hectares
        assert f"{a['name']} " in done[0]
    assert Path(rec["window_png"]).exists()


def test_segmenting_a_second_layer_while_the_first_runs(desktop):
    rec = flow(desktop, "second_layer")
    assert rec["first_still_running_when_second_started"], "the first task had ended before the second started"
    listed = [d for d, _status in rec["tasks_listed"]]
    assert "SRMF: segmenting adelaide_2" in listed and "SRMF: segmenting OSBS_029" in listed, listed
    if rec["thread_pool_size"] >= 2:  # one thread (a 1-core machine): the second waits in the queue
        assert rec["max_running_at_once"] == 2, "the two tasks never ran at the same time"
    assert rec["ok"], rec["error"]
    out = desktop["work"] / "OSBS_029_srmf_classes.tif"
    assert rec["output"] == str(out) and out.exists()
    classes = model_classes(DEFAULT_MODEL)
    layer = rec["layer"]
    assert layer["name"] == "OSBS_029 \u2014 SRMF classes" and layer["crs"] == "EPSG:32617"
    assert_styled(layer, classes, "one-click OSBS_029 (second layer)")
    done = [m["text"] for m in messages(desktop) if m["level"] == SUCCESS and m["text"].startswith(f"Segmented into {out}")]
    assert len(done) == 1 and " ha" in done[0], done  # a projected CRS: areas in hectares


def test_cancel_from_the_task_manager_leaves_no_file_and_no_layer(desktop):
    rec = flow(desktop, "cancel")
    assert not rec["done_before_cancel"], "the task ended before it could be cancelled"
    assert rec["task_found_in_task_manager"] == 1
    assert rec["progress_at_cancel"] < 100
    assert not rec["ok"] and "ancel" in rec["error"], rec["error"]
    assert rec["worker_pid"] and not rec["worker_alive_after"], "the engine's worker outlived the cancel"
    planned = Path(rec["output_planned"]).name
    assert planned == "adelaide_2_srmf_classes_2.tif"
    new = sorted(set(rec["files_after"]) - set(rec["files_before"]))
    unexpected = [n for n in new if not (n.endswith(".aux.xml") and n[:-len(".aux.xml")] in rec["files_before"])]
    assert unexpected == [], f"files left by the cancelled run: {unexpected}"
    assert not (desktop["work"] / planned).exists()
    assert rec["layers_after"] == rec["layers_before"], "a layer was added by the cancelled run"
    said = [m["text"] for m in messages(desktop) if "cancelled" in m["text"]]
    assert said == ["Segmentation of 'adelaide_2' cancelled; nothing was written."], said


def test_processing_dialog_from_the_context_menu_runs_and_loads_a_styled_layer(desktop):
    rec = flow(desktop, "processing_dialog")
    assert rec["menu"]["is_plugin_action"] and rec["algorithm"] == "srmf:segment"
    assert rec["input_filled_in"], "the dialog did not have the layer filled in"
    assert rec["ok"], rec["log"]
    out = desktop["work"] / "osbs_from_dialog.tif"
    assert rec["results_output"] == str(out) and out.exists()
    assert rec["layers_with_output"] == 1
    classes = model_classes(DEFAULT_MODEL)
    layer = rec["layer"]
    assert layer["name"] == "OSBS_029 \u2014 SRMF classes"
    assert_styled(layer, classes, "Processing dialog OSBS_029")
    assert "Classes of osbs_from_dialog.tif" in rec["log"], rec["log"]


def test_finetune_dialog_from_the_menu_then_segment_with_the_new_model(desktop):
    rec = flow(desktop, "finetune_dialog")
    assert rec["menu"]["is_plugin_action"] and "Fine-tune model\u2026" in rec["menu"]["entries"]
    assert rec["title"] == "Fine-tune SRMF"
    assert rec["base_classes"] == [c["name"] for c in model_classes(DEFAULT_MODEL)]
    assert rec["train_ok"], rec["train_error"]
    model = Path(desktop["config"]["finetune"]["model"])
    assert rec["model"] == str(model) and model.exists()
    classes = model_classes(model)
    assert [(c["name"], c["colour"]) for c in classes] == [(c["name"], c["colour"]) for c in FINETUNE_CLASSES]
    assert rec["iou_rows"] and set(rec["iou_rows"]) <= {c["name"] for c in classes}
    assert "mIoU" in rec["iou_label"] and "Fine-tuned model saved" in rec["dialog_message"]
    assert rec["segment_button_enabled"]
    assert rec["ok"], rec["error"]
    assert rec["model_used"] == str(model)
    layer = rec["layer"]
    assert layer["name"] == "dubai tile_1 part 1 \u2014 SRMF classes"
    assert_styled(layer, classes, "segment with the fine-tuned model")


def test_reopened_project_keeps_the_class_colours(desktop):
    rep = desktop["reopen"]
    assert rep is not None, "the project was not saved"
    assert rep["errors"] == [], "\n".join(rep["errors"])
    rec = rep["flows"]["reopen"]
    work = desktop["work"]
    default = model_classes(DEFAULT_MODEL)
    expected = {str(work / "adelaide_2_srmf_classes.tif"): default, str(work / "OSBS_029_srmf_classes.tif"): default,
                str(work / "osbs_from_dialog.tif"): default,
                str(work / "image_part_001_srmf_classes.tif"): model_classes(work / "dubai_finetuned.srmf")}
    assert sorted(rec["layers"]) == sorted(expected)
    for source, classes in expected.items():
        layer = rec["layers"][source]
        assert_styled(layer, classes, f"reopened {Path(source).name}")
    fresh = rec["fresh_from_qml"]  # the file opened again: its .qml styles it
    assert fresh["name"] == "opened again"
    assert_styled(fresh, default, "adelaide_2_srmf_classes.tif opened again (.qml)")
