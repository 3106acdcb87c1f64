"""The fine-tune dialog: training rasters and labels, the class table, the training settings; runs
``srmf:finetune`` as a background task, shows progress and the per-class IoU, offers to segment."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from qgis.core import Qgis, QgsRasterLayer, QgsVectorLayer
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox, QgsMessageBar
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QFont
from qgis.PyQt.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDialog, QDoubleSpinBox, QFormLayout, QGroupBox,
                                 QHBoxLayout, QHeaderView, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QPushButton,
                                 QSizePolicy, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout,
                                 QWidget)

from .. import classtable, runtime
from ..compat import layer_filter
from ..classtable import ClassEntry, ClassTableError
from ..algorithms.finetune import TRAINING_DEFAULTS
from ..tasks import AlgorithmJob, JobFeedback
from .class_table import ClassTableWidget

CLASS_FIELD_GUESSES = ("class", "class_name", "classname", "class_id", "classid", "label", "landcover",
                       "land_cover", "lc", "category", "type", "building")
DEVICE_CHOICES = [("Automatic (GPU if available)", 0), ("CPU", 1), ("CUDA GPU", 2)]


def raster_values(layer: QgsRasterLayer, limit: int = 256) -> List[ClassEntry]:
    """The classes found in a class raster: its values (a histogram of band 1), with the category names
    and colour table when it has them (e.g. an SRMF output). Raises ValueError for non-class rasters."""
    from osgeo import gdal

    from .. import styling
    from ..compat import gdal_open
    from ..layers import raster_source

    path = raster_source(layer, "label raster")
    ds, reason = gdal_open(path, gdal.OF_RASTER)
    if ds is None:
        raise ValueError(f"GDAL cannot open {path}" + (f": {reason}" if reason else ""))
    band = ds.GetRasterBand(1)
    if band.DataType not in (gdal.GDT_Byte, gdal.GDT_UInt16, gdal.GDT_Int16, gdal.GDT_UInt32, gdal.GDT_Int32):
        raise ValueError(f"The label raster '{layer.name()}' holds {gdal.GetDataTypeName(band.DataType)} values; "
                         "a class raster holds whole numbers (one value per class).")
    nodata = band.GetNoDataValue()
    lo, hi = band.ComputeRasterMinMax(False)
    lo, hi = int(lo), int(hi)
    if hi - lo > 65535:
        raise ValueError(f"The label raster '{layer.name()}' has values from {lo} to {hi}: not a class raster.")
    hist = band.GetHistogram(lo - 0.5, hi + 0.5, hi - lo + 1, include_out_of_range=False, approx_ok=False)
    known = {c["id"]: c for c in styling.classes_from_raster(path)}
    band = None
    ds = None
    out = []
    for i, count in enumerate(hist):
        v = lo + i
        if count == 0 or (nodata is not None and v == int(nodata)) or v == 255 and 255 not in known:
            continue
        c = known.get(v)
        out.append(ClassEntry(c["name"] if c else f"class {v}", c["colour"] if c else "", "", v))
        if len(out) > limit:
            raise ValueError(f"The label raster '{layer.name()}' has more than {limit} distinct values: not a class raster.")
    return out


def vector_values(layer: QgsVectorLayer, field: str, limit: int = 255) -> List[ClassEntry]:
    idx = layer.fields().indexOf(field)
    if idx < 0:
        raise ValueError(f"The layer '{layer.name()}' has no field '{field}'.")
    values = [v for v in layer.uniqueValues(idx) if v is not None and str(v) != "NULL" and str(v).strip() != ""]
    if len(values) > limit:
        raise ValueError(f"The field '{field}' of '{layer.name()}' has {len(values)} distinct values; is it the class field?")
    try:
        values = sorted(values)
    except TypeError:
        values = sorted(values, key=str)
    return [ClassEntry(str(v), "", "", v) for v in values]


class FinetuneDialog(QDialog):
    """Fine-tune SRMF on the analyst's data. ``plugin`` (optional) segments with the new model."""

    def __init__(self, iface=None, parent=None, layer=None, plugin=None, load_base_classes: bool = True):
        super().__init__(parent)
        self.iface = iface
        self.plugin = plugin
        self.job: Optional[AlgorithmJob] = None
        self.model_path: Optional[str] = None
        self.setWindowTitle("Fine-tune SRMF")
        self.setMinimumSize(900, 760)
        self.resize(1100, 860)
        self.message_bar = QgsMessageBar(self)
        self.message_bar.setSizePolicy(QSizePolicy.Policy.Minimum, QSizePolicy.Policy.Fixed)
        data_box = self._build_data_box()
        class_box = self._build_class_box()
        train_box = self._build_train_box()
        run_box = self._build_run_box()
        buttons = self._build_buttons()
        self._build_layout(data_box, class_box, train_box, run_box, buttons)
        self.add_pair(layer if isinstance(layer, QgsRasterLayer) else None)
        if load_base_classes:
            self.load_base_classes(replace=True, quiet=True)
        self._update_state()

    # -- building the dialog ------------------------------------------------------------------------
    def _build_data_box(self) -> QGroupBox:
        """1. Training data: the table of (raster, labels) pairs, its buttons and the class field."""
        data_box = QGroupBox("1. Training data: rasters and their labels", self)
        self.pairs = QTableWidget(0, 2, data_box)
        self.pairs.setHorizontalHeaderLabels(["Raster", "Labels"])
        self.pairs.horizontalHeaderItem(0).setToolTip("A raster layer to learn from (any size; RGB, or one band).")
        self.pairs.horizontalHeaderItem(1).setToolTip("Its labels: a class raster (one value per class) or a polygon "
                                                      "layer whose class field says which class each polygon is.")
        self.pairs.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.pairs.verticalHeader().setVisible(False)
        self.pairs.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.pairs.setMinimumHeight(90)
        add_pair = QPushButton("Add raster", data_box)
        remove_pair = QPushButton("Remove", data_box)
        add_pair.clicked.connect(lambda: self.add_pair())
        remove_pair.clicked.connect(self.remove_pair)
        self.field_combo = QgsFieldComboBox(data_box)
        self.field_combo.setAllowEmptyFieldName(True)
        self.field_combo.fieldChanged.connect(lambda *_: self._update_state())
        self.field_label = QLabel("Class field:", data_box)
        self.field_label.setToolTip("For polygon labels: the attribute that says which class each polygon is.")
        self.field_combo.setToolTip(self.field_label.toolTip())
        self.field_combo.setMinimumWidth(160)
        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(add_pair)
        pair_buttons.addWidget(remove_pair)
        pair_buttons.addSpacing(12)
        pair_buttons.addWidget(self.field_label)
        pair_buttons.addWidget(self.field_combo, 1)
        data_layout = QVBoxLayout(data_box)
        data_layout.addWidget(self.pairs)
        data_layout.addLayout(pair_buttons)
        return data_box

    def _build_class_box(self) -> QGroupBox:
        """2. Classes: the class table and the buttons that fill it."""
        class_box = QGroupBox("2. Classes of the new model", self)
        self.class_table = ClassTableWidget(class_box)
        self.base_classes_button = QPushButton("Classes of the base model", class_box)
        self.label_classes_button = QPushButton("Classes from the labels", class_box)
        self.base_classes_button.setToolTip("Put the base model's classes in the table (label value = class id).")
        self.label_classes_button.setToolTip("Add a class for each value found in the labels (raster values or the "
                                             "class field's values).")
        self.base_classes_button.clicked.connect(lambda: self.load_base_classes(replace=True))
        self.label_classes_button.clicked.connect(lambda: self.load_label_classes())
        self.class_table.buttons.addWidget(self.base_classes_button)
        self.class_table.buttons.addWidget(self.label_classes_button)
        class_layout = QVBoxLayout(class_box)
        hint = QLabel("Classes of the base model that are not listed are dropped; new names are added. Edit a name to "
                      "rename a class. <b>Label value</b>: the pixel value or field value that marks the class in the "
                      "labels.", class_box)
        hint.setWordWrap(True)
        class_layout.addWidget(hint)
        class_layout.addWidget(self.class_table)
        return class_box

    def _build_train_box(self) -> QGroupBox:
        """3. Training: base model, recipe (defaults: the engine's, :data:`TRAINING_DEFAULTS`), device, output."""
        train_box = QGroupBox("3. Training", self)
        form = QFormLayout(train_box)
        self.base_model = QgsFileWidget(train_box)
        self.base_model.setFilter("SRMF model (*.srmf)")
        self.base_model.lineEdit().setPlaceholderText("blank: the embedded default model")
        self.base_model.fileChanged.connect(lambda *_: self.load_base_classes(replace=False))
        self.iterations = QSpinBox(train_box)
        self.iterations.setRange(1, 10_000_000)
        self.iterations.setValue(TRAINING_DEFAULTS["iterations"])
        self.iterations.setToolTip("Training steps. On a GPU 1000-4000 is typical; on the CPU start with a few hundred.")
        self.batch_size = QSpinBox(train_box)
        self.batch_size.setRange(0, 1024)
        self.batch_size.setSpecialValueText("automatic")
        self.val_share = QDoubleSpinBox(train_box)
        self.val_share.setRange(0.0, 0.9)
        self.val_share.setSingleStep(0.05)
        self.val_share.setValue(TRAINING_DEFAULTS["val_share"])
        self.val_share.setToolTip("The share of the labelled area held out (by region) to measure per-class IoU.")
        self.balancing = QCheckBox("Class balancing (MARS + SRR-TA)", train_box)
        self.balancing.setChecked(TRAINING_DEFAULTS["class_balancing"])
        self.balancing.setToolTip("Gives rare classes as much training as common ones (SRMF's MARS and SRR-TA). "
                                  "Leave it on unless you compare with plain training.")
        self.device = QComboBox(train_box)
        for text, value in DEVICE_CHOICES:
            self.device.addItem(text, value)
        self.model_bands = QLineEdit(train_box)
        self.model_bands.setPlaceholderText("blank: the base model's (red, green, blue); e.g. red,green,blue,nir")
        self.model_bands.setToolTip(
            "Multispectral: the new model's bands by name, red, green, blue first, then nir, rededge, swir1 ... "
            "The base model's first layer is widened for them and their statistics are computed from your rasters; "
            "each raster's bands are found by colour interpretation and band description (e.g. \"NIR\").")
        self.output = QgsFileWidget(train_box)
        self.output.setStorageMode(QgsFileWidget.StorageMode.SaveFile)
        self.output.setFilter("SRMF model (*.srmf)")
        self.output.setConfirmOverwrite(True)
        self.output.lineEdit().setPlaceholderText("where to save the fine-tuned model (.srmf)")
        form.addRow("Base model:", self.base_model)
        form.addRow("Max iterations:", self.iterations)
        form.addRow("Batch size:", self.batch_size)
        form.addRow("Validation share:", self.val_share)
        form.addRow("", self.balancing)
        form.addRow("Processor type:", self.device)
        form.addRow("Model bands:", self.model_bands)
        form.addRow("Fine-tuned model:", self.output)
        return train_box

    def _build_run_box(self) -> QGroupBox:
        """4. Progress: the progress bar, the log and the per-class validation IoU."""
        run_box = QGroupBox("4. Progress and validation IoU", self)
        self.progress = QProgressBar(run_box)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.log = QPlainTextEdit(run_box)
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setFont(QFont("monospace"))
        self.iou_table = QTableWidget(0, 2, run_box)
        self.iou_table.setHorizontalHeaderLabels(["Class", "Validation IoU"])
        self.iou_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.iou_table.verticalHeader().setVisible(False)
        self.iou_label = QLabel("", run_box)
        split = QSplitter(Qt.Orientation.Horizontal, run_box)
        split.addWidget(self.log)
        right = QWidget(split)
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.iou_label)
        rl.addWidget(self.iou_table)
        split.addWidget(right)
        split.setSizes([520, 300])
        run_layout = QVBoxLayout(run_box)
        run_layout.addWidget(self.progress)
        run_layout.addWidget(split)
        return run_box

    def _build_buttons(self) -> QHBoxLayout:
        """Segment with the new model, Run, Cancel, Close."""
        self.run_button = QPushButton("Run", self)
        self.run_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel", self)
        self.segment_button = QPushButton("Segment with the new model", self)
        self.close_button = QPushButton("Close", self)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.segment_button.clicked.connect(self.segment_with_new_model)
        self.close_button.clicked.connect(self.close)
        self.cancel_button.setEnabled(False)
        self.segment_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addStretch(1)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.close_button)
        return buttons

    def _build_layout(self, data_box, class_box, train_box, run_box, buttons) -> None:
        top = QHBoxLayout()
        top.addWidget(data_box, 3)
        top.addWidget(train_box, 2)
        self.class_table.table.setMinimumHeight(150)
        self.log.setMinimumHeight(120)
        main = QVBoxLayout(self)
        main.addWidget(self.message_bar)
        main.addLayout(top)
        main.addWidget(class_box, 3)
        main.addWidget(run_box, 2)
        main.addLayout(buttons)

    # -- training pairs -----------------------------------------------------------------------------
    def add_pair(self, raster=None, labels=None) -> int:
        row = self.pairs.rowCount()
        self.pairs.insertRow(row)
        rc = QgsMapLayerComboBox(self.pairs)
        rc.setFilters(layer_filter("RasterLayer"))
        rc.setAllowEmptyLayer(True)
        rc.setLayer(raster)
        lc = QgsMapLayerComboBox(self.pairs)
        lc.setFilters(layer_filter("RasterLayer", "PolygonLayer"))
        lc.setAllowEmptyLayer(True)
        lc.setLayer(labels)
        if raster is not None and labels is None:
            lc.setLayer(None)
        lc.layerChanged.connect(lambda *_: self._labels_changed())
        rc.layerChanged.connect(lambda *_: self._update_state())
        self.pairs.setCellWidget(row, 0, rc)
        self.pairs.setCellWidget(row, 1, lc)
        self._labels_changed()
        return row

    def remove_pair(self):
        row = self.pairs.currentRow()
        if row < 0:
            row = self.pairs.rowCount() - 1
        if row >= 0:
            self.pairs.removeRow(row)
        self._labels_changed()

    def set_pair(self, row: int, raster=None, labels=None) -> None:
        while self.pairs.rowCount() <= row:
            self.add_pair()
        if raster is not None:
            self.pairs.cellWidget(row, 0).setLayer(raster)
        if labels is not None:
            self.pairs.cellWidget(row, 1).setLayer(labels)
        self._labels_changed()

    def rasters(self) -> list:
        return [self.pairs.cellWidget(r, 0).currentLayer() for r in range(self.pairs.rowCount())]

    def labels(self) -> list:
        return [self.pairs.cellWidget(r, 1).currentLayer() for r in range(self.pairs.rowCount())]

    def _first_vector_label(self):
        return next((l for l in self.labels() if isinstance(l, QgsVectorLayer)), None)

    def _labels_changed(self):
        vec = self._first_vector_label()
        current = self.field_combo.currentField()
        self.field_combo.setLayer(vec)
        if vec is not None:
            names = vec.fields().names()
            if current in names:
                self.field_combo.setField(current)
            elif not current:
                guess = next((n for g in CLASS_FIELD_GUESSES for n in names if n.lower() == g), "")
                self.field_combo.setField(guess)
        self.field_combo.setEnabled(vec is not None)
        self.field_label.setEnabled(vec is not None)
        self._update_state()

    def _update_state(self):
        if not hasattr(self, "run_button"):
            return
        running = self.job is not None and not self.job.done
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def label_field(self) -> str:
        return self.field_combo.currentField() if self._first_vector_label() is not None else ""

    def set_label_field(self, name: str) -> None:
        self.field_combo.setField(name)

    # -- classes --------------------------------------------------------------------------------------
    def base_model_path(self) -> Optional[str]:
        p = (self.base_model.filePath() or "").strip()
        return p or None

    def load_base_classes(self, replace: bool = True, quiet: bool = False) -> bool:
        """Fill the class table with the base model's classes (``core info``, no torch needed)."""
        model = self.base_model_path()
        from ..modelheader import read_header

        try:  # instant: the file's JSON header; the engine explains a file it cannot read
            header = read_header(model or runtime.DEFAULT_MODEL)
        except ValueError:
            header = None
        if header is not None:
            self._note_pretrained(header)
        if not replace and self.class_table.entries():
            return False
        if header is not None:
            classes = header["classes"]
        else:
            try:
                result = runtime.run_engine("info", [model] if model else [], None, require_torch=False)
            except runtime.EngineError as exc:
                if not quiet:
                    self.show_message(f"Could not read the base model's classes: {exc}", Qgis.MessageLevel.Warning)
                return False
            classes = (result.get("header") or {}).get("classes") or []
        self.class_table.set_entries(classtable.from_model_classes(classes))
        return True

    def _note_pretrained(self, header: dict) -> None:
        """Say so when the base model is a pretrained encoder (``srmf:pretrain``): its head is untrained, the
        classes it lists are placeholders, fine-tuning trains a new head on its encoder."""
        if not (header.get("provenance") or {}).get("untrained_head"):
            return
        pre = header.get("pretraining") or {}
        self.show_message(f"The base model is an encoder pretrained without labels ({pre.get('method', '?')}, "
                          f"{pre.get('iterations', '?')} steps): its head is untrained and its classes are placeholders. "
                          "Set your classes (Classes from the labels); fine-tuning trains a new head on this encoder.",
                          Qgis.MessageLevel.Info)

    def load_label_classes(self) -> int:
        """Add a class for every value in the labels (raster values, or the class field's values)."""
        found: List[ClassEntry] = []
        field = self.label_field()
        try:
            for lab in self.labels():
                if isinstance(lab, QgsRasterLayer):
                    found += raster_values(lab)
                elif isinstance(lab, QgsVectorLayer):
                    if not field:
                        raise ValueError(f"The labels '{lab.name()}' are polygons: choose their class field first.")
                    found += vector_values(lab, field)
        except ValueError as exc:
            self.show_message(str(exc), Qgis.MessageLevel.Warning)
            return 0
        if not found:
            self.show_message("Choose label layers first (the value of each class is read from them).", Qgis.MessageLevel.Info)
            return 0
        added, updated = self.class_table.merge_entries(found)
        parts = []
        if added:
            parts.append(f"{added} class(es) added from the labels (give them names, colours and prompts)")
        if updated:
            parts.append(f"the label value of {updated} class(es) of the same name set from the labels")
        self.show_message(("; ".join(parts) or "The labels hold no class that is not in the table already") + ".",
                          Qgis.MessageLevel.Info)
        return added

    # -- validation and parameters ------------------------------------------------------------------
    def validate(self) -> Optional[str]:
        """None when the dialog can run, else what the analyst must fix (one sentence)."""
        if self.pairs.rowCount() == 0:
            return "Add at least one training raster with its labels."
        for i, (r, lab) in enumerate(zip(self.rasters(), self.labels()), 1):
            if r is None:
                return f"Row {i} of the training data has no raster: choose one."
            if lab is None:
                return f"Choose the labels of the raster '{r.name()}' (a class raster or a polygon layer)."
            if lab.id() == r.id():
                return f"The raster '{r.name()}' cannot be its own labels."
        field = self.label_field()
        for lab in self.labels():
            if isinstance(lab, QgsVectorLayer):
                if not field:
                    return (f"The labels '{lab.name()}' are polygons: choose the class field (the attribute that says "
                            "which class each polygon is).")
                if lab.fields().indexOf(field) < 0:
                    return f"The polygon labels '{lab.name()}' have no field '{field}'."
        entries = self.class_table.entries()
        if not entries:
            return ("The class table is empty: add the classes of the new model (\u201cClasses of the base model\u201d, "
                    "\u201cClasses from the labels\u201d or \u201cAdd class\u201d).")
        try:
            classtable.validate(entries)
        except ClassTableError as exc:
            return str(exc)
        vec = self._first_vector_label()
        if vec is not None and field and vec.fields().indexOf(field) >= 0 \
                and not vec.fields().field(field).isNumeric():
            blank = [e.name for e in entries if e.value is None]
            if blank:
                return (f"Give the label value (the value of the field '{field}') of the class(es): "
                        f"{', '.join(blank)} \u2014 or click \u201cClasses from the labels\u201d.")
        out = (self.output.filePath() or "").strip()
        if not out:
            return "Choose where to save the fine-tuned model (Fine-tuned model, a .srmf file)."
        if not Path(out).expanduser().absolute().parent.is_dir():
            return f"The folder of the fine-tuned model does not exist: {Path(out).parent}"
        return None

    def parameters(self) -> dict:
        out = str(Path(self.output.filePath().strip()).expanduser().absolute())
        if not out.lower().endswith(".srmf"):
            out += ".srmf"
        return {
            "INPUT_RASTERS": [r.id() for r in self.rasters()],
            "LABELS": [l.id() for l in self.labels()],
            "LABEL_FIELD": self.label_field() or None,
            "CLASS_TABLE": classtable.to_matrix(classtable.fill_defaults(self.class_table.entries())),
            "BASE_MODEL": self.base_model_path(),
            "MAX_ITERATIONS": self.iterations.value(),
            "BATCH_SIZE": self.batch_size.value() or None,
            "VALIDATION_SHARE": self.val_share.value(),
            "CLASS_BALANCING": self.balancing.isChecked(),
            "DEVICE": self.device.currentData(),
            "MODEL_BANDS": self.model_bands.text().replace(" ", "") or None,
            "OUTPUT_MODEL": out,
            "OUTPUT_METRICS": None,
        }

    # -- running -----------------------------------------------------------------------------------
    def show_message(self, text: str, level=Qgis.MessageLevel.Info, duration: int = 0):
        self.message_bar.clearWidgets()
        self.message_bar.pushMessage("SRMF", text, level, duration)
        self.last_message = text

    def run(self) -> bool:
        problem = self.validate()
        if problem:
            self.show_message(problem, Qgis.MessageLevel.Warning)
            return False
        params = self.parameters()
        self.message_bar.clearWidgets()
        self.log.clear()
        self.iou_table.setRowCount(0)
        self.iou_label.setText("")
        self.progress.setValue(0)
        feedback = JobFeedback()
        feedback.message.connect(self._on_message)
        feedback.metrics.connect(self._on_metrics)
        feedback.progressChanged.connect(lambda p: self.progress.setValue(int(p)))
        self.job = AlgorithmJob("srmf:finetune", params, "SRMF: fine-tuning", feedback)
        self.job.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.segment_button.setEnabled(False)
        self._append(f"Fine-tuning into {params['OUTPUT_MODEL']} ({params['MAX_ITERATIONS']} iterations) ...", "info")
        self.job.start()
        return True

    def cancel(self):
        if self.job is not None and not self.job.done:
            self._append("Cancelling ...", "warning")
            self.job.cancel()

    def _append(self, text: str, level: str):
        if level == "debug":
            return
        prefix = {"warning": "Warning: ", "error": "Error: "}.get(level, "")
        self.log.appendPlainText(prefix + text)

    def _on_message(self, text: str, level: str):
        self._append(text, level)

    def _on_metrics(self, msg: dict):
        if "per_class_iou" in msg or "miou" in msg:
            self.show_iou(msg.get("per_class_iou") or {}, msg.get("miou"), f"validation at iteration {msg.get('iteration')}")
        elif isinstance(msg.get("loss"), (int, float)) and not self.iou_table.rowCount():
            self.iou_label.setText(f"iteration {msg.get('iteration')}: training loss {msg['loss']:.4f}")

    def show_iou(self, per_class: dict, miou, when: str = ""):
        self.iou_table.setRowCount(0)
        for name, v in per_class.items():
            r = self.iou_table.rowCount()
            self.iou_table.insertRow(r)
            self.iou_table.setItem(r, 0, QTableWidgetItem(str(name)))
            item = QTableWidgetItem(f"{v:.3f}" if isinstance(v, (int, float)) else "n/a")
            item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
            self.iou_table.setItem(r, 1, item)
        text = f"mIoU {miou:.3f}" if isinstance(miou, (int, float)) else "mIoU n/a"
        self.iou_label.setText(f"<b>{text}</b>" + (f" ({when})" if when else ""))

    def _on_finished(self, ok: bool, results: dict, error: str):
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setValue(100 if ok else self.progress.value())
        if ok:
            self.model_path = results.get("OUTPUT_MODEL")
            self.show_iou(results.get("PER_CLASS_IOU") or {}, results.get("MIOU"), "best model")
            self.segment_button.setEnabled(True)
            raster = next((r for r in self.rasters() if r is not None), None)
            self.show_message(f"Fine-tuned model saved: {self.model_path}. Click \u201cSegment with the new model\u201d "
                              f"to segment '{raster.name() if raster else 'a raster'}' with it.", Qgis.MessageLevel.Success)
        else:
            self.show_message(error or "Fine-tuning failed; see the log.", Qgis.MessageLevel.Critical)

    def segment_with_new_model(self, layer=None, **params):
        """Segment a raster (default: the first training raster) with the fine-tuned model, as a task;
        ``params`` override srmf:segment parameters (e.g. OUTPUT)."""
        if not self.model_path:
            return None
        layer = layer or next((r for r in self.rasters() if r is not None), None)
        if layer is None:
            return None
        if self.plugin is not None:
            return self.plugin.segment_layer(layer, model=self.model_path, **params)
        from ..tasks import add_class_raster, result_classes, segment_parameters

        job = AlgorithmJob("srmf:segment", segment_parameters(layer, model=self.model_path, **params))
        job.finished.connect(lambda ok, res, err: add_class_raster(res["OUTPUT"], f"{layer.name()} \u2014 SRMF classes",
                                                                   result_classes(res))
                             if ok else self.show_message(f"Segmentation failed: {err}", Qgis.MessageLevel.Critical))
        return job.start()
