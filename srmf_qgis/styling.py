"""Styles for SRMF results: the model's class colours and names, nothing else.

* Class rasters get a paletted renderer that lists only the model's classes (GDAL's colour table has
  256 entries; QGIS would otherwise show them all), and the style is written beside the raster as
  ``<name>.qml`` so QGIS applies it whenever the file is opened again, in any project.
* Class polygons get a categorised renderer on ``class_id`` with the same colours and names.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from qgis.core import (QgsCategorizedSymbolRenderer, QgsFillSymbol, QgsPalettedRasterRenderer,
                       QgsProcessingLayerPostProcessorInterface, QgsRasterLayer, QgsRendererCategory)
from qgis.PyQt.QtGui import QColor

NODATA_CLASS = 255


def qml_path(path) -> Path:
    """The style file QGIS loads by default for ``path``: same folder and name, ``.qml``."""
    p = Path(str(path).split("|")[0])
    return p.with_suffix(".qml")


def _classes(classes: Sequence[dict]) -> List[dict]:
    return sorted((c for c in classes if int(c["id"]) != NODATA_CLASS), key=lambda c: int(c["id"]))


def paletted_renderer(provider, classes: Sequence[dict], band: int = 1) -> QgsPalettedRasterRenderer:
    """A paletted renderer with one entry per class ``{id, name, colour}``."""
    entries = [QgsPalettedRasterRenderer.Class(int(c["id"]), QColor(c.get("colour") or "#808080"), str(c["name"]))
               for c in _classes(classes)]
    return QgsPalettedRasterRenderer(provider, band, entries)


def style_class_layer(layer: QgsRasterLayer, classes: Sequence[dict]) -> None:
    """Give a class raster layer the model's colours and class names."""
    layer.setRenderer(paletted_renderer(layer.dataProvider(), classes))
    layer.triggerRepaint()


def write_class_qml(raster_path, classes: Sequence[dict]) -> Optional[Path]:
    """Write ``<raster>.qml`` with the paletted style; returns its path (None if it could not be written)."""
    options = QgsRasterLayer.LayerOptions()
    options.loadDefaultStyle = False
    layer = QgsRasterLayer(str(raster_path), "srmf classes", "gdal", options)
    if not layer.isValid():
        return None
    style_class_layer(layer, classes)
    target = qml_path(raster_path)
    _msg, ok = layer.saveNamedStyle(str(target))
    return target if ok and target.exists() else None


def classes_from_raster(path) -> List[dict]:
    """``[{id, name, colour}]`` from a class raster's category names and colour table (GDAL metadata).

    Values without a category name are left out; an empty list when the raster has neither. For a
    raster the plugin has just segmented, prefer the engine's class table (``tasks.result_classes``):
    this reads files written by anyone.
    """
    from osgeo import gdal

    from .compat import gdal_open

    ds, _ = gdal_open(path, gdal.OF_RASTER)
    if ds is None:
        return []
    band = ds.GetRasterBand(1)  # ds stays referenced while the band is used (GDAL < 3.8)
    # GDAL 3.6 GTiff loads the band's .aux.xml (PAM, where the category names are) lazily, and
    # GetCategoryNames() alone does not trigger it: on a freshly opened file it returns None.
    # GetNoDataValue() loads the PAM first (the same guard as core/evaluate.py's reader).
    band.GetNoDataValue()
    names = band.GetCategoryNames() or []
    ct = band.GetColorTable()
    out = []
    for i, name in enumerate(names):
        if not name or i == NODATA_CLASS:
            continue
        colour = "#808080"
        if ct is not None and i < ct.GetCount():
            r, g, b = ct.GetColorEntry(i)[:3]
            colour = f"#{r:02X}{g:02X}{b:02X}"
        out.append({"id": i, "name": name, "colour": colour})
    band = None
    ds = None
    return out


def categorized_renderer(classes: Sequence[dict], field: str = "class_id") -> QgsCategorizedSymbolRenderer:
    """A categorised renderer on ``field`` (the class id) with the classes' colours and names."""
    categories = []
    for c in _classes(classes):
        symbol = QgsFillSymbol.createSimple({"color": QColor(c.get("colour") or "#808080").name(),
                                             "outline_color": QColor(c.get("colour") or "#808080").darker(150).name(),
                                             "outline_width": "0.1"})
        categories.append(QgsRendererCategory(int(c["id"]), symbol, str(c["name"])))
    return QgsCategorizedSymbolRenderer(field, categories)


def style_polygon_layer(layer, classes: Sequence[dict], field: str = "class_id") -> None:
    layer.setRenderer(categorized_renderer(classes, field))
    layer.triggerRepaint()


def write_polygon_qml(layer, classes: Sequence[dict], target, field: str = "class_id") -> Optional[Path]:
    style_polygon_layer(layer, classes, field)
    _msg, ok = layer.saveNamedStyle(str(target))
    return Path(target) if ok else None


# Processing keeps only a C++ pointer to a post-processor: the Python objects must be kept alive here.
_KEEP_ALIVE: list = []


class ClassRasterPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles a class raster when Processing loads it into the project."""

    def __init__(self, classes: Sequence[dict], name: Optional[str] = None):
        super().__init__()
        self.classes = list(classes)
        self.name = name

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - Qt API
        if isinstance(layer, QgsRasterLayer):
            style_class_layer(layer, self.classes)
            if self.name:
                layer.setName(self.name)

    @classmethod
    def create(cls, classes, name=None) -> "ClassRasterPostProcessor":
        inst = cls(classes, name)
        _KEEP_ALIVE.append(inst)
        return inst


class ClassPolygonPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles class polygons (categorised on ``class_id``) when Processing loads them."""

    def __init__(self, classes: Sequence[dict], name: Optional[str] = None):
        super().__init__()
        self.classes = list(classes)
        self.name = name

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - Qt API
        if hasattr(layer, "fields") and layer.fields().indexOf("class_id") >= 0:
            style_polygon_layer(layer, self.classes)
            if self.name:
                layer.setName(self.name)

    @classmethod
    def create(cls, classes, name=None) -> "ClassPolygonPostProcessor":
        inst = cls(classes, name)
        _KEEP_ALIVE.append(inst)
        return inst


# -- Find a new class: the relevance raster and the candidate patches ----------------------------------
CANDIDATE_STATUSES = (("pending", "pending review", "#FFD400"), ("accepted", "accepted", "#1A9850"),
                      ("rejected", "rejected", "#D73027"))


def relevance_renderer(layer: QgsRasterLayer, threshold: Optional[float] = None):
    """A single-band pseudocolour ("Viridis") stretched over the scores; cells below ``threshold`` (the
    calibrated one) are drawn transparent so what remains is where the class likely is."""
    from qgis.core import QgsColorRampShader, QgsRasterShader, QgsSingleBandPseudoColorRenderer, QgsStyle

    # All statistics (one pass, as for min/max alone): on QGIS 3.40 sip resolves an explicit
    # Qgis.RasterBandStatistic argument to the deprecated int overload
    stats = layer.dataProvider().bandStatistics(1)
    lo, hi = float(stats.minimumValue), float(stats.maximumValue)
    if threshold is not None and lo < threshold < hi:
        lo = float(threshold)
    if not hi > lo:
        hi = lo + 1e-6
    ramp = QgsStyle.defaultStyle().colorRamp("Viridis")
    shader_fn = QgsColorRampShader(lo, hi, ramp)
    shader_fn.setColorRampType(QgsColorRampShader.Type.Interpolated)
    shader_fn.classifyColorRamp(5, 1)
    shader_fn.setClip(True)  # values outside [lo, hi] (below the threshold) are not drawn
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_fn)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(lo)
    renderer.setClassificationMax(hi)
    renderer.setOpacity(0.75)
    return renderer


def write_relevance_qml(path, threshold: Optional[float] = None) -> Optional[Path]:
    """Style the relevance raster (``relevance_renderer``) and write ``<raster>.qml`` beside it."""
    options = QgsRasterLayer.LayerOptions()
    options.loadDefaultStyle = False
    layer = QgsRasterLayer(str(path), "relevance", "gdal", options)
    if not layer.isValid():
        return None
    layer.setRenderer(relevance_renderer(layer, threshold))
    target = qml_path(path)
    _msg, ok = layer.saveNamedStyle(str(target))
    return target if ok and target.exists() else None


def style_candidate_layer(layer) -> None:
    """Outlines coloured by ``status`` (pending yellow, accepted green, rejected red), the ``rank`` as
    label, and a drop-down (value map) for ``status`` in the attribute form and table."""
    from qgis.core import (QgsEditorWidgetSetup, QgsPalLayerSettings, QgsTextFormat,
                           QgsVectorLayerSimpleLabeling)

    cats = []
    for value, label, colour in CANDIDATE_STATUSES:
        sym = QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": colour, "outline_width": "0.8",
                                         "outline_style": "dash" if value == "rejected" else "solid"})
        cats.append(QgsRendererCategory(value, sym, label))
    layer.setRenderer(QgsCategorizedSymbolRenderer("status", cats))
    idx = layer.fields().indexOf("status")
    if idx >= 0:
        layer.setEditorWidgetSetup(idx, QgsEditorWidgetSetup(
            "ValueMap", {"map": [{label: value} for value, label, _c in CANDIDATE_STATUSES]}))
    if layer.fields().indexOf("rank") >= 0:
        pal = QgsPalLayerSettings()
        pal.fieldName = "rank"
        fmt = QgsTextFormat()
        fmt.setColor(QColor("#FFFFFF"))
        buf = fmt.buffer()
        buf.setEnabled(True)
        buf.setColor(QColor("#000000"))
        fmt.setBuffer(buf)
        pal.setFormat(fmt)
        layer.setLabeling(QgsVectorLayerSimpleLabeling(pal))
        layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def write_candidates_qml(path) -> Optional[Path]:
    """Style ``candidates.gpkg`` (``style_candidate_layer``) and save it as the layer's default style
    inside the GeoPackage (any project that opens it gets it) and as a ``.qml`` beside it."""
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{path}|layername=candidates", "candidates", "ogr")
    if not layer.isValid():
        return None
    style_candidate_layer(layer)
    target = qml_path(path)
    _msg, ok = layer.saveNamedStyle(str(target))
    layer.saveStyleToDatabase("srmf candidates", "SRMF review style: status colours, rank labels", True, "")
    return target if ok and target.exists() else None


class RelevancePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles the relevance raster when Processing loads it."""

    def __init__(self, threshold: Optional[float] = None):
        super().__init__()
        self.threshold = threshold

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - Qt API
        if isinstance(layer, QgsRasterLayer):
            layer.setRenderer(relevance_renderer(layer, self.threshold))
            layer.triggerRepaint()

    @classmethod
    def create(cls, threshold=None) -> "RelevancePostProcessor":
        inst = cls(threshold)
        _KEEP_ALIVE.append(inst)
        return inst


class CandidatesPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles the candidate patches when Processing loads them."""

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - Qt API
        if hasattr(layer, "fields") and layer.fields().indexOf("status") >= 0:
            style_candidate_layer(layer)

    @classmethod
    def create(cls) -> "CandidatesPostProcessor":
        inst = cls()
        _KEEP_ALIVE.append(inst)
        return inst
