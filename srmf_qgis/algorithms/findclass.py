"""srmf:findclass and srmf:findclasshandoff — find where a new class occurs from a few example polygons
(the engine's ``findclass`` and ``findclass-handoff``; CAT, arXiv 2308.02844, DESIGN.md "Method")."""
from __future__ import annotations

import os

from qgis.core import (QgsProcessing, QgsProcessingException, QgsProcessingOutputFile,
                       QgsProcessingOutputNumber, QgsProcessingOutputRasterLayer, QgsProcessingOutputString,
                       QgsProcessingOutputVectorLayer, QgsProcessingParameterBand, QgsProcessingParameterEnum,
                       QgsProcessingParameterField, QgsProcessingParameterFile,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString,
                       QgsProcessingParameterVectorLayer, QgsProcessingContext)

from .. import styling
from ..layers import raster_source, vector_source
from .base import SRMFAlgorithm, absolute, advanced

# The engine's names and choices (core/findclass/params.py: RELEVANCE_NAME, CANDIDATES_NAME, MODES, FEATURE_SPACES).
RELEVANCE_NAME = "relevance.tif"
CANDIDATES_NAME = "candidates.gpkg"
MODES = ["max", "mean"]
MODE_LABELS = ["Highest similarity to any centroid (CAT, default)", "Mean similarity to the centroids"]
FEATURES = ["fused", "embedding", "both"]
FEATURE_LABELS = ["Fused features (256 channels before the classifier, default)",
                  "Text-aligned embedding", "Both"]

HELP = """<p>Finds where a <b>new class</b> occurs in a raster from a few example polygons you draw
(for example five greenhouses), without training: the SRMF model's per-pixel features inside the
examples are clustered into a few <b>centroids</b> (one per look of the class: spherical k-means), and
every 4 x 4 pixel cell of the raster is scored by its cosine similarity to the nearest centroid.</p>
<p><b>Example polygons</b>: any polygon layer, in any CRS (reprojected onto the raster). Optionally a
<b>negative field</b> (true/1/yes) marks polygons that are <i>not</i> the class: similarity to them is
subtracted. <b>Clusters (K)</b>: the most centroids to use; fewer are used when the examples are few, and
clusters with too few pixels are dropped (the log says so). The default, 1 (one mean prototype), ranked
held-out classes best in our evaluation on real tiles; try 3 when the class has clearly distinct looks
(e.g. dark and light roofs).</p>
<p>Outputs, in the <b>output folder</b>: <b>relevance.tif</b> (float, one cell per 4 x 4 pixels, same CRS
and extent as the raster, -9999 = nodata) and <b>candidates.gpkg</b>: the top-N patches (64 px by
default) as polygons with the fields <i>rank</i>, <i>score</i>, <i>cluster</i> and <i>status</i>
(pending / accepted / rejected), ordered so the review alternates between the clusters and every look
of the class is shown early. Review them: set <i>status</i> to accepted or rejected (a drop-down in the
attribute form), then run <i>Prepare the new class for fine-tuning</i>.</p>
<p>The log gives a <b>threshold</b> calibrated without ground truth (the score that keeps the chosen
share of each held-out example polygon: leave-one-polygon-out) and the existing classes the new one
<b>resembles</b> most.</p>"""

HANDOFF_HELP = """<p>Turns a reviewed candidate layer of <i>Find a new class from examples</i> into the inputs
of <i>Fine-tune model</i>: the example polygons plus the candidates whose <i>status</i> is
<b>accepted</b> (rejected and pending ones are left out) become the labels of the new class, and the
base model gets the new class, its classifier row starting from the centroids found.</p>
<p>Outputs, in the output folder: <b>labels.gpkg</b> (field <i>class</i> = the new class's name),
<b>base_with_class.srmf</b> (the base model with the class added) and <b>classes.json</b> (the class
table). Then run <i>Fine-tune model</i> with the raster, labels.gpkg (class field <i>class</i>) plus
labels of the other classes, base model base_with_class.srmf and the class table file classes.json:
without labels of the other classes the model learns to see the new class everywhere.</p>"""


class FindClassAlgorithm(SRMFAlgorithm):
    _name = "findclass"
    _display = "Find a new class from examples"
    _icon = "srmf"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Where else does this class occur? Relevance raster and ranked candidates from a few "
                       "example polygons.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", self.tr("Raster to search")))
        self.addParameter(QgsProcessingParameterVectorLayer(
            "EXAMPLES", self.tr("Example polygons of the new class"), [QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(
            "NEGATIVE_FIELD", self.tr("Field marking negative examples (true = not the class) [optional]"),
            parentLayerParameterName="EXAMPLES", optional=True))
        self.add_area_parameters("Search only inside these polygons [blank: everywhere]")
        self.addParameter(QgsProcessingParameterFile(
            "MODEL", self.tr("Model file (.srmf) [blank: the embedded default model]"),
            extension="srmf", optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            "CLUSTERS", self.tr("Clusters (K, the most centroids)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=1, minValue=1, maxValue=64))  # core.findclass.params.DEFAULTS["clusters"] (README: evaluation)
        self.addParameter(QgsProcessingParameterNumber(
            "TOP_N", self.tr("Candidates to review (top N patches)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=100, minValue=1, maxValue=100000))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "PATCH", self.tr("Candidate patch size, pixels (multiple of 4)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=64, minValue=4, maxValue=4096)))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            "MODE", self.tr("Relevance"), options=MODE_LABELS, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterEnum(
            "FEATURES", self.tr("Feature space"), options=FEATURE_LABELS, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "RECALL_TARGET", self.tr("Threshold: share of each held-out example to keep (0.05-1)"),
            QgsProcessingParameterNumber.Type.Double, defaultValue=0.9, minValue=0.05, maxValue=1.0)))
        self.addParameter(advanced(QgsProcessingParameterBand(
            "BANDS", self.tr("Bands in the model's order red, green, blue [blank: automatic]"),
            parentLayerParameterName="INPUT", optional=True, allowMultiple=True)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "SEED", self.tr("Random seed (k-means, sampling)"), QgsProcessingParameterNumber.Type.Integer,
            defaultValue=0, minValue=0)))
        self.add_device_parameters()
        self.add_precision_parameter()
        self.addParameter(QgsProcessingParameterFolderDestination(
            "OUTPUT_FOLDER", self.tr("Output folder (relevance.tif, candidates.gpkg)")))
        self.addOutput(QgsProcessingOutputRasterLayer("OUTPUT_RELEVANCE", self.tr("Relevance")))
        self.addOutput(QgsProcessingOutputVectorLayer("OUTPUT_CANDIDATES", self.tr("Candidates"),
                                                      QgsProcessing.SourceType.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("THRESHOLD", self.tr("Calibrated threshold")))
        self.addOutput(QgsProcessingOutputNumber("CLUSTERS_KEPT", self.tr("Clusters kept")))
        self.addOutput(QgsProcessingOutputString("RESEMBLES", self.tr("Existing classes it resembles")))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, msg = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, msg
        examples = self.parameterAsVectorLayer(parameters, "EXAMPLES", context)
        if examples is not None and examples.featureCount() == 0:
            return False, f"The example layer '{examples.name()}' has no polygons: draw a few examples of the class."
        patch = self.parameterAsInt(parameters, "PATCH", context)
        if patch % 4:
            return False, f"Candidate patch size must be a multiple of 4 pixels (got {patch})."
        return True, ""

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        """Main thread: turn the layers into files the engine opens and build its command."""
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException("No raster to search: choose a raster layer or file.")
        examples = self.parameterAsVectorLayer(parameters, "EXAMPLES", context)
        if examples is None:
            raise QgsProcessingException("The example polygon layer could not be opened.")
        if examples.featureCount() == 0:
            raise QgsProcessingException(f"The example layer '{examples.name()}' has no polygons: draw a few "
                                         "examples of the class.")
        negative = (self.parameterAsString(parameters, "NEGATIVE_FIELD", context) or "").strip()
        out_dir = absolute(self.parameterAsString(parameters, "OUTPUT_FOLDER", context))
        if not out_dir:
            raise QgsProcessingException("Choose an output folder.")
        args = [raster_source(layer, "raster to search"),
                vector_source(examples, context, feedback, "example polygon layer"), out_dir,
                "--clusters", str(self.parameterAsInt(parameters, "CLUSTERS", context)),
                "--top-n", str(self.parameterAsInt(parameters, "TOP_N", context)),
                "--patch", str(self.parameterAsInt(parameters, "PATCH", context)),
                "--mode", MODES[self.parameterAsEnum(parameters, "MODE", context)],
                "--features", FEATURES[self.parameterAsEnum(parameters, "FEATURES", context)],
                "--recall-target", repr(self.parameterAsDouble(parameters, "RECALL_TARGET", context)),
                "--seed", str(self.parameterAsInt(parameters, "SEED", context)),
                "--device", self.device_arg(parameters, context), *self.precision_args(parameters, context),
                "--overwrite"]
        # "path|layername=x" of a multi-layer file: the engine takes the layer by name
        if "|layername=" in args[1]:
            path, rest = args[1].split("|layername=", 1)
            args[1] = path
            args += ["--layer", rest.split("|")[0]]
        if negative:
            args += ["--negative-field", negative]
        model = self.model_path(parameters, "MODEL", context)
        if model:
            args += ["--model", model]
        bands = self.parameterAsInts(parameters, "BANDS", context) if parameters.get("BANDS") else []
        if bands:
            args += ["--bands", ",".join(str(b) for b in bands)]
        args += self.area_args(parameters, context, feedback)
        self._args, self._out_dir, self._name = args, out_dir, examples.name()
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out_dir = self._out_dir
        relevance = os.path.join(out_dir, RELEVANCE_NAME)
        candidates = os.path.join(out_dir, CANDIDATES_NAME)
        result = self.run_engine("findclass", self._args, feedback, outputs=[relevance, candidates],
                                 progress_range=(0.0, 97.0))
        relevance = result.get("relevance") or relevance
        candidates = result.get("candidates") or candidates
        thr = (result.get("threshold") or {}).get("threshold")
        clusters = result.get("clusters") or {}
        resembles = ", ".join(str(d.get("name")) for d in result.get("resembles") or [])
        feedback.pushInfo(summary_text(result))
        if result.get("untrained_model"):
            feedback.pushWarning("The model is an UNTRAINED PLACEHOLDER: the features are ImageNet features "
                                 "through a random head; 'resembles' means nothing.")
        styling.write_relevance_qml(relevance, thr)
        styling.write_candidates_qml(candidates)
        name = self._name
        for path, label, post in ((relevance, f"{name} \u2014 relevance",
                                   styling.RelevancePostProcessor.create(thr)),
                                  (candidates + "|layername=candidates", f"{name} \u2014 candidates",
                                   styling.CandidatesPostProcessor.create())):
            details = QgsProcessingContext.LayerDetails(label, context.project(), label)
            details.setPostProcessor(post)
            context.addLayerToLoadOnCompletion(path, details)
        feedback.setProgress(100.0)
        return {"OUTPUT_FOLDER": out_dir, "OUTPUT_RELEVANCE": relevance,
                "OUTPUT_CANDIDATES": candidates + "|layername=candidates", "THRESHOLD": thr,
                "CLUSTERS_KEPT": clusters.get("kept"), "RESEMBLES": resembles,
                "CANDIDATES_WRITTEN": result.get("candidates_written"),
                "UNTRAINED_MODEL": bool(result.get("untrained_model"))}


class FindClassHandoffAlgorithm(SRMFAlgorithm):
    _name = "findclasshandoff"
    _display = "Prepare the new class for fine-tuning"
    _icon = "finetune"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HANDOFF_HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Reviewed candidates + examples \u2192 labels and a base model with the new class.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterVectorLayer(
            "CANDIDATES", self.tr("Reviewed candidates (candidates.gpkg of Find a new class)"),
            [QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString("CLASS_NAME", self.tr("Name of the new class")))
        self.addParameter(QgsProcessingParameterString(
            "COLOUR", self.tr("Colour of the new class (#RRGGBB) [blank: automatic]"), optional=True))
        self.addParameter(QgsProcessingParameterFile(
            "BASE_MODEL", self.tr("Base model (.srmf) [blank: the embedded default model]"),
            extension="srmf", optional=True))
        self.addParameter(QgsProcessingParameterFolderDestination(
            "OUTPUT_FOLDER", self.tr("Output folder (labels.gpkg, base_with_class.srmf, classes.json)")))
        self.addOutput(QgsProcessingOutputVectorLayer("OUTPUT_LABELS", self.tr("Labels of the new class"),
                                                      QgsProcessing.SourceType.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputFile("OUTPUT_BASE_MODEL", self.tr("Base model with the new class")))
        self.addOutput(QgsProcessingOutputFile("OUTPUT_CLASSES", self.tr("Class table file")))
        self.addOutput(QgsProcessingOutputNumber("ACCEPTED", self.tr("Accepted candidates")))

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802
        cand = self.parameterAsVectorLayer(parameters, "CANDIDATES", context)
        if cand is None:
            raise QgsProcessingException("The candidate layer could not be opened.")
        if cand.isEditable() and cand.isModified():
            raise QgsProcessingException(f"The candidate layer '{cand.name()}' has unsaved edits: save them "
                                         "(Toggle Editing \u25b8 Save) so the review is used.")
        path = cand.source().split("|")[0]
        if cand.providerType() != "ogr" or not os.path.isfile(path) or not path.lower().endswith(".gpkg"):
            raise QgsProcessingException(f"'{cand.name()}' is not a candidates.gpkg written by Find a new class.")
        name = (self.parameterAsString(parameters, "CLASS_NAME", context) or "").strip()
        if not name:
            raise QgsProcessingException("Give the new class a name.")
        out_dir = absolute(self.parameterAsString(parameters, "OUTPUT_FOLDER", context))
        args = [os.path.abspath(path), out_dir, "--class-name", name]
        colour = (self.parameterAsString(parameters, "COLOUR", context) or "").strip()
        if colour:
            args += ["--colour", colour]
        model = self.model_path(parameters, "BASE_MODEL", context, "base model")
        if model:
            args += ["--base-model", model]
        self._args, self._out_dir = args, out_dir
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self._out_dir
        outputs = [os.path.join(out, n) for n in ("labels.gpkg", "base_with_class.srmf", "classes.json",
                                                  "sources.json")]
        result = self.run_engine("findclass-handoff", self._args, feedback, outputs=outputs)
        counts = result.get("counts") or {}
        feedback.pushInfo(f"{counts.get('examples', 0)} example polygon(s) and {counts.get('accepted', 0)} accepted "
                          f"candidate(s) label the new class; {counts.get('rejected', 0)} rejected and "
                          f"{counts.get('pending', 0)} pending left out.")
        feedback.pushInfo("Next: Fine-tune model with the raster and " + str(result.get("labels")) + " (class field "
                          "'class'), labels of the other classes, base model " + str(result.get("base_model"))
                          + " and the class table file " + str(result.get("classes")) + ".")
        # not remembered as the "last model": its new class is untrained until srmf:finetune has run
        return {"OUTPUT_FOLDER": out, "OUTPUT_LABELS": result.get("labels"),
                "OUTPUT_BASE_MODEL": result.get("base_model"), "OUTPUT_CLASSES": result.get("classes"),
                "ACCEPTED": counts.get("accepted"), "COUNTS": counts}


def summary_text(result: dict) -> str:
    """The run in a few lines: outputs, support, clusters, threshold, resemblance."""
    c = result.get("clusters") or {}
    thr = result.get("threshold") or {}
    lines = [f"Relevance: {result.get('relevance')} ({result.get('relevance_width')} x "
             f"{result.get('relevance_height')} cells of 4 x 4 px, {result.get('crs') or 'no CRS'})",
             f"Candidates: {result.get('candidates')} ({result.get('candidates_written')} patches to review)",
             f"Support: {result.get('support_cells')} feature cells from "
             f"{(result.get('examples') or {}).get('positive')} example polygon(s); clusters kept "
             f"{c.get('kept')} of K={c.get('requested')} (sizes {', '.join(map(str, c.get('sizes') or []))})"
             + (f", dropped {c.get('dropped')}" if c.get("dropped") else "")]
    if thr.get("threshold") is not None:
        lines.append(f"Threshold {thr['threshold']:.4f} ({thr.get('method')}, keeps "
                     f"{float(thr.get('recall_target', 0)):.0%} of each held-out example): "
                     f"{float(result.get('share_above_threshold') or 0):.1%} of the raster scores above it"
                     + (f" ({result['area_above_threshold_m2'] / 1e4:.2f} ha)"
                        if result.get("area_above_threshold_m2") is not None else ""))
    res = result.get("resembles") or []
    if res:
        lines.append("Resembles: " + ", ".join(str(d.get("name")) for d in res))
    if result.get("seconds") is not None:
        lines.append(f"Done in {result['seconds']:.1f} s on {result.get('device')}.")
    return "\n".join(lines)

