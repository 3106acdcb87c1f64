"""srmf:modelinfo — what a model file holds: classes, colours, prompts, backbone, GSD, metrics."""
from __future__ import annotations

import html
import json

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsFeatureSink, QgsField, QgsFields,
                       QgsProcessing, QgsProcessingOutputNumber, QgsProcessingOutputString,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsWkbTypes)

from ..compat import field_type
from .base import SRMFAlgorithm, absolute

HELP = """<p>Shows what an SRMF model file (.srmf) holds: its classes with their colours and text prompts,
the backbone, the text encoder, the expected bands, the ground sample distance of its training
imagery, the tile size and stride, how it was trained and its validation metrics. Blank model = the
model embedded in the plugin. The classes are also written as a table, and the whole description as
an HTML report (shown in the Results Viewer).</p>"""


class ModelInfoAlgorithm(SRMFAlgorithm):
    _name = "modelinfo"
    _display = "Model information"
    _icon = "info"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Classes, colours, prompts, backbone, GSD and metrics of a model file.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(
            "MODEL", self.tr("Model file (.srmf) [blank: the embedded default model]"), extension="srmf",
            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSink(
            "OUTPUT_CLASSES", self.tr("Model classes"), QgsProcessing.SourceType.TypeVector, optional=True,
            createByDefault=True))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_HTML", self.tr("Model report"), fileFilter="HTML files (*.html)", optional=True,
            createByDefault=True))
        self.addOutput(QgsProcessingOutputString("BACKBONE", self.tr("Backbone")))
        self.addOutput(QgsProcessingOutputNumber("CLASS_COUNT", self.tr("Number of classes")))
        self.addOutput(QgsProcessingOutputNumber("GSD_M", self.tr("Ground sample distance (m)")))
        self.addOutput(QgsProcessingOutputString("METRICS", self.tr("Metrics (JSON)")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        model = self.model_path(parameters, "MODEL", context)
        result = self.run_engine("info", [model] if model else [], feedback, require_torch=False)
        header = result.get("header") or {}
        path = result.get("model") or model
        # the engine's own description (core.model.modelfile.describe), so the log matches `python -m core info`
        feedback.pushInfo(result.get("description") or json.dumps(header, indent=2))
        classes = sorted(header.get("classes") or [], key=lambda c: int(c["id"]))
        prov = header.get("provenance") or {}
        if prov.get("untrained"):
            feedback.pushWarning("This model is an UNTRAINED PLACEHOLDER: its predictions are not meaningful. "
                                 "Fine-tune it on your labels (Fine-tune model) or use a trained model.")
        results = {"MODEL": path, "BACKBONE": (header.get("architecture") or {}).get("backbone"),
                   "CLASS_COUNT": len(classes), "GSD_M": header.get("gsd_m"),
                   "METRICS": json.dumps(header.get("metrics") or {}), "CLASSES": classes, "HEADER": header}
        fields = QgsFields()
        for name, ftype in (("class_id", field_type("Int")), ("class_name", field_type("String")),
                            ("colour", field_type("String")), ("prompt", field_type("String"))):
            fields.append(QgsField(name, ftype))
        sink, sink_id = self.parameterAsSink(parameters, "OUTPUT_CLASSES", context, fields, QgsWkbTypes.Type.NoGeometry,
                                             QgsCoordinateReferenceSystem())
        if sink is not None:
            for c in classes:
                f = QgsFeature(fields)
                f.setAttributes([int(c["id"]), c.get("name"), c.get("colour"), c.get("prompt")])
                sink.addFeature(f, QgsFeatureSink.Flag.FastInsert)
            results["OUTPUT_CLASSES"] = sink_id
        out_html = self.parameterAsFileOutput(parameters, "OUTPUT_HTML", context) if parameters.get("OUTPUT_HTML") else ""
        if out_html:
            out_html = absolute(out_html)
            with open(out_html, "w", encoding="utf-8") as fh:
                fh.write(html_report(header, path))
            results["OUTPUT_HTML"] = out_html
        return results


def html_report(header: dict, path) -> str:
    e = html.escape
    arch = header.get("architecture") or {}
    inf = header.get("inference") or {}
    prov = header.get("provenance") or {}
    rows = "".join(
        f"<tr><td>{int(c['id'])}</td><td><span style='display:inline-block;width:1.2em;height:1.2em;"
        f"background:{e(str(c.get('colour', '#808080')))};border:1px solid #444'></span> {e(str(c.get('colour', '')))}</td>"
        f"<td><b>{e(str(c.get('name', '')))}</b></td><td>{e(str(c.get('prompt', '')))}</td></tr>"
        for c in sorted(header.get("classes") or [], key=lambda c: int(c["id"])))
    warn = ("<p style='color:#b00'><b>Untrained placeholder:</b> predictions are not meaningful.</p>"
            if prov.get("untrained") else "")
    metrics = header.get("metrics")
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>SRMF model</title></head><body>
<h2>SRMF model {e(str(path))}</h2>{warn}
<p>Backbone <b>{e(str(arch.get('backbone')))}</b>; text encoder {e(str((header.get('text_encoder') or {}).get('id')))};
ground sample distance {e(str(header.get('gsd_m') or 'unknown'))} m; tile size {e(str(inf.get('window')))} px,
stride {e(str(inf.get('stride')))} px.</p>
<table border="1" cellspacing="0" cellpadding="4"><tr><th>id</th><th>colour</th><th>class</th><th>prompt</th></tr>{rows}</table>
<h3>Metrics</h3><pre>{e(json.dumps(metrics, indent=2)) if metrics else 'none recorded'}</pre>
<h3>Provenance</h3><pre>{e(json.dumps(prov, indent=2))}</pre>
</body></html>"""
