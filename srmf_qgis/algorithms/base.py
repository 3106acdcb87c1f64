"""What the SRMF algorithms share: running the engine, devices, precision, optional numbers, help text."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from qgis.core import (QgsProcessing, QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingFeedback,
                       QgsProcessingParameterEnum, QgsProcessingParameterExtent, QgsProcessingParameterNumber,
                       QgsProcessingParameterDefinition, QgsProcessingParameterVectorLayer)
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtGui import QIcon

from .. import layers, runtime

ICONS = runtime.PLUGIN_DIR / "resources" / "icons"
DEVICES = ["Automatic (a CUDA GPU if there is one, else the CPU)", "CPU", "CUDA GPU"]
# PRECISION's options, in the order of the engine's ``--precision`` values (segment, findclass, finetune):
# auto = bf16 autocast of the decode head where the device runs bf16 natively, kept only when the first
# batch matches float32; fp32 = exact float32; bf16 = forced (the engine refuses it where not native).
PRECISIONS = ["Automatic (bf16 where the CPU or GPU runs it natively and it matches float32)", "float32 (exact)",
              "bf16"]
PRECISION_ARGS = ["auto", "fp32", "bf16"]


def icon(name: str) -> QIcon:
    return QIcon(str(ICONS / f"{name}.svg"))


def advanced(param):
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
    return param


class ScaledFeedback(QgsProcessingFeedback):
    """Relays a child step's 0..100 % onto ``lo..hi`` of a parent feedback, and the parent's cancel."""

    def __init__(self, parent: QgsProcessingFeedback, lo: float, hi: float):
        super().__init__()
        self._parent, self._lo, self._hi = parent, lo, hi
        parent.canceled.connect(self.cancel)
        self.progressChanged.connect(lambda p: parent.setProgress(lo + (hi - lo) * p / 100.0))
        if parent.isCanceled():
            self.cancel()

    def pushInfo(self, info):  # noqa: N802
        self._parent.pushInfo(info)

    def pushWarning(self, warning):  # noqa: N802
        self._parent.pushWarning(warning)

    def reportError(self, error, fatalError=False):  # noqa: N802,N803
        self._parent.reportError(error, fatalError)

    def pushDebugInfo(self, info):  # noqa: N802
        self._parent.pushDebugInfo(info)

    def pushCommandInfo(self, info):  # noqa: N802
        self._parent.pushCommandInfo(info)

    def pushConsoleInfo(self, info):  # noqa: N802
        self._parent.pushConsoleInfo(info)

    def setProgressText(self, text):  # noqa: N802
        self._parent.setProgressText(text)


class SRMFAlgorithm(QgsProcessingAlgorithm):
    """Base class: an algorithm only declares parameters and turns them into an engine job."""

    _name = ""
    _display = ""
    _icon = "srmf"

    def tr(self, text: str) -> str:
        return QCoreApplication.translate("SRMF", text)

    def createInstance(self):  # noqa: N802
        return type(self)()

    def name(self) -> str:
        return self._name

    def displayName(self) -> str:  # noqa: N802
        return self.tr(self._display)

    def icon(self) -> QIcon:
        return icon(self._icon)

    def help_html(self, text: str) -> str:
        """Help text for the dialog: QGIS shows a newline as a line break, so paragraphs are one line."""
        return self.tr(" ".join(line.strip() for line in text.strip().splitlines()))

    def helpUrl(self) -> str:  # noqa: N802 - the README shipped with the plugin (usage, screenshots)
        readme = runtime.PLUGIN_DIR / "README.md"
        return readme.as_uri() if readme.is_file() else "https://arxiv.org/abs/2504.19839"

    def checkParameterValues(self, parameters, context):  # noqa: N802
        """Processing's check, with a clear message for a layer file that is missing or unreadable
        (instead of "Could not load source layer ... not found")."""
        ok, msg = super().checkParameterValues(parameters, context)
        if ok:
            return ok, msg
        for d in self.parameterDefinitions():
            value = parameters.get(d.name())
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, str) and v and ("/" in v or "\\" in v or os.path.splitext(v)[1]):
                    problem = unreadable_layer_file(v, d.description())
                    if problem:
                        return False, problem
        return ok, msg

    # -- parameters -------------------------------------------------------------------------------
    def add_device_parameters(self):
        self.addParameter(advanced(QgsProcessingParameterEnum(
            "DEVICE", self.tr("Processor type (device)"), options=DEVICES, defaultValue=0)))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "GPU_ID", self.tr("GPU ID (for CUDA GPU)"), QgsProcessingParameterNumber.Type.Integer, defaultValue=0,
            minValue=0, maxValue=63)))

    def add_area_parameters(self, mask_label: str):
        """EXTENT (optional processing extent) and MASK (optional polygon layer): the engine's area of
        interest, ``--extent`` / ``--mask`` (:meth:`area_args`)."""
        self.addParameter(QgsProcessingParameterExtent(
            "EXTENT", self.tr("Processing extent [blank: the whole raster]"), optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer(
            "MASK", self.tr(mask_label), [QgsProcessing.SourceType.TypeVectorPolygon], optional=True))

    def area_args(self, parameters, context, feedback) -> list:
        """``--extent`` (EXTENT in the CRS of the INPUT raster layer) and ``--mask`` (the MASK layer's file)."""
        args = []
        if given(parameters, "EXTENT"):
            layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
            crs = layer.crs() if layer is not None else self.parameterAsExtentCrs(parameters, "EXTENT", context)
            rect = self.parameterAsExtent(parameters, "EXTENT", context, crs)
            text = f"{rect.xMinimum()!r},{rect.yMinimum()!r},{rect.xMaximum()!r},{rect.yMaximum()!r}"
            if layer is None and crs.isValid() and crs.authid():
                text += f",{crs.authid()}"
            args += ["--extent", text]
        mask = self.parameterAsVectorLayer(parameters, "MASK", context)
        if mask is not None:
            args += ["--mask", layers.vector_source(mask, context, feedback, "mask layer")]
        return args

    def device_arg(self, parameters, context) -> str:
        choice = self.parameterAsEnum(parameters, "DEVICE", context)
        if choice == 1:
            return "cpu"
        if choice == 2:
            return f"cuda:{self.parameterAsInt(parameters, 'GPU_ID', context)}"
        return "auto"

    def add_precision_parameter(self):
        self.addParameter(advanced(QgsProcessingParameterEnum(
            "PRECISION", self.tr("Precision"), options=PRECISIONS, defaultValue=0)))

    def precision_args(self, parameters, context) -> list:
        """``["--precision", auto|fp32|bf16]`` of the PRECISION choice (absent = automatic)."""
        choice = self.parameterAsEnum(parameters, "PRECISION", context)
        return ["--precision", PRECISION_ARGS[choice if 0 <= choice < len(PRECISION_ARGS) else 0]]

    def optional_int(self, parameters, name, context) -> Optional[int]:
        value = parameters.get(name)
        if value is None or (isinstance(value, str) and not value.strip()) or _is_null(value):
            return None
        return self.parameterAsInt(parameters, name, context)

    def optional_double(self, parameters, name, context) -> Optional[float]:
        value = parameters.get(name)
        if value is None or (isinstance(value, str) and not value.strip()) or _is_null(value):
            return None
        return self.parameterAsDouble(parameters, name, context)

    def model_path(self, parameters, name, context, what="model") -> Optional[str]:
        """An absolute model path, or None for the embedded default model."""
        path = (self.parameterAsFile(parameters, name, context) or "").strip()
        if not path:
            return None
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise QgsProcessingException(f"The {what} file {path} does not exist.")
        return path

    # -- running the engine -------------------------------------------------------------------------
    def run_engine(self, command: str, args: Sequence[str], feedback, outputs: Sequence[str] = (),
                   require_torch: bool = True, progress_range=(0.0, 100.0)) -> dict:
        """Run the engine; its errors become QgsProcessingException with the engine's message."""
        try:
            return runtime.run_engine(command, args, feedback, outputs=outputs, require_torch=require_torch,
                                      progress_range=progress_range)
        except runtime.EngineError as exc:
            raise QgsProcessingException(str(exc)) from None


def given(parameters: dict, name: str) -> bool:
    """True when the parameter ``name`` has a value (not absent, None, blank text or a NULL QVariant)."""
    value = parameters.get(name)
    return not (value is None or (isinstance(value, str) and not value.strip()) or _is_null(value))


def _is_null(value) -> bool:
    try:
        from qgis.PyQt.QtCore import QVariant

        return isinstance(value, QVariant) and value.isNull()
    except ImportError:  # pragma: no cover
        return False


def unreadable_layer_file(path: str, what: str) -> Optional[str]:
    """A message when ``path`` names a file that is missing or that neither GDAL nor OGR can open."""
    from qgis.core import QgsProject

    if QgsProject.instance().mapLayer(path) is not None:
        return None
    file = path.split("|")[0]
    if not os.path.exists(file):
        return f"{what}: the file {file} does not exist."
    from osgeo import gdal

    from ..compat import gdal_open

    ds, reason = gdal_open(file, gdal.OF_RASTER | gdal.OF_VECTOR)
    if ds is None:
        return (f"{what}: {file} is not a raster GDAL can read, nor a vector file (corrupt, truncated or another "
                f"kind of file)" + (f": {reason}" if reason else "."))
    ds = None
    return None


def absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else path
