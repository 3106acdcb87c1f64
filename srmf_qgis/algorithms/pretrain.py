"""srmf:pretrain — self-supervised pretraining of a model's encoder on unlabelled raster layers (the engine's
``pretrain``: SimCLR, GraSS)."""
from __future__ import annotations

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingOutputNumber,
                       QgsProcessingParameterEnum, QgsProcessingParameterFile, QgsProcessingParameterFileDestination,
                       QgsProcessingParameterMultipleLayers, QgsProcessingParameterNumber,
                       QgsProcessingParameterString)

from ..layers import layer_path
from .base import SRMFAlgorithm, absolute, advanced

HELP = """<p><b>Experimental.</b> Pretrains the encoder (backbone) of an SRMF model on your own
<b>unlabelled</b> rasters, so that a later fine-tune with few labels starts from features of your imagery
rather than ImageNet's. No labels are needed: the model learns to recognise two randomly cropped,
recoloured views of the same window among the other windows of a batch (<b>SimCLR</b>, the default).
<b>GraSS</b> runs that for half the budget, then trains on the part of each view that the loss's gradient
points to, meant to hold a single ground object (Zhang et al., TGRS 2023); in our measurement it did not
beat SimCLR.</p>
<p>The output model has <b>no trained classes</b>: its decode head is untrained, and Segment refuses it.
Use it as the <b>base model</b> of <i>Fine-tune model</i> (or the fine-tune dialog), which trains a new head
for your classes on it; <i>Freeze the encoder</i> there trains the head only.</p>
<p><b>Cost</b>: a step is two forward passes and one backward pass over a batch of 224 px views; on a
2-core CPU about 3-4 s per step of 16 windows, on a GPU a fraction of that. Give the budget in minutes
(or steps). What it buys was measured on the Dubai tiles at a CPU budget: see the README (Pretraining);
at such budgets it did not beat ImageNet initialisation reliably.</p>
<p>Windows that are mostly nodata are skipped; a 1-band raster is replicated; uint16 and float rasters
are scaled as for segmentation. Cancel stops at once and keeps the last checkpoint (continue with the
engine's <i>--resume</i>).</p>"""

METHODS = ["SimCLR (instance discrimination)", "GraSS (SimCLR warm-up, then gradient-guided sampling)"]
METHOD_ARGS = ["simclr", "grass"]


class PretrainAlgorithm(SRMFAlgorithm):
    _name = "pretrain"
    _display = "Pretrain encoder on unlabelled rasters (self-supervised, experimental)"
    _icon = "finetune"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Self-supervised pretraining of a model's encoder on your unlabelled rasters (GraSS, SimCLR).")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(
            "INPUT_RASTERS", self.tr("Unlabelled rasters"), QgsProcessing.SourceType.TypeRaster))
        self.addParameter(QgsProcessingParameterEnum(
            "METHOD", self.tr("Method"), options=METHODS, defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            "MINUTES", self.tr("Budget (minutes)"), QgsProcessingParameterNumber.Type.Double, defaultValue=30.0,
            minValue=0.05, maxValue=100_000.0))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "ITERATIONS", self.tr("Max steps [blank: as many as the budget allows]"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=10_000_000)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "BATCH_SIZE", self.tr("Windows per step (at least 2)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=16, minValue=2, maxValue=4096)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "VIEW", self.tr("View size (pixels, a multiple of 32)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=224, minValue=64, maxValue=2048)))
        self.addParameter(advanced(QgsProcessingParameterString(
            "RASTER_BANDS", self.tr("The rasters' bands in the model's order, e.g. 3,2,1 [blank: automatic]"),
            optional=True)))
        self.addParameter(advanced(QgsProcessingParameterFile(
            "BASE_MODEL", self.tr("Start from the encoder of (.srmf) [blank: ImageNet]"), extension="srmf",
            optional=True)))
        self.add_device_parameters()
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "SEED", self.tr("Random seed"), QgsProcessingParameterNumber.Type.Integer, defaultValue=0, minValue=0)))
        self.addParameter(QgsProcessingParameterFileDestination(
            "OUTPUT_MODEL", self.tr("Pretrained model (encoder only: fine-tune it before segmenting)"),
            fileFilter="SRMF model (*.srmf)"))
        self.addOutput(QgsProcessingOutputNumber("STEPS", self.tr("Steps trained")))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, msg = super().checkParameterValues(parameters, context)
        if ok and not self.parameterAsLayerList(parameters, "INPUT_RASTERS", context):
            return False, "No raster: choose at least one unlabelled raster layer."
        return ok, msg

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        """Main thread: the layers as files, the engine's command line."""
        rasters = self.parameterAsLayerList(parameters, "INPUT_RASTERS", context)
        if not rasters:
            raise QgsProcessingException("No raster: choose at least one unlabelled raster layer.")
        output = absolute(self.parameterAsFileOutput(parameters, "OUTPUT_MODEL", context))
        if not output.lower().endswith(".srmf"):
            output += ".srmf"
        method = self.parameterAsEnum(parameters, "METHOD", context)
        args = [output, "--overwrite", "--device", self.device_arg(parameters, context),
                "--method", METHOD_ARGS[method if 0 <= method < len(METHOD_ARGS) else 0],
                "--minutes", repr(float(self.parameterAsDouble(parameters, "MINUTES", context))),
                "--batch-size", str(self.parameterAsInt(parameters, "BATCH_SIZE", context)),
                "--view", str(self.parameterAsInt(parameters, "VIEW", context)),
                "--seed", str(self.parameterAsInt(parameters, "SEED", context))]
        steps = self.optional_int(parameters, "ITERATIONS", context)
        if steps is not None:
            args += ["--iterations", str(steps)]
        for r in rasters:
            args += ["--raster", layer_path(r, context, feedback, "unlabelled raster")]
        bands = (self.parameterAsString(parameters, "RASTER_BANDS", context) or "").replace(" ", "")
        if bands:
            args += ["--bands", bands]
        base = self.model_path(parameters, "BASE_MODEL", context, "base model")
        if base:
            args += ["--base-model", base]
        self._args, self._output = args, output
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        result = self.run_engine("pretrain", self._args, feedback, outputs=[self._output], progress_range=(0.0, 99.0))
        model = result.get("output") or self._output
        feedback.pushInfo(f"Pretrained model: {model} ({result.get('method')}, {result.get('iterations')} steps, "
                          f"{result.get('gs_iterations')} gradient-guided, {result.get('seconds')} s; loss "
                          f"{result.get('first_loss')} -> {result.get('last_loss')}). Its head is untrained: use it "
                          "as the base model of Fine-tune model.")
        feedback.setProgress(100.0)
        return {"OUTPUT_MODEL": model, "STEPS": result.get("iterations")}
