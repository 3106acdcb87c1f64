"""The SRMF plugin: the Processing provider, the Raster ▸ SRMF menu, the raster layer context menu,
the fine-tune and settings dialogs."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from qgis.core import Qgis, QgsApplication, QgsRasterLayer
from qgis.PyQt.QtWidgets import QAction

from . import runtime
from .algorithms.base import icon
from .layers import RASTER_TYPE
from .provider import SRMFProvider
from .tasks import AlgorithmJob, JobFeedback, add_class_raster, result_classes, segment_parameters
from .web import is_web_layer

MENU = "&SRMF"


def _guarded(fn):
    """A menu/context-menu slot that reports an unexpected error instead of letting it escape to Qt."""
    import functools
    import traceback

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user and logged, never lost
            from qgis.core import QgsMessageLog

            QgsMessageLog.logMessage(traceback.format_exc(), "SRMF", Qgis.MessageLevel.Critical)
            self._message(f"{type(exc).__name__}: {exc} (details in the SRMF tab of the Log Messages panel)",
                          Qgis.MessageLevel.Critical)
            return None

    return wrapper


class SRMFPlugin:
    """Entry object returned by ``classFactory``."""

    def __init__(self, iface):
        self.iface = iface
        self.provider: Optional[SRMFProvider] = None
        self.menu_actions: List[QAction] = []
        self.layer_actions: Dict[str, QAction] = {}
        self._layer_action_types: Dict[str, object] = {}
        self.jobs: List[AlgorithmJob] = []
        self.dialogs: list = []

    # -- Processing (also used by qgis_process, which calls only this) -----------------------------
    def initProcessing(self):  # noqa: N802 - QGIS API
        registry = QgsApplication.processingRegistry()
        if registry.providerById("srmf") is None:
            self.provider = SRMFProvider()
            registry.addProvider(self.provider)

    # -- GUI ---------------------------------------------------------------------------------------
    def initGui(self):  # noqa: N802 - QGIS API
        self.initProcessing()
        parent = self.iface.mainWindow()
        entries = [
            ("segment", "Segment raster\u2026", lambda: self.open_segment_dialog(None)),
            ("finetune", "Fine-tune model\u2026", lambda: self.open_finetune_dialog(None)),
            ("evaluate", "Evaluate accuracy\u2026", lambda: self._open_algorithm("srmf:evaluate", {})),
            ("info", "Model information\u2026", lambda: self._open_algorithm("srmf:modelinfo", {})),
            ("srmf", "Settings\u2026", self.open_settings),
            ("srmf", "Diagnostics\u2026", self.show_diagnostics),
        ]
        for icon_name, text, slot in entries:
            action = QAction(icon(icon_name), text, parent)
            action.triggered.connect(lambda *_, f=slot: f())
            self.iface.addPluginToRasterMenu(MENU, action)
            self.menu_actions.append(action)

        # Context menu of raster layers in the Layers panel (not of vector layers).
        for key, text, slot, icon_name in (
                ("segment", "Segment with SRMF", self._segment_current, "segment"),
                ("segment_visible", "Segment visible extent with SRMF", self._segment_visible_current, "segment"),
                ("segment_dialog", "Segment with SRMF\u2026", self._segment_dialog_current, "segment"),
                ("finetune", "Fine-tune SRMF on this layer\u2026", self._finetune_current, "finetune")):
            action = QAction(icon(icon_name), text, parent)
            action.triggered.connect(lambda *_, f=slot: f())
            self.iface.addCustomActionForLayerType(action, "", RASTER_TYPE, True)
            self.layer_actions[key] = action
            self._layer_action_types[key] = RASTER_TYPE

    def unload(self):
        for action in self.menu_actions:
            self.iface.removePluginRasterMenu(MENU, action)
        for action in self.layer_actions.values():
            self.iface.removeCustomActionForLayerType(action)
        self.menu_actions.clear()
        self.layer_actions.clear()
        for job in self.jobs:
            if not job.done:
                job.cancel()
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def actions_for_layer(self, layer) -> List[QAction]:
        """The context-menu actions QGIS shows for ``layer`` (those registered for its layer type)."""
        if layer is None:
            return []
        return [a for k, a in self.layer_actions.items() if self._layer_action_types.get(k) == layer.type()]

    # -- context menu slots ------------------------------------------------------------------------
    def _current_raster(self) -> Optional[QgsRasterLayer]:
        layer = self.iface.activeLayer()
        if isinstance(layer, QgsRasterLayer):
            return layer
        self._message("Select a raster layer in the Layers panel first.", Qgis.MessageLevel.Warning)
        return None

    def _selected_rasters(self) -> List[QgsRasterLayer]:
        """The raster layers selected in the Layers panel (none when the panel is not there)."""
        view = self.iface.layerTreeView() if hasattr(self.iface, "layerTreeView") else None
        selected = view.selectedLayers() if view is not None else []
        return [layer for layer in selected or [] if isinstance(layer, QgsRasterLayer)]

    @_guarded
    def _segment_current(self):
        """"Segment with SRMF": the active raster layer; with several raster layers selected, each of them
        (one background task per layer, each cancellable; the results in one layer-tree group)."""
        selected = self._selected_rasters()
        if len(selected) > 1:
            group = f"SRMF classes ({len(selected)} layers)"
            return [self.segment_layer(layer, group=group) for layer in selected]
        layer = self._current_raster()
        if layer is not None and is_web_layer(layer):  # a web layer covers the world: the part the map shows
            return self._segment_visible(layer)
        return self.segment_layer(layer) if layer is not None else None

    @_guarded
    def _segment_visible_current(self):
        """"Segment visible extent with SRMF": the one-click run on the part of the layer the map shows (the
        engine's --extent; the class raster covers that part, on the layer's pixel grid)."""
        layer = self._current_raster()
        return self._segment_visible(layer) if layer is not None else None

    def _segment_visible(self, layer):
        from qgis.core import QgsReferencedRectangle

        canvas = self.iface.mapCanvas()
        extent = canvas.extent() if canvas is not None else None
        if extent is None or extent.isEmpty():
            self._message("The map shows nothing to segment: zoom to the part of the layer to segment.", Qgis.MessageLevel.Warning)
            return None
        crs = canvas.mapSettings().destinationCrs()
        return self.segment_layer(layer, EXTENT=QgsReferencedRectangle(extent, crs))

    @_guarded
    def _segment_dialog_current(self):
        layer = self._current_raster()
        return self.open_segment_dialog(layer) if layer is not None else None

    @_guarded
    def _finetune_current(self):
        layer = self._current_raster()
        return self.open_finetune_dialog(layer) if layer is not None else None

    # -- actions -----------------------------------------------------------------------------------
    def segment_layer(self, layer: QgsRasterLayer, model: Optional[str] = None, group: Optional[str] = None,
                      **params) -> Optional[AlgorithmJob]:
        """"Segment with SRMF": srmf:segment on ``layer`` as a background task (the last-used model, else
        the default); the styled class raster is added to the project when it is done."""
        try:
            parameters = segment_parameters(layer, model=model, **params)
        except Exception as exc:  # noqa: BLE001 - e.g. a non-GDAL layer: say why
            self._message(str(exc), Qgis.MessageLevel.Warning)
            return None
        job = AlgorithmJob("srmf:segment", parameters, f"SRMF: segmenting {layer.name()}", JobFeedback())
        name = f"{layer.name()} \u2014 SRMF classes"
        job.finished.connect(lambda ok, results, error: self._segment_done(job, name, ok, results, error, group))
        self.jobs.append(job)
        self._message(f"Segmenting '{layer.name()}' with {Path(parameters['MODEL']).name if parameters['MODEL'] else 'the default model'}"
                      " \u2014 progress in the task manager (bottom right).", Qgis.MessageLevel.Info, 5)
        return job.start()

    @_guarded
    def _segment_done(self, job, name, ok, results, error, group=None):
        if job in self.jobs:
            self.jobs.remove(job)
        if not ok:
            if error.startswith("Cancel"):
                source = name.rsplit(" \u2014 ", 1)[0]  # the input layer's name, not the class layer's
                self._message(f"Segmentation of '{source}' cancelled; nothing was written.", Qgis.MessageLevel.Info, 5)
            else:
                self._message(f"Segmentation failed: {error}", Qgis.MessageLevel.Critical)
            return
        out = results.get("OUTPUT")
        # The engine's class table (colours and names), not the raster's GDAL metadata (issue 17: GDAL 3.6
        # returns no category names on a freshly opened GeoTIFF, and every class was painted grey).
        layer = add_class_raster(out, name, result_classes(results), group=group)
        job.layer = layer
        areas = results.get("CLASS_AREAS") or []
        if areas and areas[0].get("area_ha") is not None:
            summary = ", ".join(f"{a['name']} {a['area_ha']:.2f} ha" for a in areas)
        else:
            total = sum(int(a["pixels"]) for a in areas) or 1
            summary = ", ".join(f"{a['name']} {100.0 * int(a['pixels']) / total:.1f} %" for a in areas)
        self._message(f"Segmented into {out}: {summary}", Qgis.MessageLevel.Success, 10)

    @_guarded
    def _open_algorithm(self, alg_id: str, params: dict):
        import processing

        dlg = processing.createAlgorithmDialog(alg_id, params)
        if dlg is not None:
            self.dialogs.append(dlg)
            dlg.show()
        return dlg

    @_guarded
    def open_segment_dialog(self, layer=None):
        """The srmf:segment dialog with the layer (and the last-used model) filled in."""
        params = {}
        if layer is not None:
            params["INPUT"] = layer
        last = str(runtime.get_setting(runtime.SETTINGS_LAST_MODEL, "") or "")
        if last and Path(last).is_file():
            params["MODEL"] = last
        return self._open_algorithm("srmf:segment", params)

    @_guarded
    def open_finetune_dialog(self, layer=None):
        from .ui.finetune_dialog import FinetuneDialog

        dlg = FinetuneDialog(self.iface, self.iface.mainWindow(), layer=layer, plugin=self)
        self.dialogs.append(dlg)
        dlg.show()
        return dlg

    @_guarded
    def open_settings(self):
        from .ui.settings_dialog import SettingsDialog

        dlg = SettingsDialog(self.iface.mainWindow())
        self.dialogs.append(dlg)
        dlg.show()
        return dlg

    @_guarded
    def show_diagnostics(self):
        from .ui.settings_dialog import show_diagnostics

        dlg = show_diagnostics(self.iface.mainWindow())
        self.dialogs.append(dlg)
        return dlg

    def _message(self, text: str, level=Qgis.MessageLevel.Info, duration: int = 0):
        try:
            self.iface.messageBar().pushMessage("SRMF", text, level, duration)
        except Exception:  # noqa: BLE001 - no message bar (tests, qgis_process)
            pass
