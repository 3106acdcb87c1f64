"""srmf:finetune — train an SRMF model on the analyst's rasters and labels (the engine's ``finetune``)."""
from __future__ import annotations

from qgis.core import (QgsCoordinateReferenceSystem, QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsProcessing,
                       QgsProcessingException, QgsProcessingFeedback, QgsProcessingOutputNumber,
                       QgsProcessingParameterBoolean,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterMatrix,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterString, QgsProcessingUtils, QgsWkbTypes)

from ..compat import field_type
from .. import classtable, runtime
from ..layers import field_is_numeric, is_vector, layer_path
from .base import SRMFAlgorithm, absolute, advanced

HELP = """<p>Fine-tunes an SRMF model on your own rasters and labels, with your own classes, using
SRMF's long-tail training (multi-scale anchored crops and rare-class region resampling). Runs in its
own Python process, on a CUDA GPU when there is one (on the CPU it is slow: start with a few hundred
iterations).</p>
<p><b>Training rasters</b> and <b>labels</b>: one label layer per raster, in the same order. A label is
a class raster (pixel value = class) or a polygon layer with a <b>class field</b>; polygons are
rasterised onto the raster's grid (reprojected if needed). Unlabelled pixels are ignored.</p>
<p><b>Class table</b>: one row per class of the new model: name, colour (#RRGGBB), a text prompt (blank:
\"A satellite image of &lt;name&gt;\") and the <b>label value</b> that marks the class in the labels (a pixel
value, or a value of the class field). Classes of the base model not listed are dropped; new names
are added; blank table = the base model's classes, label value = class id. The table can also come
from a CLASSES.json file (advanced).</p>
<p><b>Class table</b> column <i>Renamed from</i>: the base model's class a row continues, so a renamed
class keeps what the model has learnt (blank: the class of the same name, or a new class).</p>
<p><b>Max iterations</b>, <b>batch size</b>, <b>learning rate</b> (AdamW, the paper's 6e-5),
<b>validation share</b> (the part of the labelled data held out to measure per-class IoU: whole rasters
when there are several, else the bottom rows; or give <b>validation rasters</b> and their labels). The best
model by validation mIoU is kept. Advanced: <b>class balancing</b> (SRMF's multi-scale anchored crops
and rare-region resampling; on by default), training crop size, validation interval, gradient
accumulation, <b>freeze the encoder</b> (train the head only: for an encoder pretrained on your
imagery with <i>Pretrain encoder</i> and very few labels), seed, <b>precision</b> (automatic: bf16 autocast where the CPU or GPU runs it natively;
float32: exact) and <b>continue a stopped run</b>.</p>
<p><b>Multispectral models</b> (advanced): <b>Model bands</b> names the new model's bands, red, green, blue
first, then more (nir, rededge, swir1 …), e.g. <i>red,green,blue,nir</i> for NAIP or aerial CIR. The base
model's first layer is widened (its RGB filters kept, the added bands' started from their mean) and the added
bands' mean and spread are computed from the training rasters and stored in the model. The rasters' bands are
found by colour interpretation (RGB) and band description ("NIR", "near-infrared"), or given in <b>Raster
bands</b> (e.g. 1,2,3,4). Segmenting with such a model then needs rasters with those bands.</p>
<p>Output: the fine-tuned model file (.srmf) and a table of the per-class validation IoU.</p>"""


# The engine's recipe defaults (core.finetune.config.TrainConfig and VAL_SHARE), stated here because QGIS
# never imports the engine; tests/core/test_finetune_defaults.py fails when the two drift apart.
TRAINING_DEFAULTS = {"iterations": 2000, "lr": 6e-5, "crop": 512, "eval_interval": 200, "accumulate": 1,
                     "seed": 0, "val_share": 0.2, "class_balancing": True}


class FinetuneAlgorithm(SRMFAlgorithm):
    _name = "finetune"
    _display = "Fine-tune model (train on your classes)"
    _icon = "finetune"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Train an SRMF model on your rasters and labels, with your classes.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self._add_data_parameters()
        self._add_training_parameters()
        self.add_device_parameters()
        self.add_precision_parameter()
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "SEED", self.tr("Random seed"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=TRAINING_DEFAULTS["seed"], minValue=0)))
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            "RESUME", self.tr("Continue a stopped run of the same output (from its checkpoint)"), defaultValue=False)))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_MODEL", self.tr("Fine-tuned model"), fileFilter="SRMF model (*.srmf)"))
        self.addParameter(QgsProcessingParameterFeatureSink(
            "OUTPUT_METRICS", self.tr("Per-class validation IoU"), QgsProcessing.SourceType.TypeVector, optional=True,
            createByDefault=True))
        self.addOutput(QgsProcessingOutputNumber("MIOU", self.tr("Validation mIoU")))

    def _add_data_parameters(self):
        """Training rasters and labels, the class table, the base model."""
        self.addParameter(QgsProcessingParameterMultipleLayers(
            "INPUT_RASTERS", self.tr("Training rasters"), QgsProcessing.SourceType.TypeRaster))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            "LABELS", self.tr("Labels, one per raster in the same order (class rasters or polygon layers)"),
            QgsProcessing.SourceType.TypeMapLayer))
        self.addParameter(QgsProcessingParameterString(
            "LABEL_FIELD", self.tr("Class field of the polygon labels"), optional=True))
        self.addParameter(QgsProcessingParameterMatrix(
            "CLASS_TABLE", self.tr("Class table [blank: the base model's classes]"), numberRows=0,
            hasFixedNumberRows=False, headers=classtable.COLUMNS, optional=True))
        self.addParameter(advanced(QgsProcessingParameterFile(
            "CLASSES_FILE", self.tr("Class table file (CLASSES.json) [instead of the table above]"),
            extension="json", optional=True)))
        self.addParameter(QgsProcessingParameterFile(
            "BASE_MODEL", self.tr("Base model (.srmf) [blank: the embedded default model]"),
            extension="srmf", optional=True))
        self.addParameter(advanced(QgsProcessingParameterString(
            "MODEL_BANDS", self.tr("Model bands by name, e.g. red,green,blue,nir [blank: the base model's; more bands "
                                   "widen its first layer; the rasters' bands are found by colour or description]"),
            optional=True)))
        self.addParameter(advanced(QgsProcessingParameterString(
            "RASTER_BANDS", self.tr("The training rasters' bands in that order, e.g. 1,2,3,4 [blank: automatic]"),
            optional=True)))

    def _add_training_parameters(self):
        """The recipe (defaults: :data:`TRAINING_DEFAULTS`) and the validation data."""
        d = TRAINING_DEFAULTS
        self.addParameter(QgsProcessingParameterNumber(
            "MAX_ITERATIONS", self.tr("Max iterations"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=d["iterations"], minValue=1, maxValue=10_000_000))
        self.addParameter(QgsProcessingParameterNumber(
            "BATCH_SIZE", self.tr("Batch size [blank: automatic]"), QgsProcessingParameterNumber.Type.Integer,
            optional=True, minValue=1, maxValue=1024))
        lr = QgsProcessingParameterNumber("LEARNING_RATE", self.tr("Learning rate"),
                                          QgsProcessingParameterNumber.Type.Double, defaultValue=d["lr"],
                                          minValue=1e-8, maxValue=1.0)
        lr.setMetadata({"widget_wrapper": {"decimals": 8}})
        self.addParameter(advanced(lr))
        self.addParameter(QgsProcessingParameterNumber(
            "VALIDATION_SHARE", self.tr("Validation share (0-0.9, held out by region)"),
            QgsProcessingParameterNumber.Type.Double, defaultValue=d["val_share"], minValue=0.0, maxValue=0.9))
        self.addParameter(advanced(QgsProcessingParameterMultipleLayers(
            "VALIDATION_RASTERS", self.tr("Validation rasters [instead of the validation share]"),
            QgsProcessing.SourceType.TypeRaster, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterMultipleLayers(
            "VALIDATION_LABELS", self.tr("Labels of the validation rasters (same order)"),
            QgsProcessing.SourceType.TypeMapLayer, optional=True)))
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            "CLASS_BALANCING", self.tr("Class balancing (SRMF's multi-scale anchored crops and rare-region "
                                       "resampling)"), defaultValue=d["class_balancing"])))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "CROP_SIZE", self.tr("Training crop size (pixels)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=d["crop"], minValue=64, maxValue=4096)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "VALIDATION_INTERVAL", self.tr("Validate every N iterations"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=d["eval_interval"], minValue=1)))
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            "FREEZE_ENCODER", self.tr("Freeze the encoder (train the decode head only: for a pretrained encoder "
                                      "and very few labels)"), defaultValue=False)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "ACCUMULATE", self.tr("Gradient accumulation steps (for small GPUs)"),
            QgsProcessingParameterNumber.Type.Integer, defaultValue=d["accumulate"], minValue=1, maxValue=256)))

    # ---------------------------------------------------------------------------------------------
    def class_entries(self, parameters, context, labels):
        """The class table (matrix or file) with label values typed for the labels; [] = none given."""
        matrix = self.parameterAsMatrix(parameters, "CLASS_TABLE", context) if parameters.get("CLASS_TABLE") else []
        file = (self.parameterAsFile(parameters, "CLASSES_FILE", context) or "").strip()
        try:
            if matrix and file:
                raise classtable.ClassTableError("Give the class table either as a table or as a CLASSES.json file, "
                                                 "not both.")
            entries = classtable.read_json(file) if file else classtable.from_matrix(matrix)
            if not entries:
                return []
            classtable.validate(entries)
        except classtable.ClassTableError as exc:
            raise QgsProcessingException(str(exc)) from None
        field = (self.parameterAsString(parameters, "LABEL_FIELD", context) or "").strip()
        vectors = [l for l in labels if is_vector(l)]
        numeric = None
        if vectors and field:
            numeric = bool(field_is_numeric(vectors[0], field))
        if any(not is_vector(l) for l in labels):
            numeric = True if not vectors else numeric
        try:
            for e in entries:
                e.value = classtable.coerce_value(e.value, numeric)
        except classtable.ClassTableError as exc:
            raise QgsProcessingException(f"Class table: {exc}") from None
        return entries

    def check_labels(self, rasters, labels, field):
        if not rasters:
            raise QgsProcessingException("No training raster: choose at least one raster layer.")
        if len(labels) != len(rasters):
            raise QgsProcessingException(
                f"Give one label layer per training raster, in the same order: {len(rasters)} raster(s), "
                f"{len(labels)} label layer(s).")
        for lab in labels:
            if is_vector(lab):
                if not field:
                    raise QgsProcessingException(
                        f"The label layer '{lab.name()}' is a polygon layer: set the class field (the attribute "
                        "that says which class each polygon is).")
                if lab.fields().indexOf(field) < 0:
                    names = ", ".join(lab.fields().names()) or "none"
                    raise QgsProcessingException(
                        f"The label layer '{lab.name()}' has no field '{field}' (its fields: {names}).")
                if lab.featureCount() == 0:
                    raise QgsProcessingException(f"The label layer '{lab.name()}' has no polygons.")

    def checkParameterValues(self, parameters, context):  # noqa: N802
        """Refuse bad input before anything runs, with the reason (the dialog shows it at once)."""
        ok, msg = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, msg
        try:
            rasters = self.parameterAsLayerList(parameters, "INPUT_RASTERS", context)
            labels = self.parameterAsLayerList(parameters, "LABELS", context)
            field = (self.parameterAsString(parameters, "LABEL_FIELD", context) or "").strip()
            self.check_labels(rasters, labels, field)
            self.class_entries(parameters, context, labels)
        except QgsProcessingException as exc:
            return False, str(exc)
        return True, ""

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        """Runs in the main thread: check the layers and turn them into files (exporting layers that
        are not plain files), build the engine's command."""
        rasters = self.parameterAsLayerList(parameters, "INPUT_RASTERS", context)
        labels = self.parameterAsLayerList(parameters, "LABELS", context)
        field = (self.parameterAsString(parameters, "LABEL_FIELD", context) or "").strip()
        self.check_labels(rasters, labels, field)
        entries = self.class_entries(parameters, context, labels)
        base = self.model_path(parameters, "BASE_MODEL", context, "base model")
        output = absolute(self.parameterAsFileOutput(parameters, "OUTPUT_MODEL", context))
        if not output.lower().endswith(".srmf"):
            output += ".srmf"
        args = [output, "--overwrite", "--device", self.device_arg(parameters, context),
                *self.precision_args(parameters, context)]
        for r in rasters:
            args += ["--raster", layer_path(r, context, feedback, "training raster")]
        for lab in labels:
            args += ["--labels", layer_path(lab, context, feedback, "label layer")]
        if field:
            args += ["--label-field", field]
        args += self._class_args(entries, feedback)
        if base:
            args += ["--base-model", base]
        args += self._recipe_args(parameters, context)
        args += self._validation_args(parameters, context, feedback, field)
        args += self._advanced_args(parameters, context)
        self._args, self._output = args, output
        return True

    def _class_args(self, entries, feedback) -> list:
        """``--classes FILE`` (the table written as CLASSES.json) when a class table was given."""
        if not entries:
            return []
        classes_json = QgsProcessingUtils.generateTempFilename("srmf_classes.json")
        classtable.write_json(entries, classes_json)
        (feedback or QgsProcessingFeedback()).pushInfo("Classes of the new model: " + ", ".join(
            f"{i} {e.name} (label value {e.value if e.value is not None else i})"
            for i, e in enumerate(classtable.fill_defaults(entries))))
        return ["--classes", classes_json]

    def _recipe_args(self, parameters, context) -> list:
        """Iterations, batch size, learning rate, validation share and seed as engine arguments."""
        args = ["--iterations", str(self.parameterAsInt(parameters, "MAX_ITERATIONS", context))]
        bs = self.optional_int(parameters, "BATCH_SIZE", context)
        if bs is not None:
            args += ["--batch-size", str(bs)]
        lr = self.optional_double(parameters, "LEARNING_RATE", context)
        if lr is not None:
            args += ["--lr", repr(float(lr))]
        share = self.optional_double(parameters, "VALIDATION_SHARE", context)
        if share is not None:
            args += ["--val-share", repr(float(share))]
        return args + ["--seed", str(self.parameterAsInt(parameters, "SEED", context))]

    def _validation_args(self, parameters, context, feedback, field) -> list:
        """``--val-raster``/``--val-labels`` pairs of the separate validation layers (checked like the
        training ones)."""
        val_rasters = self.parameterAsLayerList(parameters, "VALIDATION_RASTERS", context) \
            if parameters.get("VALIDATION_RASTERS") else []
        val_labels = self.parameterAsLayerList(parameters, "VALIDATION_LABELS", context) \
            if parameters.get("VALIDATION_LABELS") else []
        args = []
        if val_rasters or val_labels:
            if len(val_rasters) != len(val_labels):
                raise QgsProcessingException(
                    f"Give one label layer per validation raster, in the same order: {len(val_rasters)} raster(s), "
                    f"{len(val_labels)} label layer(s).")
            self.check_labels(val_rasters, val_labels, field)
            for r in val_rasters:
                args += ["--val-raster", layer_path(r, context, feedback, "validation raster")]
            for lab in val_labels:
                args += ["--val-labels", layer_path(lab, context, feedback, "validation labels")]
        return args

    def _advanced_args(self, parameters, context) -> list:
        """Class balancing off, crop size, validation interval, accumulation, resume."""
        args = []
        if "CLASS_BALANCING" in parameters and not self.parameterAsBoolean(parameters, "CLASS_BALANCING", context):
            args += ["--no-mars", "--no-srr"]
        for name, flag in (("CROP_SIZE", "--crop"), ("VALIDATION_INTERVAL", "--eval-interval"),
                           ("ACCUMULATE", "--accumulate")):
            value = self.optional_int(parameters, name, context)
            if value is not None:
                args += [flag, str(value)]
        if self.parameterAsBoolean(parameters, "RESUME", context):
            args.append("--resume")
        if "FREEZE_ENCODER" in parameters and self.parameterAsBoolean(parameters, "FREEZE_ENCODER", context):
            args.append("--freeze-encoder")
        for name, flag in (("MODEL_BANDS", "--model-bands"), ("RASTER_BANDS", "--bands")):
            text = (self.parameterAsString(parameters, name, context) or "").replace(" ", "")
            if text:
                args += [flag, text]
        return args

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        args, output = self._args, self._output
        result = self.run_engine("finetune", args, feedback, outputs=[output], progress_range=(0.0, 99.0))
        model = result.get("output") or output
        runtime.set_setting(runtime.SETTINGS_LAST_MODEL, model)
        metrics = result.get("metrics") or {}
        per_class = metrics.get("per_class_iou") or {}
        miou = metrics.get("miou")
        lines = [f"Fine-tuned model: {model}",
                 "Validation mIoU: " + (f"{miou:.4f}" if isinstance(miou, (int, float)) else "n/a")]
        lines += [f"  {name:<20s} IoU {v:.4f}" if isinstance(v, (int, float)) else f"  {name:<20s} IoU n/a"
                  for name, v in per_class.items()]
        feedback.pushInfo("\n".join(lines))

        results = {"OUTPUT_MODEL": model, "MIOU": miou, "PER_CLASS_IOU": per_class,
                   "CLASSES": result.get("classes") or []}
        fields = QgsFields()
        fields.append(QgsField("class_id", field_type("Int")))
        fields.append(QgsField("class_name", field_type("String")))
        fields.append(QgsField("iou", field_type("Double")))
        sink, sink_id = self.parameterAsSink(parameters, "OUTPUT_METRICS", context, fields, QgsWkbTypes.Type.NoGeometry,
                                             QgsCoordinateReferenceSystem())
        if sink is not None:
            ids = {c.get("name"): c.get("id") for c in result.get("classes") or []}
            for name, v in per_class.items():
                f = QgsFeature(fields)
                f.setAttributes([ids.get(name), name, v if isinstance(v, (int, float)) else None])
                sink.addFeature(f, QgsFeatureSink.Flag.FastInsert)
            results["OUTPUT_METRICS"] = sink_id
        feedback.setProgress(100.0)
        return results
