"""PRECISION (advanced) of srmf:segment, srmf:findclass and srmf:finetune: the engine's ``--precision
auto|fp32|bf16``. The command lines are taken from the feedback as the algorithms start the engine; the
worker itself is not started (the run that does start it with float32 is in test_qgis_segment.py)."""
from __future__ import annotations

import pytest
from srmf_qgis_testing import ATLANTA, ATLANTA_BUILDINGS, DUBAI_IMAGE, OSBS, make_feedback, run_alg
from qgis.core import QgsApplication, QgsProcessingException, QgsProcessingParameterDefinition

from srmf_qgis import runtime
from srmf_qgis.algorithms.base import PRECISIONS

ALGORITHMS = ("srmf:segment", "srmf:findclass", "srmf:finetune")
NOT_STARTED = "engine not started by the test"


def _parameters(alg_id: str, tmp_path, dubai_labels) -> dict:
    """The smallest real parameters that get each algorithm as far as starting the engine."""
    if alg_id == "srmf:segment":
        return {"INPUT": str(OSBS), "OUTPUT": str(tmp_path / "o.tif"), "OUTPUT_AREAS": None}
    if alg_id == "srmf:findclass":
        return {"INPUT": str(ATLANTA), "EXAMPLES": str(ATLANTA_BUILDINGS), "OUTPUT_FOLDER": str(tmp_path / "fc")}
    return {"INPUT_RASTERS": [str(DUBAI_IMAGE)], "LABELS": [str(dubai_labels)],
            "OUTPUT_MODEL": str(tmp_path / "m.srmf"), "OUTPUT_METRICS": None}


@pytest.fixture
def engine_not_started(monkeypatch):
    """runtime.run_engine builds and reports the command line, then fails where it would start the worker."""
    def refuse(py, argv):
        raise runtime.EngineError(NOT_STARTED)

    monkeypatch.setattr(runtime, "_start_worker", refuse)


def _engine_command(alg_id: str, params: dict) -> str:
    fb = make_feedback()
    with pytest.raises(QgsProcessingException, match=NOT_STARTED):
        run_alg(alg_id, params, fb)
    assert len(fb.commands) == 1
    return fb.commands[0]


@pytest.mark.parametrize("alg_id", ALGORITHMS)
def test_precision_is_an_advanced_choice_defaulting_to_automatic(provider, alg_id):
    alg = QgsApplication.processingRegistry().algorithmById(alg_id)
    p = alg.parameterDefinition("PRECISION")
    assert p is not None and p.type() == "enum"
    assert p.description() == "Precision"
    assert p.options() == ["Automatic (bf16 where the CPU or GPU runs it natively and it matches float32)",
                           "float32 (exact)", "bf16"] == PRECISIONS
    assert p.defaultValue() == 0
    assert p.flags() & QgsProcessingParameterDefinition.FlagAdvanced
    assert not p.flags() & QgsProcessingParameterDefinition.FlagOptional


@pytest.mark.parametrize("alg_id", ALGORITHMS)
def test_precision_choice_reaches_the_engine_command_line(provider, engine_not_started, dubai_labels, tmp_path,
                                                          alg_id):
    params = _parameters(alg_id, tmp_path, dubai_labels)
    default = _engine_command(alg_id, params)
    assert f" -m core {alg_id.split(':')[1]} " in default
    assert "--precision auto" in default  # PRECISION left out: automatic
    fp32 = _engine_command(alg_id, {**params, "PRECISION": PRECISIONS.index("float32 (exact)")})
    assert "--precision fp32" in fp32 and "--precision auto" not in fp32
    assert "--precision bf16" in _engine_command(alg_id, {**params, "PRECISION": 2})
