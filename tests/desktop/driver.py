"""Runs INSIDE the real QGIS desktop application (``qgis --code tests/desktop/driver.py``) and drives
the SRMF plugin as an analyst does: the layer context menu, the Raster menu, the Processing dialog,
the task manager. It writes a JSON report and PNG screenshots for ``test_desktop.py``, which makes
all the assertions; this file only acts and records what QGIS shows.

It never raises into QGIS (a Python error dialog would hang the application): every failure is
recorded under ``errors`` in the report, and QGIS is always told to exit (``os._exit`` as the last
resort). The configuration comes from the JSON file named by ``SRMF_DESKTOP_CONFIG``:
``mode`` ("flows" or "reopen"), ``out`` (report and screenshots), ``work`` (copies of the real
rasters), ``timeout`` (seconds for the whole run) and the inputs of each flow.
"""
import json
import os
import time
import traceback
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsTask
from qgis.gui import QgsMessageBarItem
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QEventLoop, QPoint, Qt, QThreadPool, QTimer
from qgis.PyQt.QtGui import QColor, QIcon, QImage, QPixmap
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QTextEdit
import qgis.utils

CFG = json.loads(Path(os.environ["SRMF_DESKTOP_CONFIG"]).read_text(encoding="utf-8"))
OUT = Path(CFG["out"])
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.monotonic()
REPORT = {"mode": CFG["mode"], "flows": {}, "messages": [], "errors": [], "complete": False, "timings": {}}
_KEEP = []  # Qt objects that must outlive a function (menus, connections)
_SEEN_ITEMS = set()


# -- recording ---------------------------------------------------------------------------------------
def save_report():
    REPORT["seconds"] = round(time.monotonic() - T0, 1)
    tmp = OUT / f"report_{CFG['mode']}.json.tmp"
    tmp.write_text(json.dumps(REPORT, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, OUT / f"report_{CFG['mode']}.json")


def on_message(item):
    """Every message the main message bar shows, as it is pushed (some disappear after seconds)."""
    try:
        if not isinstance(item, QgsMessageBarItem):  # the signal hands over a QWidget
            item = sip.cast(item, QgsMessageBarItem)
        key = sip.unwrapinstance(item)
        if key in _SEEN_ITEMS:  # the same item shown again when the message above it is dismissed
            return
        _SEEN_ITEMS.add(key)
        item.destroyed.connect(lambda *_, k=key: _SEEN_ITEMS.discard(k))  # its address may be reused
        REPORT["messages"].append({"title": item.title(), "text": item.text(), "level": int(item.level()),
                                   "t": round(time.monotonic() - T0, 1)})
    except Exception:  # noqa: BLE001
        REPORT["errors"].append("message bar: " + traceback.format_exc())


def colour_hex(c) -> str:
    return QColor(c).name().upper()


# -- waiting -----------------------------------------------------------------------------------------
def wait(predicate, timeout, what):
    """Process events until ``predicate()`` is true; TimeoutError naming ``what`` otherwise."""
    t0 = time.monotonic()
    while not predicate():
        QgsApplication.processEvents(QEventLoop.AllEvents, 50)
        time.sleep(0.03)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
    return time.monotonic() - t0


def settle(seconds=0.3):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        QgsApplication.processEvents(QEventLoop.AllEvents, 50)
        time.sleep(0.02)


def srmf_tasks():
    return [t for t in QgsApplication.taskManager().tasks() if t.description().startswith("SRMF:")]


# -- acting as the analyst ---------------------------------------------------------------------------
def click_menu_action(menu, text, where):
    """Pop ``menu`` up on screen and click the entry ``text`` with the mouse (QTest); the texts of all
    its entries are returned. Raises LookupError if there is no such entry."""
    texts = [a.text() for a in menu.actions()]
    action = next((a for a in menu.actions() if a.text() == text), None)
    if action is None:
        raise LookupError(f"no entry {text!r} in the menu {texts}")
    fired = []
    action.triggered.connect(lambda *_: fired.append(1))
    menu.popup(where)
    wait(lambda: menu.isVisible(), 10, "the menu to show")
    settle(0.2)
    rect = menu.actionGeometry(action)
    QTest.mouseMove(menu, rect.center())
    QTest.mouseClick(menu, Qt.LeftButton, Qt.NoModifier, rect.center())
    wait(lambda: fired, 10, f"the menu entry {text!r} to fire")
    return texts, action


def context_menu(layer, text):
    """Right-click ``layer`` in the Layers panel and click ``text`` in its context menu."""
    view = iface.layerTreeView()
    view.setCurrentLayer(layer)
    wait(lambda: iface.activeLayer() is layer, 10, f"'{layer.name()}' to become the current layer")
    index = view.currentIndex()
    pos = view.viewport().mapToGlobal(view.visualRect(index).center())
    menu = view.menuProvider().createContextMenu()
    _KEEP.append(menu)
    texts, action = click_menu_action(menu, text, pos)
    return {"entries": texts, "is_plugin_action": any(action is a for a in plugin().layer_actions.values())}


def raster_menu_action(text):
    """Raster ▸ SRMF ▸ ``text``, clicked on the open submenu."""
    srmf = next((a.menu() for a in iface.rasterMenu().actions() if a.menu() is not None
                 and a.text().replace("&", "") == "SRMF"), None)
    if srmf is None:
        raise LookupError("no SRMF submenu in the Raster menu: "
                          f"{[a.text() for a in iface.rasterMenu().actions()]}")
    pos = iface.mainWindow().mapToGlobal(QPoint(200, 60))
    texts, action = click_menu_action(srmf, text, pos)
    return {"entries": texts, "is_plugin_action": any(action is a for a in plugin().menu_actions)}


def plugin():
    return qgis.utils.plugins["srmf"]


def new_job(before):
    jobs = [j for j in plugin().jobs if j not in before]
    if len(jobs) != 1:
        raise RuntimeError(f"expected one new SRMF job, found {len(jobs)}")
    return jobs[0]


def wait_job(job, timeout, what):
    """Until the job has ended and, when it succeeded, its class layer has been added."""
    wait(lambda: job.done and (not job.ok or getattr(job, "layer", None) is not None), timeout, what)


# -- looking at what QGIS shows ----------------------------------------------------------------------
def legend_patches(layer):
    """(label, colour at the centre of the patch) of each legend entry the Layers panel draws."""
    view = iface.layerTreeView()
    node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
    out = []
    for ln in view.layerTreeModel().layerLegendNodes(node):
        label = ln.data(Qt.DisplayRole)
        deco = ln.data(Qt.DecorationRole)
        colour = None
        if isinstance(deco, QIcon):
            deco = deco.pixmap(16, 16)
        if isinstance(deco, QPixmap):
            deco = deco.toImage()
        if isinstance(deco, QImage) and not deco.isNull():
            colour = colour_hex(deco.pixelColor(deco.width() // 2, deco.height() // 2))
        out.append({"label": str(label), "patch": colour})
    return out


def render_canvas():
    canvas = iface.mapCanvas()
    done = []
    slot = lambda: done.append(1)  # noqa: E731
    canvas.mapCanvasRefreshed.connect(slot)
    try:
        canvas.refreshAllLayers()
        wait(lambda: done and not canvas.isDrawing(), 120, "the map canvas to finish rendering")
    finally:
        canvas.mapCanvasRefreshed.disconnect(slot)
    settle(0.2)


def show_only(layers):
    ids = {l.id() for l in layers}
    for node in QgsProject.instance().layerTreeRoot().findLayers():
        node.setItemVisibilityChecked(node.layerId() in ids)


def shoot_layer(layer, tag):
    """The map canvas showing only ``layer`` at its full extent, saved as PNG (+ world file), and what
    is needed to map canvas pixels onto the layer's pixels."""
    canvas = iface.mapCanvas()
    show_only([layer])
    if layer.crs().isValid():
        QgsProject.instance().setCrs(layer.crs())  # the project's CRS, which the canvas follows
    canvas.setExtent(layer.extent())
    render_canvas()
    png = OUT / f"{tag}_canvas.png"
    canvas.saveAsImage(str(png))
    wld = png.with_suffix(".pgw")
    e, le = canvas.mapSettings().visibleExtent(), layer.extent()
    return {"png": str(png), "world_file": str(wld) if wld.exists() else None,
            "canvas_extent": [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()],
            "canvas_size": [canvas.width(), canvas.height()],
            "layer_extent": [le.xMinimum(), le.yMinimum(), le.xMaximum(), le.yMaximum()],
            "layer_size": [layer.width(), layer.height()], "crs": layer.crs().authid()}


def inspect_class_layer(layer, tag):
    r = layer.renderer()
    info = {"name": layer.name(), "source": layer.source(), "valid": layer.isValid(),
            "renderer": r.type() if r else None, "crs": layer.crs().authid()}
    if r is not None and r.type() == "paletted":
        info["classes"] = [{"value": int(c.value), "label": c.label, "colour": colour_hex(c.color)}
                           for c in r.classes()]
    info["legend"] = legend_patches(layer)
    info["shot"] = shoot_layer(layer, tag)
    return info


def class_layers():
    return [l for l in QgsProject.instance().mapLayers().values()
            if isinstance(l, QgsRasterLayer) and l.name().endswith("SRMF classes")]


def add_raster(path, name):
    layer = iface.addRasterLayer(str(path), name)
    if layer is None or not layer.isValid():
        raise RuntimeError(f"QGIS could not open {path}")
    return layer


def grab(widget, name):
    settle(0.3)
    path = OUT / name
    widget.grab().save(str(path))
    return str(path)


# -- the flows ---------------------------------------------------------------------------------------
def flow_one_click_and_second_layer(flows):
    """Right-click adelaide_2 ▸ Segment with SRMF, then at once OSBS_029 ▸ Segment with SRMF while the
    first runs; both class layers are added in the model's colours."""
    adel = add_raster(CFG["adelaide"], "adelaide_2")
    osbs = add_raster(CFG["osbs"], "OSBS_029")
    iface.mapCanvas().setExtent(adel.extent())
    rec = flows["one_click"] = {}
    before = list(plugin().jobs)
    rec["menu"] = context_menu(adel, "Segment with SRMF")
    job1 = new_job(before)
    rec2 = flows["second_layer"] = {}
    before = list(plugin().jobs)
    rec2["menu"] = context_menu(osbs, "Segment with SRMF")
    job2 = new_job(before)
    rec2["first_still_running_when_second_started"] = not job1.done
    rec2["tasks_listed"] = [(t.description(), int(t.status())) for t in srmf_tasks()]
    concurrent = [0]

    def both_done():
        running = sum(1 for j in (job1, job2) if not j.done and j.task.status() == QgsTask.Running)
        concurrent[0] = max(concurrent[0], running)
        return all(j.done and (not j.ok or getattr(j, "layer", None) is not None) for j in (job1, job2))

    rec2["wait_s"] = round(wait(both_done, CFG["job_timeout"], "the two segmentation tasks"), 1)
    rec2["max_running_at_once"] = concurrent[0]
    rec2["thread_pool_size"] = QThreadPool.globalInstance().maxThreadCount()  # the task manager's threads
    for rec_, job in ((rec, job1), (rec2, job2)):
        rec_.update(ok=job.ok, error=job.error, output=job.results.get("OUTPUT"),
                    model=job.results.get("MODEL_USED"), class_areas=job.results.get("CLASS_AREAS"))
    rec["layer"] = inspect_class_layer(job1.layer, "one_click_adelaide")
    rec2["layer"] = inspect_class_layer(job2.layer, "second_layer_osbs")
    # What the analyst sees: the classes over the map, with the legend (README screenshot).
    show_only([job1.layer])
    QgsProject.instance().setCrs(job1.layer.crs())
    iface.mapCanvas().setExtent(job1.layer.extent())
    view = iface.layerTreeView()
    view.setCurrentLayer(job1.layer)
    render_canvas()
    for node in QgsProject.instance().layerTreeRoot().findLayers():  # the class legend open, the others closed
        node.setExpanded(node.layerId() == job1.layer.id())
        if hasattr(view, "node2index"):  # the view's (proxy) index
            view.setExpanded(view.node2index(node), node.layerId() == job1.layer.id())
    rec["window_png"] = grab(iface.mainWindow(), "desktop_one_click.png")
    return adel, osbs


def flow_cancel(flows, adel):
    """Segment adelaide_2 again and cancel it from the task manager once it reports progress."""
    rec = flows["cancel"] = {}
    work = Path(CFG["work"])
    rec["files_before"] = sorted(p.name for p in work.iterdir())
    rec["layers_before"] = sorted(l.name() for l in QgsProject.instance().mapLayers().values())
    before = list(plugin().jobs)
    rec["menu"] = context_menu(adel, "Segment with SRMF")
    job = new_job(before)
    rec["output_planned"] = job.parameters.get("OUTPUT")
    wait(lambda: job.done or job.task.progress() > 0, CFG["job_timeout"], "the first progress of the task to cancel")
    rec["done_before_cancel"] = job.done
    listed = [t for t in QgsApplication.taskManager().activeTasks() if t.description() == "SRMF: segmenting adelaide_2"]
    rec["task_found_in_task_manager"] = len(listed)
    rec["progress_at_cancel"] = job.task.progress()
    if listed:
        listed[0].cancel()  # what the task manager's cancel does
    rec["cancel_wait_s"] = round(wait(lambda: job.done, 180, "the cancelled task to end"), 1)
    settle(1.0)
    rec.update(ok=job.ok, error=job.error, worker_pid=job.feedback.worker_pid)
    pid = job.feedback.worker_pid
    alive = False
    if pid:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
    rec["worker_alive_after"] = alive
    rec["files_after"] = sorted(p.name for p in work.iterdir())
    rec["layers_after"] = sorted(l.name() for l in QgsProject.instance().mapLayers().values())


def flow_processing_dialog(flows, osbs):
    """Right-click OSBS_029 ▸ Segment with SRMF… (the srmf:segment dialog), choose the output file, Run."""
    from processing.tools.dataobjects import createContext

    rec = flows["processing_dialog"] = {}
    n_dialogs = len(plugin().dialogs)
    rec["menu"] = context_menu(osbs, "Segment with SRMF\u2026")
    wait(lambda: len(plugin().dialogs) > n_dialogs, 30, "the srmf:segment dialog")
    dlg = plugin().dialogs[-1]
    wait(lambda: dlg.isVisible(), 30, "the srmf:segment dialog to show")
    rec["algorithm"] = dlg.algorithm().id()
    values = dlg.mainWidget().createProcessingParameters()
    inp = values.get("INPUT")
    rec["input_filled_in"] = (inp.id() if hasattr(inp, "id") else inp) == osbs.id()
    out = str(Path(CFG["work"]) / "osbs_from_dialog.tif")
    dlg.mainWidget().wrappers["OUTPUT"].setParameterValue(out, createContext())
    dlg.resize(980, 760)
    rec["dialog_png"] = grab(dlg, "segment_dialog.png")
    finished = []
    dlg.algorithmFinished.connect(lambda ok, res: finished.append((ok, dict(res))))
    dlg.runButton().click()
    rec["wait_s"] = round(wait(lambda: finished, CFG["job_timeout"], "the srmf:segment dialog's task"), 1)
    settle(0.5)
    rec["ok"] = finished[0][0]
    rec["results_output"] = finished[0][1].get("OUTPUT")
    logs = dlg.findChildren(QTextEdit)  # the dialog's Log tab (txtLog) among the text widgets
    rec["text_widgets"] = [w.objectName() for w in logs]
    log = next((w for w in logs if w.objectName() == "txtLog"), None) or \
        next((w for w in logs if "finished" in w.toPlainText()), None)
    rec["log"] = log.toPlainText()[-8000:] if log is not None else None
    rec["dialog_done_png"] = grab(dlg, "segment_dialog_done.png")
    added = [l for l in class_layers() if l.source() == out]
    rec["layers_with_output"] = len(added)
    if added:
        rec["layer"] = inspect_class_layer(added[0], "processing_dialog_osbs")
    dlg.close()


def flow_finetune_dialog(flows):
    """Raster ▸ SRMF ▸ Fine-tune model…: a real Dubai tile and its labels, the analyst's own colours,
    Run, then “Segment with the new model”."""
    from srmf.srmf_qgis.classtable import ClassEntry

    rec = flows["finetune_dialog"] = {}
    ft = CFG["finetune"]
    image = add_raster(ft["image"], "dubai tile_1 part 1")
    labels = add_raster(ft["labels"], "dubai tile_1 part 1 labels")
    n_dialogs = len(plugin().dialogs)
    rec["menu"] = raster_menu_action("Fine-tune model\u2026")
    wait(lambda: len(plugin().dialogs) > n_dialogs, 30, "the fine-tune dialog")
    dlg = plugin().dialogs[-1]
    wait(lambda: dlg.isVisible(), 30, "the fine-tune dialog to show")
    rec["title"] = dlg.windowTitle()
    rec["base_classes"] = [e.name for e in dlg.class_table.entries()]
    dlg.set_pair(0, image, labels)
    dlg.class_table.set_entries([ClassEntry(c["name"], c["colour"], f"A satellite image of {c['name']}", c["value"])
                                 for c in ft["classes"]])
    dlg.iterations.setValue(ft["iterations"])
    dlg.batch_size.setValue(2)
    dlg.device.setCurrentIndex(1)  # CPU
    dlg.output.setFilePath(ft["model"])
    dlg.resize(1100, 860)
    rec["dialog_png"] = grab(dlg, "finetune_dialog.png")
    dlg.run_button.click()
    if dlg.job is None:
        rec["refused"] = getattr(dlg, "last_message", "")
        raise RuntimeError(f"the fine-tune dialog refused to run: {rec['refused']}")
    rec["train_wait_s"] = round(wait(lambda: dlg.job.done, CFG["finetune_timeout"], "the fine-tuning task"), 1)
    rec.update(train_ok=dlg.job.ok, train_error=dlg.job.error, model=dlg.model_path,
               iou_rows=[dlg.iou_table.item(r, 0).text() for r in range(dlg.iou_table.rowCount())],
               iou_label=dlg.iou_label.text(), dialog_message=getattr(dlg, "last_message", ""),
               segment_button_enabled=dlg.segment_button.isEnabled())
    rec["dialog_done_png"] = grab(dlg, "finetune_dialog_done.png")
    before = list(plugin().jobs)
    dlg.segment_button.click()
    job = new_job(before)
    wait_job(job, CFG["job_timeout"], "the segmentation with the fine-tuned model")
    rec.update(ok=job.ok, error=job.error, output=job.results.get("OUTPUT"), model_used=job.results.get("MODEL_USED"))
    rec["layer"] = inspect_class_layer(job.layer, "finetuned_dubai")
    dlg.close()


def run_flows():
    flows = REPORT["flows"]
    steps = [("one_click", lambda: flow_one_click_and_second_layer(flows))]
    adel = osbs = None
    for name, fn in steps:
        t = time.monotonic()
        try:
            adel, osbs = fn()
        except Exception:  # noqa: BLE001
            REPORT["errors"].append(f"{name}: {traceback.format_exc()}")
        REPORT["timings"][name] = round(time.monotonic() - t, 1)
        save_report()
    for name, fn in (("cancel", lambda: flow_cancel(flows, adel)),
                     ("processing_dialog", lambda: flow_processing_dialog(flows, osbs)),
                     ("finetune_dialog", lambda: flow_finetune_dialog(flows))):
        t = time.monotonic()
        try:
            if adel is None:
                raise RuntimeError("skipped: the rasters were not opened")
            fn()
        except Exception:  # noqa: BLE001
            REPORT["errors"].append(f"{name}: {traceback.format_exc()}")
        REPORT["timings"][name] = round(time.monotonic() - t, 1)
        save_report()
    # Save the project as the analyst would, for the "reopen" run.
    layers = QgsProject.instance().mapLayers().values()
    REPORT["saved_layers"] = [{"name": l.name(), "source": l.source(), "provider": l.providerType()} for l in layers]
    REPORT["project_saved"] = QgsProject.instance().write(CFG["project"])


def run_reopen():
    """The project saved by the flows run, opened with ``qgis --project``: the class layers keep their
    colours; the one-click class raster added anew takes them from its .qml."""
    rec = REPORT["flows"]["reopen"] = {}
    project = QgsProject.instance()
    wait(lambda: project.fileName() and class_layers(), 60, "the saved project to be loaded")
    settle(0.5)
    rec["project"] = project.fileName()
    rec["layers"] = {}
    for layer in sorted(class_layers(), key=lambda l: l.source()):
        rec["layers"][layer.source()] = inspect_class_layer(layer, f"reopen_{Path(layer.source()).stem}")
    fresh = add_raster(CFG["reopen_raster"], "opened again")
    rec["fresh_from_qml"] = inspect_class_layer(fresh, "reopen_fresh_qml")
    rec["window_png"] = grab(iface.mainWindow(), "desktop_reopened.png")


def main():
    try:
        iface.messageBar().widgetAdded.connect(on_message)
        win = iface.mainWindow()
        win.resize(1400, 900)
        win.move(0, 0)
        win.show()
        settle(1.0)
        REPORT["plugin"] = {"active": "srmf" in qgis.utils.active_plugins,
                            "module": getattr(__import__("sys").modules.get(type(plugin()).__module__), "__file__", None)
                            if "srmf" in qgis.utils.plugins else None,
                            "qgis": qgis.utils.Qgis.QGIS_VERSION}
        REPORT["env"] = {"SRMF_PYTHON": os.environ.get("SRMF_PYTHON"), "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM")}
        save_report()
        if CFG["mode"] == "flows":
            run_flows()
        else:
            run_reopen()
        REPORT["complete"] = True
    except Exception:  # noqa: BLE001
        REPORT["errors"].append("driver: " + traceback.format_exc())
    finally:
        REPORT["visible_windows"] = [f"{type(w).__name__}: {w.windowTitle()}" for w in QgsApplication.topLevelWidgets()
                                     if w.isVisible() and w.windowTitle()]
        REPORT["srmf_tasks_left"] = [t.description() for t in srmf_tasks() if t.status() in (QgsTask.Queued, QgsTask.Running)]
        save_report()
        quit_qgis()


def quit_qgis():
    """Leave QGIS as the analyst does (File ▸ Exit); if it is still up after 30 s, end the process."""
    for w in QgsApplication.topLevelWidgets():  # dialogs the flows left open
        if w is not iface.mainWindow() and w.isVisible() and w.isWindow():
            w.close()
    QgsProject.instance().setDirty(False)

    def still_running():  # a dialog held the exit up: say which, then end the process
        REPORT["errors"].append("exit: QGIS did not quit within 30 s; windows: " + ", ".join(
            f"{type(w).__name__}: {w.windowTitle()}" for w in QgsApplication.topLevelWidgets() if w.isVisible()))
        save_report()
        os._exit(3)

    QTimer.singleShot(30000, still_running)
    QTimer.singleShot(0, iface.actionExit().trigger)


def watchdog():
    REPORT["errors"].append(f"watchdog: the driver ran past {CFG['timeout']} s")
    save_report()
    os._exit(4)


iface = qgis.utils.iface
_WATCHDOG = QTimer()
_WATCHDOG.setSingleShot(True)
_WATCHDOG.timeout.connect(watchdog)
_WATCHDOG.start(int(CFG["timeout"] * 1000))
QTimer.singleShot(0, main)
