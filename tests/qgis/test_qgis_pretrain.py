"""srmf:pretrain through QGIS Processing on real rasters (issue 14): the model it writes, fine-tuning from it
(srmf:finetune with a frozen encoder), segment refusing it, cancel, bad input."""
from __future__ import annotations

import os

import pytest
from srmf_qgis_testing import (ADELAIDE, ATLANTA, DUBAI_IMAGE, make_feedback, process_group_members, run_alg)
from qgis.core import QgsApplication, QgsProcessingException

SMALL = {"BATCH_SIZE": 2, "VIEW": 64, "DEVICE": 1, "MINUTES": 5.0}


@pytest.fixture(scope="module")
def pretrained(provider, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "encoder.srmf"
    fb = make_feedback()
    res = run_alg("srmf:pretrain", {"INPUT_RASTERS": [str(ADELAIDE), str(ATLANTA)], "METHOD": 1, "ITERATIONS": 2, **SMALL,
                                    "OUTPUT_MODEL": str(out)}, fb)
    return {"results": res, "feedback": fb, "path": out}


def test_pretrain_writes_an_encoder_model(pretrained):
    res, fb, path = pretrained["results"], pretrained["feedback"], pretrained["path"]
    assert res["OUTPUT_MODEL"] == str(path) and path.exists() and res["STEPS"] == 2
    assert any("Pretrained model:" in i and "grass" in i and "use it as the base model" in i for i in fb.infos)
    assert any("loss" in m for m in fb.metrics)  # the loss relayed as it comes
    assert fb.progress and max(fb.progress) >= 99
    # the command line is logged (the same job can run headless); Atlanta's single band is replicated
    assert any("pretrain" in c and "--minutes" in c and "--method grass" in c for c in fb.commands)
    assert any("sample_geotiff.tif" in i and "bands 1,1,1" in i for i in fb.infos)
    info = run_alg("srmf:modelinfo", {"MODEL": str(path), "OUTPUT_CLASSES": None, "OUTPUT_HTML": None})
    assert info["HEADER"]["provenance"]["untrained_head"] is True
    assert info["HEADER"]["pretraining"]["method"] == "grass"
    alg = QgsApplication.processingRegistry().algorithmById("srmf:pretrain")
    assert "Experimental" in alg.shortHelpString()


def test_segment_refuses_the_pretrained_model(pretrained, tmp_path):
    out = tmp_path / "classes.tif"
    with pytest.raises(QgsProcessingException, match="untrained decode head"):
        run_alg("srmf:segment", {"INPUT": str(ADELAIDE), "MODEL": str(pretrained["path"]), "OUTPUT": str(out),
                                 "OUTPUT_AREAS": None})
    assert list(tmp_path.iterdir()) == []


def test_finetune_from_the_pretrained_encoder_frozen(pretrained, dubai_labels, tmp_path):
    out = tmp_path / "tuned.srmf"
    fb = make_feedback()
    res = run_alg("srmf:finetune", {
        "INPUT_RASTERS": [str(DUBAI_IMAGE)], "LABELS": [str(dubai_labels)], "BASE_MODEL": str(pretrained["path"]),
        "FREEZE_ENCODER": True, "MAX_ITERATIONS": 2, "BATCH_SIZE": 2, "CROP_SIZE": 128, "VALIDATION_SHARE": 0.25,
        "DEVICE": 1, "OUTPUT_MODEL": str(out), "OUTPUT_METRICS": None}, fb)
    assert res["OUTPUT_MODEL"] == str(out) and out.exists()
    assert any("--freeze-encoder" in c for c in fb.commands)
    info = run_alg("srmf:modelinfo", {"MODEL": str(out), "OUTPUT_CLASSES": None, "OUTPUT_HTML": None})
    assert not info["HEADER"]["provenance"].get("untrained_head")
    assert info["HEADER"]["encoder_pretraining"]["method"] == "grass"


def test_cancel_stops_pretraining_and_leaves_nothing(provider, tmp_path):
    out = tmp_path / "cancelled.srmf"
    fb = make_feedback(cancel_after_progress=True)
    with pytest.raises(QgsProcessingException, match="(?i)cancel"):
        run_alg("srmf:pretrain", {"INPUT_RASTERS": [str(ADELAIDE)], "ITERATIONS": 50, **SMALL,
                                  "OUTPUT_MODEL": str(out)}, fb)
    pid = fb.worker_pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert process_group_members(pid) == []
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_refused_before_anything_runs(provider, tmp_path):
    alg = QgsApplication.processingRegistry().algorithmById("srmf:pretrain")
    from qgis.core import QgsProcessingContext

    ok, msg = alg.checkParameterValues({"INPUT_RASTERS": [], "OUTPUT_MODEL": str(tmp_path / "x.srmf")},
                                       QgsProcessingContext())
    assert not ok
    small = tmp_path / "small.tif"
    from osgeo import gdal

    gdal.Translate(str(small), str(ADELAIDE), srcWin=[0, 0, 40, 40])
    with pytest.raises(QgsProcessingException, match="small.tif is 40 x 40 pixels: smaller than a view"):
        run_alg("srmf:pretrain", {"INPUT_RASTERS": [str(small)], "ITERATIONS": 2, **SMALL,
                                  "OUTPUT_MODEL": str(tmp_path / "x.srmf")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.tif"]
