"""The plugin in QGIS: context-menu actions (raster layers only), one-click segmentation as a task,
the algorithm dialog filled in, and loading the packaged ZIP through qgis.utils."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from srmf_qgis_testing import (ATLANTA_BUILDINGS, MODEL_CLASSES, MODEL_COLOURS, OSBS, ROOT, have_make, run_alg,
                               wait_for)
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer


_KEEP: list = []


@pytest.fixture
def plugin(qgis_iface, provider):
    from srmf_qgis.plugin import SRMFPlugin

    from qgis.gui import QgsBrowserGuiModel

    qgis_iface.addCustomActionForLayerType.reset_mock()
    if not isinstance(qgis_iface.browserModel(), QgsBrowserGuiModel):  # the stub iface has none; the dialog needs one
        model = QgsBrowserGuiModel()
        _KEEP.append(model)
        qgis_iface.browserModel = lambda: model
    p = SRMFPlugin(qgis_iface)
    p.initGui()
    yield p
    p.provider = None  # the session's provider stays registered for the other tests
    p.unload()


@pytest.fixture
def osbs_copy(tmp_path) -> Path:
    """A copy of the real raster in a writable folder (one-click results are written beside the input)."""
    dst = tmp_path / "OSBS_029.tif"
    shutil.copy(OSBS, dst)
    return dst


def test_context_menu_actions_for_raster_layers_only(plugin, qgis_iface, clean_project):
    raster = QgsRasterLayer(str(OSBS), "osbs", "gdal")
    vector = QgsVectorLayer(str(ATLANTA_BUILDINGS), "buildings", "ogr")
    assert raster.isValid() and vector.isValid()
    texts = [a.text() for a in plugin.actions_for_layer(raster)]
    assert texts == ["Segment with SRMF", "Segment visible extent with SRMF", "Segment with SRMF\u2026",
                     "Fine-tune SRMF on this layer\u2026"]
    assert plugin.actions_for_layer(vector) == []
    # what QGIS was asked: every action for the raster layer type, on all layers of that type
    calls = qgis_iface.addCustomActionForLayerType.call_args_list
    assert len(calls) == 4
    for call in calls:
        action, menu, layer_type, all_layers = call.args
        assert layer_type == raster.type() and layer_type != vector.type() and all_layers is True
    # the Raster menu
    assert [a.text() for a in plugin.menu_actions] == ["Segment raster\u2026", "Fine-tune model\u2026",
                                                       "Evaluate accuracy\u2026", "Model information\u2026",
                                                       "Settings\u2026", "Diagnostics\u2026"]


def test_segment_with_srmf_adds_a_styled_layer(plugin, qgis_iface, clean_project, osbs_copy):
    layer = QgsRasterLayer(str(osbs_copy), "OSBS", "gdal")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    plugin.layer_actions["segment"].trigger()
    assert len(plugin.jobs) == 1
    job = plugin.jobs[0]
    assert job.task in QgsApplication.taskManager().tasks()  # progress in the task manager
    wait_for(lambda: job.done and getattr(job, "layer", None) is not None or (job.done and not job.ok),
             what="the segmentation task")
    assert job.ok, job.error
    out = Path(job.results["OUTPUT"])
    assert out == osbs_copy.with_name("OSBS_029_srmf_classes.tif") and out.exists()
    added = [l for l in QgsProject.instance().mapLayers().values() if l.source() == str(out)]
    assert len(added) == 1
    styled = added[0]
    assert styled.name() == "OSBS \u2014 SRMF classes"
    assert styled.renderer().type() == "paletted"
    assert [c.label for c in styled.renderer().classes()] == MODEL_CLASSES
    # the model's colours, on the map and in the legend (issue 17: all were #808080)
    assert [c.color.name().upper() for c in styled.renderer().classes()] == MODEL_COLOURS
    legend = styled.renderer().legendSymbologyItems()
    assert [(n, c.name().upper()) for n, c in legend] == list(zip(MODEL_CLASSES, MODEL_COLOURS))
    assert styled.crs().authid() == "EPSG:32617" and styled.extent() == layer.extent()
    # a second run does not overwrite the first result
    params = __import__("srmf_qgis.tasks", fromlist=["x"]).segment_parameters(layer)
    assert params["OUTPUT"].endswith("OSBS_029_srmf_classes_2.tif")


def test_segment_with_several_layers_selected_segments_each_into_one_group(plugin, qgis_iface, clean_project,
                                                                          osbs_copy, tmp_path, monkeypatch):
    """Two real rasters selected in the Layers panel (NEON RGB, SpaceNet pan): "Segment with SRMF" starts one
    background task each and puts both styled class rasters in one group."""
    import shutil

    from srmf_qgis_testing import ATLANTA

    atlanta = tmp_path / "atlanta.tif"
    shutil.copy(ATLANTA, atlanta)
    layers = [QgsRasterLayer(str(osbs_copy), "OSBS", "gdal"), QgsRasterLayer(str(atlanta), "Atlanta", "gdal")]
    for layer in layers:
        QgsProject.instance().addMapLayer(layer)

    class View:  # the Layers panel with both layers selected
        def selectedLayers(self):  # noqa: N802
            return layers

    monkeypatch.setattr(qgis_iface, "layerTreeView", lambda: View(), raising=False)
    qgis_iface.setActiveLayer(layers[0])
    plugin.layer_actions["segment"].trigger()
    jobs = list(plugin.jobs)
    assert len(jobs) == 2 and all(j.task in QgsApplication.taskManager().tasks() for j in jobs)
    wait_for(lambda: all(j.done and (getattr(j, "layer", None) is not None or not j.ok) for j in jobs),
             what="both segmentation tasks")
    assert all(j.ok for j in jobs), [j.error for j in jobs]
    group = QgsProject.instance().layerTreeRoot().findGroup("SRMF classes (2 layers)")
    assert group is not None
    names = sorted(child.layer().name() for child in group.findLayers())
    assert names == ["Atlanta \u2014 SRMF classes", "OSBS \u2014 SRMF classes"]
    for child in group.findLayers():
        assert child.layer().renderer().type() == "paletted"


def test_segment_visible_extent_segments_the_part_the_map_shows(plugin, qgis_iface, clean_project, osbs_copy):
    """The context menu's "Segment visible extent with SRMF" on the real NEON raster zoomed to its north-west
    part: the class raster covers that part (within the visible extent, on the layer's pixel grid)."""
    from osgeo import gdal
    from qgis.core import QgsRectangle

    layer = QgsRasterLayer(str(osbs_copy), "OSBS", "gdal")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(layer.crs())
    full = layer.extent()
    canvas.setExtent(QgsRectangle(full.xMinimum(), full.center().y(), full.center().x(), full.yMaximum()))
    canvas.refresh()
    shown = canvas.extent()
    plugin.layer_actions["segment_visible"].trigger()
    assert len(plugin.jobs) == 1
    job = plugin.jobs[0]
    wait_for(lambda: job.done and getattr(job, "layer", None) is not None or (job.done and not job.ok),
             what="the segmentation task")
    assert job.ok, job.error
    ds, src = gdal.Open(job.results["OUTPUT"]), gdal.Open(str(osbs_copy))
    gt, sgt = ds.GetGeoTransform(), src.GetGeoTransform()
    assert ds.RasterXSize * ds.RasterYSize < src.RasterXSize * src.RasterYSize  # a part, not the whole
    assert gt[1] == sgt[1] and gt[5] == sgt[5]
    assert float((gt[0] - sgt[0]) / sgt[1]).is_integer() and float((gt[3] - sgt[3]) / sgt[5]).is_integer()
    x0, y1 = gt[0], gt[3]
    x1, y0 = x0 + ds.RasterXSize * gt[1], y1 + ds.RasterYSize * gt[5]
    tol = abs(sgt[1])
    inter = shown.intersect(full)
    assert x0 <= inter.xMinimum() + tol and x1 >= inter.xMaximum() - tol  # covers what is shown of the layer
    assert y0 <= inter.yMinimum() + tol and y1 >= inter.yMaximum() - tol
    assert x0 >= inter.xMinimum() - tol and x1 <= inter.xMaximum() + tol  # and no more
    assert y0 >= inter.yMinimum() - tol and y1 <= inter.yMaximum() + tol


def test_class_table_of_a_fresh_class_raster_and_of_a_result(osbs_segmented, tmp_path):
    """GDAL 3.6 returns no category names on a freshly opened GeoTIFF until its .aux.xml is loaded
    (issue 17): the reader must still give every class its name and colour, and a segment result
    carries the engine's table, or else the model's."""
    from srmf_qgis import styling
    from srmf_qgis.tasks import result_classes

    src = Path(osbs_segmented["results"]["OUTPUT"])
    fresh = tmp_path / "fresh.tif"  # never opened in this process
    shutil.copy(src, fresh)
    shutil.copy(str(src) + ".aux.xml", str(fresh) + ".aux.xml")
    expected = [{"id": i, "name": n, "colour": c} for i, (n, c) in enumerate(zip(MODEL_CLASSES, MODEL_COLOURS))]
    assert styling.classes_from_raster(fresh) == expected
    res = osbs_segmented["results"]
    assert result_classes(res) == expected  # the engine's table
    assert result_classes({"MODEL_USED": res["MODEL_USED"], "CLASSES": None}) == expected  # the model header
    assert result_classes({}) == []


def test_segment_with_srmf_dialog_has_the_layer_filled_in(plugin, qgis_iface, clean_project, artifacts):
    layer = QgsRasterLayer(str(OSBS), "OSBS", "gdal")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    plugin.layer_actions["segment_dialog"].trigger()
    dlg = plugin.dialogs[-1]
    assert dlg.algorithm().id() == "srmf:segment"
    values = dlg.mainWidget().createProcessingParameters()
    value = values["INPUT"]
    assert (value.id() if hasattr(value, "id") else value) == layer.id()
    dlg.resize(980, 760)
    from qgis.PyQt.QtWidgets import QApplication

    QApplication.processEvents()
    dlg.grab().save(str(artifacts / "segment_dialog.png"))
    dlg.close()


def test_finetune_action_opens_the_dialog_on_the_layer(plugin, qgis_iface, clean_project):
    layer = QgsRasterLayer(str(OSBS), "OSBS", "gdal")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    plugin.layer_actions["finetune"].trigger()
    dlg = plugin.dialogs[-1]
    assert dlg.windowTitle() == "Fine-tune SRMF"
    assert dlg.rasters() == [layer]
    assert [e.name for e in dlg.class_table.entries()] == MODEL_CLASSES  # from the base model
    dlg.close()


def test_one_click_segment_on_a_non_gdal_layer_says_why(plugin, qgis_iface, clean_project):
    from srmf_qgis.tasks import segment_parameters

    # web map layers (the "wms" provider: XYZ, WMTS, WMS) are read (tests/qgis/test_qgis_web.py); a WCS is not
    wcs = QgsRasterLayer("url=http://127.0.0.1:9/wcs&identifier=coverage", "coverage", "wcs")
    with pytest.raises(Exception, match="'wcs' data provider; SRMF reads rasters through GDAL"):
        segment_parameters(wcs)


@pytest.mark.skipif(not have_make(), reason="make is not installed")
def test_plugin_loads_from_the_packaged_zip(tmp_path, qgis_iface, provider):
    """`make package` → unzip as QGIS does → qgis.utils.loadPlugin / startPlugin → provider and menus."""
    import qgis.utils

    dist = tmp_path / "dist"
    proc = subprocess.run(["make", "-s", "package", f"DIST={dist}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    zips = list(dist.glob("srmf-*.zip"))
    assert len(zips) == 1
    plugins_dir = tmp_path / "plugins"
    with zipfile.ZipFile(zips[0]) as zf:
        names = zf.namelist()
        assert all(n.startswith("srmf/") for n in names)
        assert "srmf/metadata.txt" in names and "srmf/resources/models/default.srmf" in names
        assert not any("/tests/" in n or "__pycache__" in n or "/.venv/" in n for n in names)
        zf.extractall(plugins_dir)

    registry = QgsApplication.processingRegistry()
    registry.removeProvider(provider)  # the packaged plugin registers its own "srmf" provider
    sys.path.insert(0, str(plugins_dir))
    qgis.utils.plugin_paths.insert(0, str(plugins_dir))
    try:
        qgis.utils.updateAvailablePlugins()
        assert "srmf" in qgis.utils.available_plugins
        assert qgis.utils.loadPlugin("srmf")
        assert qgis.utils.startPlugin("srmf")
        assert "srmf" in qgis.utils.active_plugins
        meta = qgis.utils.pluginMetadata("srmf", "qgisMinimumVersion")
        assert meta == "3.22"
        p = registry.providerById("srmf")
        assert p is not None
        alg = registry.algorithmById("srmf:modelinfo")
        assert str(plugins_dir) in sys.modules[type(alg).__module__].__file__  # loaded from the package
        res = run_alg("srmf:modelinfo", {"OUTPUT_CLASSES": None, "OUTPUT_HTML": None})
        assert res["MODEL"].startswith(str(plugins_dir))  # the packaged default model, read by the packaged engine
        assert [c["name"] for c in res["CLASSES"]] == MODEL_CLASSES
        assert qgis.utils.unloadPlugin("srmf")
        assert registry.providerById("srmf") is None
        # as qgis_process starts it: Processing only, without a GUI (iface None)
        saved_iface, qgis.utils.iface = qgis.utils.iface, None
        try:
            assert qgis.utils.loadPlugin("srmf") and qgis.utils.startProcessingPlugin("srmf")
            assert registry.algorithmById("srmf:segment") is not None
        finally:
            qgis.utils.iface = saved_iface
        assert qgis.utils.unloadPlugin("srmf")
        assert registry.providerById("srmf") is None
    finally:
        sys.path.remove(str(plugins_dir))
        qgis.utils.plugin_paths.remove(str(plugins_dir))
        for name in [m for m in sys.modules if m == "srmf" or m.startswith("srmf.")]:
            del sys.modules[name]
        if registry.providerById("srmf") is None:  # the removed provider was deleted: register a new one
            from srmf_qgis.provider import SRMFProvider

            _KEEP.append(SRMFProvider())
            registry.addProvider(_KEEP[-1])


def test_cancelling_the_background_task_ends_the_worker(plugin, qgis_iface, clean_project, tmp_path):
    import os

    from srmf_qgis_testing import ADELAIDE, process_group_members

    src = tmp_path / "adelaide_2.tif"
    shutil.copy(ADELAIDE, src)
    layer = QgsRasterLayer(str(src), "Adelaide", "gdal")
    QgsProject.instance().addMapLayer(layer)
    job = plugin.segment_layer(layer, TILE_SIZE=256, STRIDE=128)
    progress = []
    job.feedback.progressChanged.connect(progress.append)
    wait_for(lambda: job.done or any(p > 0 for p in progress), 300, "the first progress message")
    assert not job.done
    job.cancel()
    wait_for(lambda: job.done, 120, "the cancelled task")
    assert not job.ok and "ancel" in job.error
    pid = job.feedback.worker_pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert process_group_members(pid) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adelaide_2.tif"]  # no output, no partial file
    assert [l.name() for l in QgsProject.instance().mapLayers().values()] == ["Adelaide"]
