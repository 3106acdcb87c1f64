"""srmf:evaluate — accuracy of a classified raster against a reference (the engine's ``evaluate``)."""
from __future__ import annotations

import json

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsFeatureSink, QgsField, QgsFields,
                       QgsProcessing, QgsProcessingException, QgsProcessingOutputNumber,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterMapLayer,
                       QgsProcessingParameterMatrix, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString, QgsProcessingUtils, QgsWkbTypes)

from ..compat import field_type
from .. import classtable, styling
from ..layers import field_is_numeric, is_vector, layer_path, raster_source
from .base import SRMFAlgorithm, absolute, advanced

HELP = """<p>Measures the accuracy of a classified raster (for example the output of <i>Segment raster</i>)
against a reference: a class raster, or a polygon layer with a class field (rasterised onto the
classified raster's grid). Pixels that are nodata or unlabelled in either are left out.</p>
<p>Reports overall accuracy, Cohen's kappa, per-class precision, recall, F1 and IoU, the mean IoU
(mIoU) and the mIoU of the tail classes (the classes below the median pixel frequency), and the
confusion matrix in the log. The per-class table is written as a table layer and, optionally, as CSV
and JSON files.</p>
<p><b>Class table</b> (optional): maps the reference's values to the prediction's classes by name:
one row per class with its name and the <b>label value</b> that marks it in the reference (a pixel value
or a value of the class field). Blank: the reference uses the prediction's class ids.</p>"""


class EvaluateAlgorithm(SRMFAlgorithm):
    _name = "evaluate"
    _display = "Evaluate accuracy"
    _icon = "evaluate"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Accuracy of a classified raster against a reference raster or polygons.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("PREDICTION", self.tr("Classified raster (prediction)")))
        self.addParameter(QgsProcessingParameterMapLayer(
            "REFERENCE", self.tr("Reference (class raster or polygon layer)"),
            types=[QgsProcessing.SourceType.TypeRaster, QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString(
            "REFERENCE_FIELD", self.tr("Class field of the reference polygons"), optional=True))
        self.addParameter(QgsProcessingParameterMatrix(
            "CLASS_TABLE", self.tr("Class table [blank: the reference uses the prediction's class ids]"),
            numberRows=0, hasFixedNumberRows=False, headers=classtable.EVAL_COLUMNS, optional=True))
        self.addParameter(advanced(QgsProcessingParameterFile(
            "CLASSES_FILE", self.tr("Class table file (CLASSES.json) [instead of the table above]"),
            extension="json", optional=True)))
        self.addParameter(QgsProcessingParameterFeatureSink(
            "OUTPUT_TABLE", self.tr("Accuracy per class"), QgsProcessing.SourceType.TypeVector, optional=True,
            createByDefault=True))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_CSV", self.tr("Accuracy report (CSV)"), fileFilter="CSV files (*.csv)", optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_JSON", self.tr("Accuracy report (JSON, with the confusion matrix)"),
            fileFilter="JSON files (*.json)", optional=True, createByDefault=False))
        for name, desc in (("OVERALL_ACCURACY", "Overall accuracy"), ("KAPPA", "Kappa"), ("MIOU", "mIoU"),
                           ("TAIL_MIOU", "Tail-class mIoU")):
            self.addOutput(QgsProcessingOutputNumber(name, self.tr(desc)))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        """Refuse bad input before anything runs, with the reason."""
        ok, msg = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, msg
        ref = self.parameterAsLayer(parameters, "REFERENCE", context)
        field = (self.parameterAsString(parameters, "REFERENCE_FIELD", context) or "").strip()
        if is_vector(ref):
            if not field:
                return False, (f"The reference '{ref.name()}' is a polygon layer: set the class field (the attribute "
                               "that says which class each polygon is).")
            if ref.fields().indexOf(field) < 0:
                return False, (f"The reference layer '{ref.name()}' has no field '{field}' "
                               f"(its fields: {', '.join(ref.fields().names()) or 'none'}).")
        return True, ""

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        """Runs in the main thread: check the layers, turn them into files, build the engine's command."""
        pred_layer = self.parameterAsRasterLayer(parameters, "PREDICTION", context)
        if pred_layer is None:
            raise QgsProcessingException("The classified raster could not be opened.")
        ref = self.parameterAsLayer(parameters, "REFERENCE", context)
        if ref is None:
            raise QgsProcessingException("The reference layer could not be opened.")
        field = (self.parameterAsString(parameters, "REFERENCE_FIELD", context) or "").strip()
        if is_vector(ref):
            if not field:
                raise QgsProcessingException(
                    f"The reference '{ref.name()}' is a polygon layer: set the class field (the attribute that "
                    "says which class each polygon is).")
            if ref.fields().indexOf(field) < 0:
                raise QgsProcessingException(f"The reference layer '{ref.name()}' has no field '{field}' "
                                             f"(its fields: {', '.join(ref.fields().names()) or 'none'}).")
        args = [raster_source(pred_layer, "classified raster"), layer_path(ref, context, feedback, "reference")]
        if field and is_vector(ref):
            args += ["--reference-field", field]
        matrix = self.parameterAsMatrix(parameters, "CLASS_TABLE", context) if parameters.get("CLASS_TABLE") else []
        file = (self.parameterAsFile(parameters, "CLASSES_FILE", context) or "").strip()
        try:
            if matrix and file:
                raise classtable.ClassTableError("Give the class table either as a table or as a file, not both.")
            entries = classtable.read_json(file) if file else classtable.from_matrix(matrix, len(classtable.EVAL_COLUMNS))
            if entries:
                classtable.validate(entries)
                numeric = bool(field_is_numeric(ref, field)) if is_vector(ref) else True
                for e in entries:
                    e.value = classtable.coerce_value(e.value, numeric)
        except classtable.ClassTableError as exc:
            raise QgsProcessingException(str(exc)) from None
        if entries:
            path = QgsProcessingUtils.generateTempFilename("srmf_classes.json")
            data = classtable.to_json(entries)
            data["classes"] = match_prediction_ids(data["classes"], raster_source(pred_layer), feedback)
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, ensure_ascii=False)
            args += ["--classes", path]
        args.append("--overwrite")  # Processing destinations replace existing files (the dialog asked)
        csv = self.parameterAsFileOutput(parameters, "OUTPUT_CSV", context) if parameters.get("OUTPUT_CSV") else ""
        js = self.parameterAsFileOutput(parameters, "OUTPUT_JSON", context) if parameters.get("OUTPUT_JSON") else ""
        if csv:
            args += ["--output-csv", absolute(csv)]
        if js:
            args += ["--output-json", absolute(js)]
        self._args, self._csv, self._json = args, csv, js
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        args, csv, js = self._args, self._csv, self._json
        result = self.run_engine("evaluate", args, feedback, outputs=[p for p in (csv, js) if p],
                                 progress_range=(0.0, 95.0))
        feedback.pushInfo(summary_text(result))

        fields = QgsFields()
        for name, ftype in (("class_id", field_type("Int")), ("class_name", field_type("String")), ("precision", field_type("Double")),
                            ("recall", field_type("Double")), ("f1", field_type("Double")), ("iou", field_type("Double")),
                            ("support", field_type("LongLong")),
                            ("tail_class", field_type("Bool"))):
            fields.append(QgsField(name, ftype))
        results = {"OVERALL_ACCURACY": result.get("overall_accuracy"), "KAPPA": result.get("kappa"),
                   "MIOU": result.get("miou"), "TAIL_MIOU": result.get("tail_miou"),
                   "PER_CLASS": result.get("per_class") or [], "CONFUSION_MATRIX": result.get("confusion_matrix")}
        sink, sink_id = self.parameterAsSink(parameters, "OUTPUT_TABLE", context, fields, QgsWkbTypes.Type.NoGeometry,
                                             QgsCoordinateReferenceSystem())
        if sink is not None:
            for row in result.get("per_class") or []:
                f = QgsFeature(fields)
                f.setAttributes([row.get("id"), row.get("name"), row.get("precision"), row.get("recall"),
                                 row.get("f1"), row.get("iou"), row.get("support"),
                                 bool(row.get("tail", row.get("tail_class", False)))])
                sink.addFeature(f, QgsFeatureSink.Flag.FastInsert)
            results["OUTPUT_TABLE"] = sink_id
        if csv:
            results["OUTPUT_CSV"] = result.get("csv") or absolute(csv)
        if js:
            results["OUTPUT_JSON"] = absolute(js)
        feedback.setProgress(100.0)
        return results


def match_prediction_ids(classes, prediction: str, feedback=None):
    """Give each class of the table the id it has in the prediction (matched by name, from the
    prediction's category names); names the prediction lacks get new ids (nothing predicted)."""
    pred = {c["name"].lower(): int(c["id"]) for c in styling.classes_from_raster(prediction)}
    if not pred:
        return [dict(c, id=i) for i, c in enumerate(classes)]
    used = set(pred.values())
    next_id = max(used) + 1
    out = []
    for c in classes:
        cid = pred.get(str(c["name"]).lower())
        if cid is None:
            cid = next_id
            next_id += 1
            if feedback is not None:
                feedback.pushWarning(f"The class '{c['name']}' is not a class of the prediction "
                                     f"({', '.join(sorted(pred))}): it is evaluated as never predicted.")
        out.append(dict(c, id=cid))
    return out


def _fmt(v, digits=4):
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def summary_text(result: dict) -> str:
    """The accuracy summary, per-class table and confusion matrix as plain text."""
    lines = [f"Overall accuracy {_fmt(result.get('overall_accuracy'))}   kappa {_fmt(result.get('kappa'))}   "
             f"mIoU {_fmt(result.get('miou'))}   tail-class mIoU {_fmt(result.get('tail_miou'))}",
             f"{'class':<20s} {'precision':>9s} {'recall':>9s} {'F1':>9s} {'IoU':>9s} {'support':>12s}"]
    per_class = result.get("per_class") or []
    for r in per_class:
        name = str(r.get("name")) + (" *" if r.get("tail") else "")
        lines.append(f"{name:<20s} {_fmt(r.get('precision')):>9s} {_fmt(r.get('recall')):>9s} "
                     f"{_fmt(r.get('f1')):>9s} {_fmt(r.get('iou')):>9s} {r.get('support', ''):>12}")
    if any(r.get("tail") for r in per_class):
        lines.append("* tail classes (reference frequency below the median)")
    cm = result.get("confusion_matrix")
    if cm:
        names = [str(r.get("name")) for r in per_class] if len(per_class) == len(cm) else [str(i) for i in range(len(cm))]
        width = max(8, *(len(n) for n in names)) + 1
        lines.append("Confusion matrix (pixels; rows: reference, columns: prediction):")
        lines.append(" " * width + "".join(f"{n[:width - 1]:>{width}s}" for n in names))
        for n, row in zip(names, cm):
            lines.append(f"{n[:width - 1]:<{width}s}" + "".join(f"{int(v):>{width}d}" for v in row))
    return "\n".join(lines)
