"""srmf:segment — classify every pixel of a raster with an SRMF model (the engine's ``segment``)."""
from __future__ import annotations

import os
from typing import Optional
from pathlib import Path

from qgis.core import (QgsFeature, QgsFeatureSink, QgsField, QgsFields, QgsProcessing,
                       QgsProcessingException, QgsProcessingOutputString, QgsProcessingParameterBand,
                       QgsProcessingParameterBoolean,
                       QgsProcessingParameterFeatureSink, QgsProcessingParameterFile,
                       QgsProcessingParameterNumber, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterVectorDestination,
                       QgsProcessingUtils, QgsWkbTypes, QgsCoordinateReferenceSystem, QgsVectorLayer)

from ..compat import field_type
from .. import runtime, styling, web
from ..layers import raster_source
from .base import ScaledFeedback, SRMFAlgorithm, _is_null, absolute, advanced, given

HELP = """<p>Classifies every pixel of a raster layer with an SRMF model (semantic segmentation), on a
CUDA GPU when there is one, else on the CPU. The model runs in its own Python process: QGIS stays
responsive and Cancel stops it at once, leaving no partial file.</p>
<p><b>Input raster</b>: any raster GDAL reads, of any size (it is read strip by strip). The model
expects red, green, blue (a multispectral model more: near-infrared ...; its bands are listed by
<i>Model information</i>); with <b>Bands</b> left blank they are found from the raster's colour
interpretation and band descriptions (an RGB model: else bands 1-3; a single band is repeated; a
multispectral model refuses a raster where one of its bands is not found, naming it). 16-bit and float rasters
are stretched from their 2-98 % percentiles; the log says how.</p>
<p><b>Model</b>: an SRMF model file (.srmf); blank = the model embedded in the plugin.</p>
<p><b>Tile size</b> and <b>stride</b>: the sliding window in pixels (blank = the model's, 512 and 341:
tiles overlap by a third and their predictions are averaged). <b>Batch size</b>: tiles per step
(larger is faster on a GPU and needs more memory). <b>Processing resolution</b>: the ground size of
a pixel the model sees, in metres. Blank = automatic: when the raster's pixels are more than 1.5 times
finer or coarser than the model's training imagery (0.8 m for the embedded model), each strip is
resampled to the model's scale as it is read and the classes are resampled back, so the classified
raster is still on the input's own grid; 0 = the raster's own pixels. <b>Processing extent</b> and
<b>Mask polygons</b>: segment only that area (the outputs cover it, on the input's pixel grid; outside the
mask's polygons the classes are nodata); only the tiles that touch it are read and run. <b>Test-time augmentation</b>
(advanced): every tile is also run flipped and turned and the predictions averaged, 8 times the time.
<b>Precision</b> (advanced): automatic runs the decode
head in bf16 where the CPU or GPU does so natively, after checking the first batch against float32;
float32 is exact; bf16 forces it (an error where it is not native).</p>
<p><b>Web map layers</b> (XYZ tiles such as a satellite basemap, WMTS and WMS): the layer is read from its
server through GDAL, tile by tile, over the <b>processing extent</b> (required for a web layer; or the mask
layer's extent) at the <b>processing resolution</b> (blank = the model's training resolution; 0 is refused:
a web layer has no pixels of its own). XYZ and WMTS tiles are read at the zoom level nearest that resolution and the
outputs are in EPSG:3857; WMS outputs are in the layer's CRS. Tiles are cached under the QGIS profile
(cache/srmf-web), so a second run over the same area downloads nothing; a tile the server does not give is
asked for again (3 times, after 1, 2 and 4 s) before the run stops with the server's error, leaving no
output. Respect the service's terms of use.</p>
<p>Outputs: the <b>classified raster</b> (GeoTIFF, one byte per pixel = class id, 255 = nodata; same CRS,
extent and pixel grid as the input; styled with the model's class colours and names, also written
as a .qml beside it), optional <b>class probabilities</b> (one band per class, 0-250 = 0-100 %),
optional <b>class polygons</b> (GDAL polygonize after GDAL's sieve to the <b>minimum mapping unit</b>
in m\u00b2 — in pixels for a raster in degrees — so no polygon is smaller; fields class_id, class_name
and area_m2; adjacent polygons share their pixel edges; <b>Simplify</b> smooths away the pixel
stair-steps as a coverage, so neighbours still share their edges — no gaps, no overlaps — and the outline of
the classified area stays where it is) and the <b>class
areas</b> table (pixels, m\u00b2, ha, share). Areas need a projected CRS: for a raster in degrees the
table gives pixels and says so.</p>"""


class SegmentAlgorithm(SRMFAlgorithm):
    _name = "segment"
    _display = "Segment raster (classify pixels)"
    _icon = "segment"

    def shortHelpString(self) -> str:  # noqa: N802
        return self.help_html(HELP)

    def shortDescription(self) -> str:  # noqa: N802
        return self.tr("Classify every pixel of a raster with an SRMF model.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", self.tr("Input raster")))
        self.addParameter(QgsProcessingParameterFile(
            "MODEL", self.tr("Model file (.srmf) [blank: the embedded default model]"),
            extension="srmf", optional=True))
        self.addParameter(QgsProcessingParameterBand(
            "BANDS", self.tr("Bands in the model's band order (red, green, blue[, nir ...]) [blank: automatic]"),
            parentLayerParameterName="INPUT", optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterNumber(
            "TILE_SIZE", self.tr("Tile size (window), pixels [blank: the model's, 512]"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=32, maxValue=8192))
        self.addParameter(QgsProcessingParameterNumber(
            "STRIDE", self.tr("Stride, pixels [blank: the model's, 341]"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=8192))
        self.add_area_parameters("Mask polygons [blank: none; outside them the classes are nodata]")
        self.addParameter(QgsProcessingParameterNumber(
            "RESOLUTION", self.tr("Processing resolution, metres per pixel [blank: automatic, the model's own when "
                                  "the raster's pixels are more than 1.5x off it; 0: the raster's own pixels]"),
            QgsProcessingParameterNumber.Type.Double, optional=True, minValue=0.0, maxValue=10000.0))
        self.addParameter(advanced(QgsProcessingParameterNumber(
            "BATCH_SIZE", self.tr("Batch size (tiles per step) [blank: automatic]"),
            QgsProcessingParameterNumber.Type.Integer, optional=True, minValue=1, maxValue=1024)))
        self.addParameter(advanced(QgsProcessingParameterBoolean(
            "TTA", self.tr("Test-time augmentation (each tile also flipped and turned; 8 times slower)"),
            defaultValue=False)))
        self.add_device_parameters()
        self.add_precision_parameter()
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", self.tr("Classified raster")))
        self.addParameter(QgsProcessingParameterRasterDestination(
            "OUTPUT_PROBABILITIES", self.tr("Class probabilities"), optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterNumber(
            "MIN_AREA", self.tr("Minimum mapping unit of the class polygons, m\u00b2 [blank: none; pixels in a "
                                "raster in degrees]"), QgsProcessingParameterNumber.Type.Double, optional=True,
            minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(
            "SIMPLIFY", self.tr("Simplify the class polygons, pixels [blank: no; 1 removes the pixel stair-steps; "
                                "neighbours keep sharing their edges]"), QgsProcessingParameterNumber.Type.Double,
            optional=True, minValue=0.0, maxValue=100.0))
        self.addParameter(QgsProcessingParameterVectorDestination(
            "OUTPUT_POLYGONS", self.tr("Class polygons"), QgsProcessing.SourceType.TypeVectorPolygon, optional=True,
            createByDefault=False))
        self.addParameter(QgsProcessingParameterFeatureSink(
            "OUTPUT_AREAS", self.tr("Class areas"), QgsProcessing.SourceType.TypeVector, optional=True, createByDefault=True))
        self.addOutput(QgsProcessingOutputString("AREA_NOTE", self.tr("Note on the areas")))
        self.addOutput(QgsProcessingOutputString("MODEL_USED", self.tr("Model used")))
        self.addOutput(QgsProcessingOutputString("PROCESSING", self.tr("Processing resolution used")))

    # ---------------------------------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        model = self.model_path(parameters, "MODEL", context)
        output, probabilities = self._raster_outputs(parameters, context)
        polygons = self.parameterAsOutputLayer(parameters, "OUTPUT_POLYGONS", context) or ""
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if web.is_web_layer(layer):
            source, area, resolution = self._web_input(layer, parameters, context, model, feedback)
            args = self._engine_args(parameters, context, source, output, model, probabilities, resolution)
            args += ["--extent", area] + self.area_args(dict(parameters, EXTENT=None), context, feedback)
            layer_name = layer.name()
        else:
            source, layer_name = self._input(parameters, context)
            args = self._engine_args(parameters, context, source, output, model, probabilities)
            args += self.area_args(parameters, context, feedback)
        engine_polygons = self._polygon_args(parameters, context, polygons, args)
        engine_share = 90.0 if polygons else 98.0
        result = self.run_engine("segment", args, feedback, outputs=[output, probabilities],
                                 progress_range=(0.0, engine_share))
        classes = result.get("classes") or []
        if model:
            runtime.set_setting(runtime.SETTINGS_LAST_MODEL, model)
        self._style(output, classes, layer_name, context, feedback)
        results = {"OUTPUT": output, "OUTPUT_PROBABILITIES": probabilities or None,
                   "AREA_NOTE": result.get("area_note") or "", "MODEL_USED": result.get("model", model or "")}
        results["CLASS_AREAS"] = result.get("class_areas") or []
        results["CLASSES"] = [dict(c) for c in classes]  # {id, name, colour}: what the raster was styled with
        results["CRS"] = result.get("crs")
        results["UNTRAINED_MODEL"] = bool(result.get("untrained_model"))
        results["PROCESSING"] = (result.get("processing") or {}).get("note") or ""
        self._report_areas(result, feedback)
        sink_id = self._area_table(parameters, context, result.get("class_areas") or [])
        if sink_id is not None:
            results["OUTPUT_AREAS"] = sink_id
        if polygons:
            results["OUTPUT_POLYGONS"] = self._polygonize(engine_polygons, polygons, output, classes, layer_name,
                                                          context, ScaledFeedback(feedback, engine_share, 100.0))
        feedback.setProgress(100.0)
        return results

    def _input(self, parameters, context):
        """(the raster's source for the engine, the layer name for the output's name)."""
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is not None:
            return raster_source(layer), layer.name()
        # not loadable by QGIS: let the engine say what is wrong with the file
        raw = parameters.get("INPUT")
        source = str(raw) if isinstance(raw, str) else ""
        if not source:
            raise QgsProcessingException("No input raster: choose a raster layer or file.")
        source = absolute(source) if os.path.exists(source) else source
        return source, Path(source).stem

    def _web_input(self, layer, parameters, context, model, feedback):
        """A web map layer (XYZ, WMTS, WMS) as a GDAL service description (:func:`srmf_qgis.web.web_source`):
        ``(the .xml path, the engine's --extent, the --resolution in metres)``. The resolution is the RESOLUTION
        parameter, blank = the model's training GSD; the area is the processing extent, else the mask's extent.

        Raises:
            QgsProcessingException: no extent nor mask, RESOLUTION 0 (a web layer has no pixels of its own),
                or a blank RESOLUTION with a model that does not record its GSD.
        """
        from qgis.core import QgsApplication, QgsCoordinateTransform, QgsProject

        from ..modelheader import read_header

        metres = self.optional_double(parameters, "RESOLUTION", context)
        if metres is None:
            model_file = model or str(runtime.DEFAULT_MODEL)
            try:
                metres = float(read_header(model_file).get("gsd_m") or 0.0)
            except (OSError, ValueError):  # an unreadable model is the engine's to report; here: no GSD known
                metres = 0.0
            if metres <= 0:
                raise QgsProcessingException(
                    f"The web layer '{layer.name()}' needs a processing resolution: the model {model_file} does not "
                    "record the ground resolution it was trained at. Give the processing resolution in metres.")
        elif metres <= 0:
            raise QgsProcessingException(
                f"The web layer '{layer.name()}' has no pixels of its own (the server draws it at any scale): "
                "give the processing resolution in metres (blank: the model's own).")
        if given(parameters, "EXTENT"):
            extent = self.parameterAsExtent(parameters, "EXTENT", context, layer.crs())
        else:
            mask = self.parameterAsVectorLayer(parameters, "MASK", context)
            if mask is None:
                raise QgsProcessingException(
                    f"The web layer '{layer.name()}' covers the whole world: choose a processing extent (for "
                    "example the map canvas extent) or a mask layer.")
            extent = QgsCoordinateTransform(mask.crs(), layer.crs(), QgsProject.instance()).transformBoundingBox(
                mask.extent())
        cache = os.path.join(QgsApplication.qgisSettingsDirPath(), "cache", "srmf-web")
        path, area, note = web.web_source(layer, extent, metres, QgsProcessingUtils.tempFolder(), cache)
        feedback.pushInfo(note)
        return path, area, repr(float(metres))

    def _raster_outputs(self, parameters, context):
        """(classified raster, class probabilities or ""), both GeoTIFF paths. Raises on another extension."""
        output = absolute(self.parameterAsOutputLayer(parameters, "OUTPUT", context))
        if Path(output).suffix.lower() not in (".tif", ".tiff"):
            raise QgsProcessingException(f"The classified raster is written as a GeoTIFF: give it the extension "
                                         f".tif (got {output}).")
        probabilities = self.parameterAsOutputLayer(parameters, "OUTPUT_PROBABILITIES", context) or ""
        probabilities = absolute(probabilities) if probabilities else ""
        if probabilities and Path(probabilities).suffix.lower() not in (".tif", ".tiff"):
            raise QgsProcessingException(f"The class probabilities are written as a GeoTIFF: give them the "
                                         f"extension .tif (got {probabilities}).")
        return output, probabilities

    def _engine_args(self, parameters, context, source, output, model, probabilities, resolution=None) -> list:
        """The arguments of ``python -m core segment``."""
        bands = self.parameterAsInts(parameters, "BANDS", context) if parameters.get("BANDS") else []
        args = [source, output, "--overwrite", "--device", self.device_arg(parameters, context),
                *self.precision_args(parameters, context)]
        if model:
            args += ["--model", model]
        for name, flag in (("TILE_SIZE", "--window"), ("STRIDE", "--stride"), ("BATCH_SIZE", "--batch-size")):
            value = self.optional_int(parameters, name, context)
            if value is not None:
                args += [flag, str(value)]
        if bands:
            args += ["--bands", ",".join(str(b) for b in bands)]
        args += ["--resolution", resolution or self._resolution_arg(parameters, context)]
        if self.parameterAsBool(parameters, "TTA", context):
            args += ["--tta"]
        if probabilities:
            args += ["--probabilities", probabilities]
        return args

    def _resolution_arg(self, parameters, context) -> str:
        """``--resolution`` of the RESOLUTION parameter: blank = auto, 0 = native, else metres."""
        value = parameters.get("RESOLUTION")
        if value is None or (isinstance(value, str) and not value.strip()) or _is_null(value):
            return "auto"
        metres = self.parameterAsDouble(parameters, "RESOLUTION", context)
        return "native" if metres <= 0 else repr(float(metres))

    @staticmethod
    def _style(output: str, classes, layer_name: str, context, feedback) -> None:
        """Style the class raster beside the file (any later project) and when Processing loads it."""
        qml = styling.write_class_qml(output, classes)
        if qml is None:
            feedback.pushWarning(f"Could not write the style file beside {output}.")
        if context.willLoadLayerOnCompletion(output):
            context.layerToLoadOnCompletionDetails(output).setPostProcessor(
                styling.ClassRasterPostProcessor.create(classes, f"{layer_name} \u2014 SRMF classes"))

    def _area_table(self, parameters, context, areas) -> Optional[str]:
        """Write the class areas to the OUTPUT_AREAS table sink; its id, or None when not asked for."""
        sink_fields = QgsFields()
        for fname, ftype in (("class_id", field_type("Int")), ("class_name", field_type("String")),
                             ("pixels", field_type("LongLong")), ("area_m2", field_type("Double")),
                             ("area_ha", field_type("Double")), ("share_pct", field_type("Double"))):
            sink_fields.append(QgsField(fname, ftype))
        sink, sink_id = self.parameterAsSink(parameters, "OUTPUT_AREAS", context, sink_fields,
                                             QgsWkbTypes.Type.NoGeometry, QgsCoordinateReferenceSystem())
        if sink is None:
            return None
        total = sum(int(a["pixels"]) for a in areas) or 1
        for a in areas:
            f = QgsFeature(sink_fields)
            f.setAttributes([int(a["id"]), a["name"], int(a["pixels"]), a.get("area_m2"), a.get("area_ha"),
                             round(100.0 * int(a["pixels"]) / total, 3)])
            sink.addFeature(f, QgsFeatureSink.Flag.FastInsert)
        return sink_id

    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _report_areas(result: dict, feedback) -> None:
        areas = result.get("class_areas") or []
        total = sum(int(a["pixels"]) for a in areas) or 1
        lines = [f"Classes of {Path(result.get('output', '')).name} ({result.get('width')} x {result.get('height')} px, "
                 f"{result.get('crs') or 'no CRS'}):",
                 f"{'class':<20s} {'pixels':>12s} {'share':>8s} {'area (m²)':>14s} {'area (ha)':>12s}"]
        for a in areas:
            m2 = "" if a.get("area_m2") is None else f"{a['area_m2']:.1f}"
            ha = "" if a.get("area_ha") is None else f"{a['area_ha']:.4f}"
            lines.append(f"{a['name']:<20s} {int(a['pixels']):>12d} {100.0 * int(a['pixels']) / total:>7.2f}% "
                         f"{m2:>14s} {ha:>12s}")
        feedback.pushInfo("\n".join(lines))
        if result.get("area_note"):
            feedback.pushWarning("Areas: " + result["area_note"])
        if result.get("seconds") is not None:
            feedback.pushInfo(f"Segmented in {result['seconds']:.1f} s on {result.get('device')}.")

    def _polygon_args(self, parameters, context, polygons: str, args: list) -> str:
        """Add ``--polygons`` (a GeoPackage: the destination itself when it is one, else a temporary file)
        and the minimum mapping unit to ``args``; returns the GeoPackage the engine writes ("" for none)."""
        if not polygons:
            return ""
        target = polygons if polygons.lower().endswith(".gpkg") and "|" not in polygons else \
            QgsProcessingUtils.generateTempFilename("srmf_polygons.gpkg")
        args += ["--polygons", target]
        unit = self.optional_double(parameters, "MIN_AREA", context)
        if unit:
            layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
            geographic = layer is not None and layer.crs().isGeographic()
            args += ["--min-pixels", str(int(unit))] if geographic else ["--min-area", repr(unit)]
        simplify = self.optional_double(parameters, "SIMPLIFY", context)
        if simplify:
            args += ["--simplify", repr(simplify)]
        return target

    def _polygonize(self, engine_polygons: str, polygons: str, raster: str, classes, layer_name, context,
                    feedback) -> str:
        """The engine's class polygons (sieved, with class_id, class_name, area_m2) at the destination
        ``polygons`` (converted when it is not the GeoPackage the engine wrote), styled."""
        import processing

        out = polygons
        if engine_polygons != polygons:
            out = processing.run("gdal:convertformat", {
                "INPUT": f"{engine_polygons}|layername=class_polygons", "OPTIONS": "", "OUTPUT": polygons,
            }, context=context, feedback=ScaledFeedback(feedback, 0.0, 100.0), is_child_algorithm=True)["OUTPUT"]
        # A style beside the file (unless it would clash with the raster's) and on loading.
        out_path = str(out).split("|")[0]
        if os.path.isfile(out_path) and styling.qml_path(out_path) != styling.qml_path(raster):
            vl = QgsVectorLayer(str(out), "polygons", "ogr")
            if vl.isValid():
                styling.write_polygon_qml(vl, classes, styling.qml_path(out_path))
        if context.willLoadLayerOnCompletion(polygons):
            context.layerToLoadOnCompletionDetails(polygons).setPostProcessor(
                styling.ClassPolygonPostProcessor.create(classes, f"{layer_name} \u2014 SRMF class polygons"))
        return out
