"""Offscreen screenshots of a segmented real raster on the map, the settings dialog with
"Install dependencies…" and "Diagnostics"."""
from __future__ import annotations

import sys

from srmf_qgis_testing import ADELAIDE, MODEL_CLASSES, OSBS, VENV_PYTHON, wait_for
from qgis.core import QgsRasterLayer, QgsSettings
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QGuiApplication
from qgis.PyQt.QtWidgets import QApplication

from srmf_qgis import runtime
from srmf_qgis.quicklook import render_map, render_quicklook, wrap_text


def _colours(image, step=7):
    seen = set()
    for y in range(0, image.height(), step):
        for x in range(0, image.width(), step):
            seen.add(QColor(image.pixel(x, y)).name().upper())
    return seen


def test_map_screenshot_of_a_segmented_real_raster(adelaide_segmented, osbs_segmented, artifacts):
    for name, src, seg in (("adelaide", ADELAIDE, adelaide_segmented), ("osbs", OSBS, osbs_segmented)):
        res = seg["results"]
        inp = QgsRasterLayer(str(src), src.stem, "gdal")
        cls = QgsRasterLayer(res["OUTPUT"], f"{src.stem} classes", "gdal")
        assert [c.label for c in cls.renderer().classes()] == MODEL_CLASSES
        image = render_map([cls], inp.extent(), inp.crs(), QSize(700, 700))
        path = artifacts / f"map_{name}_classes.png"
        assert image.save(str(path))
        colours = _colours(image)
        model_colours = {c.color.name().upper() for c in cls.renderer().classes()}
        assert len(colours & model_colours) >= 2  # the classes are drawn in the model's colours
        ql = render_quicklook(inp, cls, artifacts / f"quicklook_{name}.png",
                              [{"name": c.label, "colour": c.color.name()} for c in cls.renderer().classes()],
                              res.get("CLASS_AREAS"))
        assert ql.exists() and ql.stat().st_size > 50_000


def test_quicklook_caption_is_wrapped_under_the_legend(adelaide_segmented, tmp_path):
    """The demo's caption (what the map gets right and wrong) is drawn under the legend, word-wrapped to the
    picture's width, and adds only its own lines to the picture."""
    from qgis.PyQt.QtGui import QFont, QFontMetricsF, QImage

    font = QFont("sans-serif")
    font.setPixelSize(13)
    metrics = QFontMetricsF(font)
    words = "water is found on water; dry fields are called land " * 12
    lines = wrap_text(words + "\nsecond paragraph", metrics, 400)
    assert len(lines) > 3 and lines[-1] == "second paragraph"
    assert all(metrics.horizontalAdvance(ln) <= 400 for ln in lines)
    assert " ".join(lines[:-1]).split() == words.split()  # nothing lost, nothing reordered
    res = adelaide_segmented["results"]
    inp = QgsRasterLayer(str(ADELAIDE), ADELAIDE.stem, "gdal")
    cls = QgsRasterLayer(res["OUTPUT"], "classes", "gdal")
    plain = QImage(str(render_quicklook(inp, cls, tmp_path / "plain.png")))
    captioned = QImage(str(render_quicklook(inp, cls, tmp_path / "caption.png", caption=words)))
    n = len(wrap_text(words, metrics, 2 * 512 + 10))
    assert captioned.width() == plain.width() and captioned.height() == plain.height() + 18 * n + 12
    dark = sum(QColor(captioned.pixel(x, y)).lightness() < 128
               for y in range(plain.height(), captioned.height()) for x in range(0, captioned.width(), 2))
    assert dark > 50 * n  # the caption's text is drawn there


def test_map_screenshot_of_an_area_of_interest_run(provider, tmp_path, artifacts):
    """srmf:segment on the real Adelaide raster with a hexagon as *Mask polygons*: on the map, the classes are
    drawn inside the hexagon only (the image shows through outside it), over the image; the screenshot is the
    README's picture of an area-of-interest run."""
    import math

    from qgis.core import (QgsFeature, QgsFillSymbol, QgsGeometry, QgsPointXY, QgsVectorFileWriter,
                           QgsVectorLayer, QgsCoordinateTransformContext)
    from srmf_qgis_testing import make_feedback, run_alg

    inp = QgsRasterLayer(str(ADELAIDE), "adelaide_2", "gdal")
    e = inp.extent()
    c, r = e.center(), 0.3 * min(e.width(), e.height())
    hexagon = QgsGeometry.fromPolygonXY([[QgsPointXY(c.x() + r * math.cos(math.radians(a)),
                                                     c.y() + r * math.sin(math.radians(a))) for a in range(0, 361, 60)]])
    mem = QgsVectorLayer(f"Polygon?crs={inp.crs().authid()}", "area of interest", "memory")
    f = QgsFeature()
    f.setGeometry(hexagon)
    mem.dataProvider().addFeatures([f])
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName = "GPKG"
    QgsVectorFileWriter.writeAsVectorFormatV3(mem, str(tmp_path / "aoi.gpkg"), QgsCoordinateTransformContext(), opts)
    res = run_alg("srmf:segment", {"INPUT": str(ADELAIDE), "MASK": str(tmp_path / "aoi.gpkg"), "PRECISION": 1,
                                   "OUTPUT": str(tmp_path / "aoi_classes.tif"), "OUTPUT_AREAS": None}, make_feedback())
    cls = QgsRasterLayer(res["OUTPUT"], "classes in the area", "gdal")
    outline = QgsVectorLayer(str(tmp_path / "aoi.gpkg"), "area of interest", "ogr")
    outline.setRenderer(outline.renderer().clone())
    outline.renderer().setSymbol(QgsFillSymbol.createSimple({"style": "no", "outline_color": "#E31A1C",
                                                             "outline_width": "0.8"}))
    cls.setOpacity(0.8)
    image = render_map([outline, cls, inp], e, inp.crs(), QSize(700, 700))
    assert image.save(str(artifacts / "map_aoi_adelaide.png"))
    model_colours = {c.color.name().upper() for c in cls.renderer().classes()}
    corner = QColor(image.pixel(20, 20)).name().upper()
    centre = {QColor(image.pixel(350 + dx, 350 + dy)).name().upper() for dx in range(-40, 41, 8) for dy in range(-40, 41, 8)}
    assert corner not in model_colours  # outside the mask: the image itself, no class drawn
    assert centre != {corner} and len(centre) > 1  # inside: the classes over the image
    ds_gt = cls.extent()
    assert ds_gt.width() < 0.7 * e.width() and ds_gt.height() < 0.7 * e.height()  # the output covers the mask's box


def test_settings_dialog_diagnostics_and_copy(qgis_iface, artifacts):
    from srmf_qgis.ui.settings_dialog import SettingsDialog

    dlg = SettingsDialog()
    dlg.resize(760, 320)
    dlg.show()
    QApplication.processEvents()
    assert str(VENV_PYTHON) in dlg.status.text() and "SRMF_PYTHON" in dlg.status.text()
    dlg.grab().save(str(artifacts / "settings_dialog.png"))
    report = dlg.diagnostics()
    text = report.text.toPlainText()
    from qgis.core import Qgis

    for expected in ("QGIS:", Qgis.QGIS_VERSION.split("-")[0], "Engine Python:", str(VENV_PYTHON), "PyTorch:", "CUDA available:", "GDAL",
                     "GPU"):
        assert expected in text, expected
    assert "NOT INSTALLED" not in text
    report.copy()
    assert QGuiApplication.clipboard().text() == text
    report.resize(820, 560)
    QApplication.processEvents()
    report.grab().save(str(artifacts / "diagnostics.png"))
    report.close()
    # choosing an interpreter is stored in the QGIS settings, and used first
    dlg.python.setFilePath(sys.executable)
    dlg.accept()
    try:
        assert QgsSettings().value("srmf/python") == sys.executable
        assert runtime.resolve_python().source == "SRMF settings"
    finally:
        QgsSettings().remove("srmf/python")
    assert runtime.resolve_python().source == "SRMF_PYTHON"


def test_install_dependencies_creates_the_managed_environment(qgis_iface, tmp_path, monkeypatch):
    """The real flow (python -m venv --system-site-packages, pip install -r) with visible progress, on a
    requirements file that needs no network (the engine's would download PyTorch)."""
    from srmf_qgis.ui.settings_dialog import SettingsDialog

    monkeypatch.setenv("SRMF_HOME", str(tmp_path / "home"))
    req = tmp_path / "requirements.txt"
    req.write_text("# satisfied by Debian's own packages, so pip needs no network\nnumpy\n")
    dlg = SettingsDialog()
    install = dlg.install(requirements=req, upgrade_pip=False, base_python="/usr/bin/python3",
                          verify_modules=("numpy", "osgeo"), extra_pip_args=["--no-index"])
    progress = []
    install.progress.valueChanged.connect(progress.append)
    wait_for(lambda: install.done, 300, "the installation task")
    log = install.log.toPlainText()
    assert install.ok, log
    venv = runtime.managed_venv_dir()
    assert str(venv).startswith(str(tmp_path / "home"))
    assert runtime.venv_python(venv).is_file()
    assert "--system-site-packages" in log and "Requirement already satisfied" in log
    assert install.progress.value() == 100 and len(progress) >= 3
    # without SRMF_PYTHON and settings, the managed environment is the engine's interpreter
    monkeypatch.delenv("SRMF_PYTHON")
    assert runtime.resolve_python() == runtime.Interpreter(str(runtime.venv_python(venv)), "managed environment")
    install.close()
    dlg.close()
