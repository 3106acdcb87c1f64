"""The fine-tune dialog, offscreen: the class table round-trips, classes come from the base model and
from the labels, invalid input is refused with a message, and a real run shows the per-class IoU and
segments with the new model. Screenshots go to tests/artifacts/."""
from __future__ import annotations

import pytest
from srmf_qgis_testing import ATLANTA, MODEL_CLASSES, wait_for
from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtWidgets import QApplication

from srmf_qgis import classtable
from srmf_qgis.classtable import ClassEntry
from srmf_qgis.ui.finetune_dialog import FinetuneDialog


@pytest.fixture
def layers(clean_project, atlanta_polygon_labels):
    raster = QgsRasterLayer(str(ATLANTA), "Atlanta pan 0.5 m", "gdal")
    labels = QgsVectorLayer(str(atlanta_polygon_labels), "labels (building / other)", "ogr")
    assert raster.isValid() and labels.isValid()
    QgsProject.instance().addMapLayers([raster, labels])
    return raster, labels


@pytest.fixture
def dialog(qgis_iface, provider, layers):
    dlg = FinetuneDialog(qgis_iface, None, layer=layers[0])
    dlg.resize(1100, 860)
    dlg.show()
    QApplication.processEvents()
    yield dlg
    if dlg.job is not None and not dlg.job.done:
        dlg.job.cancel()
        wait_for(lambda: dlg.job.done, 60, "the cancelled job")
    dlg.close()


def test_class_table_round_trips(dialog):
    # classes read from the base model (label value = class id)
    entries = dialog.class_table.entries()
    assert [e.name for e in entries] == MODEL_CLASSES
    assert [e.value for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0].colour == "#3C1098" and entries[0].prompt == "A satellite image of building"
    custom = [ClassEntry("building", "#D0021B", "A satellite image of buildings", "building"),
              ClassEntry("solar panels", "#17BECF", "A satellite image of solar panels", 7),
              ClassEntry("other", "#9B9B9B", "A satellite image of other land", "other")]
    dialog.class_table.set_entries(custom)
    assert dialog.class_table.entries() == custom
    # rename, add, remove through the editor
    dialog.class_table.rename(1, "photovoltaics")
    dialog.class_table.add_button.click()
    assert [e.name for e in dialog.class_table.entries()] == ["building", "photovoltaics", "other", "new class 1"]
    dialog.class_table.table.selectRow(3)
    dialog.class_table.remove_button.click()
    got = dialog.class_table.entries()
    assert [e.name for e in got] == ["building", "photovoltaics", "other"]
    # the matrix of srmf:finetune and the CLASSES.json of the engine carry the same table
    assert classtable.from_matrix(classtable.to_matrix(got)) == got
    data = classtable.to_json(got)["classes"]
    assert data[1] == {"name": "photovoltaics", "colour": "#17BECF", "prompt": "A satellite image of solar panels",
                       "value": 7}


def test_classes_from_the_labels_class_field(dialog, layers):
    raster, labels = layers
    dialog.set_pair(0, raster, labels)
    assert dialog.field_combo.isEnabled()
    assert dialog.label_field() == "class"  # guessed from the field names
    dialog.load_label_classes()
    entries = {e.name: e.value for e in dialog.class_table.entries()}
    assert entries["building"] == "building"  # same name: takes the label's value
    assert entries["other"] == "other"  # a new class from the field's values
    assert "added" in dialog.last_message


def test_invalid_input_is_refused_with_a_message(dialog, layers, tmp_path, artifacts):
    raster, labels = layers
    dialog.set_pair(0, raster, labels)
    dialog.output.setFilePath(str(tmp_path / "model.srmf"))
    # polygon labels without a class field
    dialog.set_label_field("")
    assert not dialog.run()
    assert "class field" in dialog.last_message
    assert dialog.job is None
    dialog.set_label_field("class")
    # a text class field and classes without a label value
    dialog.class_table.set_entries([ClassEntry("building", "", "", None)])
    assert not dialog.run() and "label value" in dialog.last_message
    # no classes
    dialog.class_table.set_entries([])
    assert not dialog.run()
    assert "class table is empty" in dialog.last_message
    # duplicate class names
    dialog.class_table.set_entries([ClassEntry("a", "", "", "building"), ClassEntry("A", "", "", "other")])
    assert not dialog.run() and "appears twice" in dialog.last_message
    # no output file
    dialog.class_table.set_entries([ClassEntry("building", "", "", "building")])
    dialog.output.setFilePath("")
    assert not dialog.run() and "Fine-tuned model" in dialog.last_message
    # no labels
    dialog.pairs.cellWidget(0, 1).setLayer(None)
    assert not dialog.run() and "Choose the labels" in dialog.last_message
    QApplication.processEvents()
    dialog.grab().save(str(artifacts / "finetune_dialog_refused.png"))
    assert dialog.job is None and not (tmp_path / "model.srmf").exists()


def test_finetune_dialog_runs_shows_iou_and_segments_with_the_new_model(dialog, layers, tmp_path, artifacts):
    raster, labels = layers
    dialog.set_pair(0, raster, labels)
    dialog.set_label_field("class")
    dialog.class_table.set_entries([
        ClassEntry("building", "#D0021B", "A satellite image of buildings", "building"),
        ClassEntry("other", "#9B9B9B", "A satellite image of streets, trees and lawns", "other")])
    dialog.iterations.setValue(2)
    dialog.batch_size.setValue(2)
    dialog.device.setCurrentIndex(1)  # CPU
    out = tmp_path / "atlanta_buildings.srmf"
    dialog.output.setFilePath(str(out))
    assert dialog.parameters()["MODEL_BANDS"] is None  # blank: the base model's bands
    dialog.model_bands.setText("red, green, blue, nir")
    assert dialog.parameters()["MODEL_BANDS"] == "red,green,blue,nir"  # what srmf:finetune's Model bands takes
    dialog.model_bands.setText("")
    QApplication.processEvents()
    dialog.grab().save(str(artifacts / "finetune_dialog.png"))
    assert dialog.run(), getattr(dialog, "last_message", "")
    assert not dialog.run_button.isEnabled() and dialog.cancel_button.isEnabled()
    wait_for(lambda: dialog.job.done, 900, "the fine-tuning task")
    assert dialog.job.ok, dialog.job.error
    assert out.exists() and dialog.model_path == str(out)
    assert dialog.progress.value() == 100
    names = [dialog.iou_table.item(r, 0).text() for r in range(dialog.iou_table.rowCount())]
    assert names and set(names) <= {"building", "other"}
    assert "mIoU" in dialog.iou_label.text()
    assert dialog.segment_button.isEnabled()
    assert "Validation at iteration" in dialog.log.toPlainText()
    QApplication.processEvents()
    dialog.grab().save(str(artifacts / "finetune_dialog_done.png"))
    # "Segment with the new model" on the training raster
    job = dialog.segment_with_new_model(OUTPUT=str(tmp_path / "atlanta_buildings.tif"), TILE_SIZE=512, STRIDE=512)
    wait_for(lambda: job.done, 600, "the segmentation task")
    assert job.ok, job.error
    added = [l for l in QgsProject.instance().mapLayers().values() if l.source() == str(tmp_path / "atlanta_buildings.tif")]
    assert len(added) == 1
    assert [c.label for c in added[0].renderer().classes()] == ["building", "other"]


def test_a_pretrained_encoder_is_accepted_as_the_base_model(dialog, tmp_path):
    """srmf:pretrain's output (issue 14) in the base-model field: taken, and the dialog says what it is."""
    from srmf_qgis_testing import ADELAIDE, engine_cli

    model = tmp_path / "encoder.srmf"
    engine_cli("pretrain", model, "--raster", ADELAIDE, "--method", "simclr", "--iterations", 1, "--batch-size", 2,
               "--view", 64, "--device", "cpu")
    dialog.base_model.setFilePath(str(model))
    QApplication.processEvents()
    assert dialog.base_model_path() == str(model)
    assert "pretrained without labels (simclr, 1 steps)" in dialog.last_message
    assert "its head is untrained" in dialog.last_message
    assert [e.name for e in dialog.class_table.entries()] == MODEL_CLASSES  # the table is kept for editing
