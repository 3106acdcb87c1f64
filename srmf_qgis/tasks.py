"""Background jobs: a Processing algorithm run as a QGIS task (progress in the task manager)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from qgis.core import (QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback,
                       QgsProject, QgsRasterLayer)
from qgis.PyQt.QtCore import QObject, QStandardPaths, pyqtSignal

from . import runtime, styling

_RUNNING: list = []  # jobs in flight, kept alive until they end


class JobFeedback(QgsProcessingFeedback):
    """A feedback that re-emits the log as a signal (for dialogs) and keeps the errors."""

    message = pyqtSignal(str, str)  # text, level ("info", "warning", "error", "debug")
    metrics = pyqtSignal(dict)

    def __init__(self):
        super().__init__()
        self.errors = []
        self.log = []
        self.worker_pid = None

    def _emit(self, text, level):
        self.log.append((level, text))
        self.message.emit(str(text), level)

    def pushInfo(self, info):  # noqa: N802
        super().pushInfo(info)
        self._emit(info, "info")

    def pushWarning(self, warning):  # noqa: N802
        super().pushWarning(warning)
        self._emit(warning, "warning")

    def reportError(self, error, fatalError=False):  # noqa: N802,N803
        super().reportError(error, fatalError)
        self.errors.append(str(error))
        self._emit(error, "error")

    def pushDebugInfo(self, info):  # noqa: N802
        super().pushDebugInfo(info)
        self._emit(info, "debug")

    def pushCommandInfo(self, info):  # noqa: N802
        super().pushCommandInfo(info)
        self._emit(info, "debug")

    def srmf_on_metrics(self, msg: dict):
        self.metrics.emit(dict(msg))

    def srmf_on_start(self, pid: int):
        self.worker_pid = pid


class AlgorithmJob(QObject):
    """Runs a Processing algorithm by id as a background task.

    ``finished(ok, results, error)`` is emitted in the main thread when it ends.
    """

    finished = pyqtSignal(bool, dict, str)

    def __init__(self, algorithm_id: str, parameters: dict, description: str = "",
                 feedback: Optional[JobFeedback] = None, project: Optional[QgsProject] = None):
        super().__init__()
        alg = QgsApplication.processingRegistry().createAlgorithmById(algorithm_id)
        if alg is None:
            raise RuntimeError(f"The Processing algorithm {algorithm_id} is not available (is the SRMF plugin enabled?)")
        self.algorithm = alg
        self.parameters = dict(parameters)
        self.context = QgsProcessingContext()
        self.context.setProject(project or QgsProject.instance())
        self.feedback = feedback or JobFeedback()
        self.description = description or alg.displayName()
        self.task = QgsProcessingAlgRunnerTask(alg, self.parameters, self.context, self.feedback)
        self.task.setDescription(self.description)  # the task manager names the layer, not just the algorithm
        self.task.executed.connect(self._on_executed)
        self.done = False
        self.ok = False
        self.results: dict = {}
        self.error = ""

    def start(self) -> "AlgorithmJob":
        _RUNNING.append(self)
        QgsApplication.taskManager().addTask(self.task)
        return self

    def cancel(self) -> None:
        self.feedback.cancel()
        if self.task is not None:
            self.task.cancel()

    def _on_executed(self, successful: bool, results: dict):
        self.done = True
        self.ok = bool(successful)
        self.results = dict(results or {})
        if not successful:
            errs = [e for e in self.feedback.errors if e.strip()]
            self.error = errs[-1] if errs else ("Cancelled." if self.feedback.isCanceled() else "The job failed.")
        self.finished.emit(self.ok, self.results, self.error)
        if self in _RUNNING:
            _RUNNING.remove(self)


def default_output_path(source: str, suffix: str = "_srmf_classes", ext: str = ".tif") -> str:
    """Where a one-click segmentation writes: beside the input (``<name>_srmf_classes.tif``, numbered if
    taken), or in ``Documents/SRMF`` when the input's folder is not writable."""
    src = Path(source)
    folder = src.parent if src.is_file() else Path()
    if not src.is_file() or not os.access(str(folder), os.W_OK):
        docs = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation) or str(Path.home())
        folder = Path(docs) / "SRMF"
        folder.mkdir(parents=True, exist_ok=True)
    stem = src.stem if src.stem else "raster"
    candidate = folder / f"{stem}{suffix}{ext}"
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}{suffix}_{n}{ext}"
        n += 1
    return str(candidate)


def add_class_raster(path: str, name: str, classes=None, project: Optional[QgsProject] = None,
                     group: Optional[str] = None) -> QgsRasterLayer:
    """Add a class raster to the project, styled (its .qml is loaded; ``classes`` re-apply the palette); with
    ``group``, into the layer-tree group of that name (made at the top when missing)."""
    layer = QgsRasterLayer(path, name, "gdal")
    if classes:
        styling.style_class_layer(layer, classes)
    project = project or QgsProject.instance()
    if group is None:
        project.addMapLayer(layer)
        return layer
    project.addMapLayer(layer, False)
    root = project.layerTreeRoot()
    node = root.findGroup(group) or root.insertGroup(0, group)
    node.addLayer(layer)
    return layer


def result_classes(results: dict) -> list:
    """The class table ``[{id, name, colour}]`` of a finished srmf:segment run, from the engine's result
    (``CLASSES``), else from the header of the model it used (``MODEL_USED``); an empty list when neither
    is available (then the ``.qml`` written beside the raster styles it). Never from the raster's GDAL
    metadata, which GDAL 3.6 may not have loaded yet on a freshly opened GeoTIFF."""
    classes = [c for c in (results.get("CLASSES") or []) if isinstance(c, dict) and "id" in c and "name" in c]
    if classes and all(c.get("colour") for c in classes):
        return [{"id": int(c["id"]), "name": str(c["name"]), "colour": c["colour"]} for c in classes]
    model = results.get("MODEL_USED") or ""
    if model and os.path.isfile(str(model)):
        from .modelheader import read_header

        try:
            header_classes = read_header(model)["classes"]
        except ValueError:
            header_classes = []
        if header_classes:
            return [{"id": int(c["id"]), "name": str(c["name"]), "colour": c.get("colour")} for c in header_classes]
    return classes


def segment_parameters(layer, model: Optional[str] = None, output: Optional[str] = None, device: Optional[str] = None,
                       **extra) -> dict:
    """srmf:segment parameters for a one-click run on ``layer`` (the last-used model, else the default)."""
    from .layers import raster_source, safe_name
    from .web import is_web_layer

    model = model if model is not None else str(runtime.get_setting(runtime.SETTINGS_LAST_MODEL, "") or "")
    if model and not os.path.isfile(model):
        model = ""
    dev = {"cpu": 1, "cuda": 2}.get(str(device or runtime.get_setting(runtime.SETTINGS_DEVICE, "auto")), 0)
    params = {"INPUT": layer.id(), "MODEL": model or None, "DEVICE": dev,
              "OUTPUT": output or default_output_path(safe_name(layer.name(), "web_layer") if is_web_layer(layer)  # no file: Documents/SRMF
                                                    else raster_source(layer)),
              "OUTPUT_AREAS": None}
    params.update(extra)
    return params
