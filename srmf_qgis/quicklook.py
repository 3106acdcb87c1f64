"""A PNG quick-look of a segmentation: the input raster beside the styled class raster drawn over it,
with a legend of the model's classes and their areas. Rendered offscreen with QGIS's map renderer."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from qgis.core import QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import QRectF, QSize, Qt
from qgis.PyQt.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter


def render_map(layers: Sequence, extent: QgsRectangle, crs, size: QSize) -> QImage:
    """Render ``layers`` (top first) over ``extent`` into an image of ``size`` pixels."""
    settings = QgsMapSettings()
    settings.setLayers(list(layers))
    settings.setDestinationCrs(crs)
    settings.setOutputSize(size)
    settings.setExtent(extent)
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def wrap_text(text: str, metrics: QFontMetricsF, width: float) -> list:
    """``text`` broken into lines no wider than ``width`` pixels in ``metrics``' font, at spaces (a word wider
    than the line stands alone); its own line breaks are kept."""
    lines = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and metrics.horizontalAdvance(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def render_quicklook(input_layer: QgsRasterLayer, class_layer: QgsRasterLayer, path, classes: Sequence[dict] = (),
                     areas: Optional[Sequence[dict]] = None, panel: int = 512, title: str = "",
                     opacity: float = 0.65, caption: str = "") -> Path:
    """Write a PNG: left the input raster, right the class raster at ``opacity`` over it, a legend below and,
    when given, a ``caption`` under it (plain text, word-wrapped to the picture's width: what the map gets
    right and wrong, for a reader who has only the picture)."""
    extent = input_layer.extent()
    aspect = extent.height() / extent.width() if extent.width() else 1.0
    size = QSize(panel, max(1, int(round(panel * aspect))))
    crs = input_layer.crs()
    left = render_map([input_layer], extent, crs, size)
    class_layer.setOpacity(opacity)
    right = render_map([class_layer, input_layer], extent, crs, size)
    class_layer.setOpacity(1.0)
    names = [c for c in classes] or [{"name": c.label, "colour": c.color.name()} for c in class_layer.renderer().classes()]
    area_by_name = {a["name"]: a for a in (areas or [])}
    legend_h = 50 + 22 * ((len(names) + 1) // 2) + 10
    head = 34
    caption_font = QFont("sans-serif")
    caption_font.setPixelSize(13)
    caption_lines = wrap_text(caption, QFontMetricsF(caption_font), 2 * panel + 10) if caption else []
    caption_h = 18 * len(caption_lines) + 12 if caption_lines else 0
    img = QImage(2 * panel + 30, head + size.height() + legend_h + caption_h, QImage.Format.Format_ARGB32)
    img.fill(QColor("white"))
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    font = QFont("sans-serif")
    font.setPixelSize(15)
    font.setBold(True)
    p.setFont(font)
    p.setPen(QColor("#222222"))
    p.drawText(QRectF(10, 6, 2 * panel + 10, 24), Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
               title or f"SRMF segmentation of {input_layer.name()} ({crs.authid() or 'no CRS'})")
    p.drawImage(10, head, left)
    p.drawImage(20 + panel, head, right)
    p.setPen(QColor("#444444"))
    p.drawRect(10, head, size.width() - 1, size.height() - 1)
    p.drawRect(20 + panel, head, size.width() - 1, size.height() - 1)
    font.setBold(False)
    font.setPixelSize(13)
    p.setFont(font)
    y0 = head + size.height() + 10
    p.drawText(QRectF(10, y0, panel, 18), Qt.AlignmentFlag.AlignLeft, "Input raster")
    p.drawText(QRectF(20 + panel, y0, panel, 18), Qt.AlignmentFlag.AlignLeft, "Classes (model colours) over the input")
    font.setBold(True)
    p.setFont(font)
    p.drawText(QRectF(10, y0 + 24, 2 * panel, 18), Qt.AlignmentFlag.AlignLeft,
               "Legend (class \u2014 area)" if areas else "Legend")
    font.setBold(False)
    p.setFont(font)
    rows = (len(names) + 1) // 2
    for i, c in enumerate(names):
        col, row = i // max(1, rows), i % max(1, rows)
        x = 10 + col * (panel + 10)
        y = y0 + 46 + row * 22
        p.fillRect(x, y, 16, 16, QColor(c.get("colour") or "#808080"))
        p.setPen(QColor("#444444"))
        p.drawRect(x, y, 16, 16)
        a = area_by_name.get(c["name"])
        text = c["name"]
        if a is not None:
            text += f" \u2014 {a['area_ha']:.4f} ha" if a.get("area_ha") is not None else f" \u2014 {a['pixels']} px"
        p.setPen(QColor("#222222"))
        p.drawText(QRectF(x + 24, y - 1, panel - 30, 18), Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, text)
    p.setFont(caption_font)
    p.setPen(QColor("#222222"))
    for i, line in enumerate(caption_lines):
        p.drawText(QRectF(10, head + size.height() + legend_h + 18 * i, 2 * panel + 10, 18),
                   Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, line)
    p.end()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not img.save(str(path), "PNG"):
        raise OSError(f"could not write {path}")
    return path
