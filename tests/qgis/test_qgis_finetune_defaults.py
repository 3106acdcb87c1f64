"""srmf:finetune and the fine-tune dialog start from the engine's recipe (TRAINING_DEFAULTS, checked against
core's TrainConfig by tests/core/test_finetune_defaults.py), and the training crop is CROP_SIZE, not
srmf:segment's TILE_SIZE (a window)."""
from __future__ import annotations

from qgis.core import QgsApplication

from srmf_qgis.algorithms.finetune import TRAINING_DEFAULTS


def test_finetune_parameters_default_to_the_engine_recipe(provider):
    ft = QgsApplication.processingRegistry().algorithmById("srmf:finetune")
    defaults = {d.name(): d.defaultValue() for d in ft.parameterDefinitions()}
    assert "TILE_SIZE" not in defaults
    assert ft.parameterDefinition("CROP_SIZE").description() == "Training crop size (pixels)"
    assert defaults["MAX_ITERATIONS"] == TRAINING_DEFAULTS["iterations"] == 2000
    assert defaults["LEARNING_RATE"] == TRAINING_DEFAULTS["lr"]
    assert defaults["CROP_SIZE"] == TRAINING_DEFAULTS["crop"]
    assert defaults["VALIDATION_INTERVAL"] == TRAINING_DEFAULTS["eval_interval"]
    assert defaults["ACCUMULATE"] == TRAINING_DEFAULTS["accumulate"]
    assert defaults["SEED"] == TRAINING_DEFAULTS["seed"]
    assert defaults["VALIDATION_SHARE"] == TRAINING_DEFAULTS["val_share"]
    assert defaults["CLASS_BALANCING"] is TRAINING_DEFAULTS["class_balancing"]


def test_the_dialog_starts_from_the_same_recipe(qgis_iface, provider):
    from srmf_qgis.ui.finetune_dialog import FinetuneDialog

    dlg = FinetuneDialog(qgis_iface, None, load_base_classes=False)
    try:
        assert dlg.iterations.value() == TRAINING_DEFAULTS["iterations"]
        assert dlg.val_share.value() == TRAINING_DEFAULTS["val_share"]
        assert dlg.balancing.isChecked() is TRAINING_DEFAULTS["class_balancing"]
    finally:
        dlg.close()
