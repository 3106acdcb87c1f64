"""One check and one default per fine-tuning setting (issue 10): :meth:`TrainConfig.validate` refuses the
same bad values on the command line and through :func:`core.finetune.job.finetune`, and the command
line's defaults are :class:`TrainConfig`'s."""
from __future__ import annotations

import io
import json
from dataclasses import fields

import pytest

from core.errors import InputError
from core.finetune.config import VAL_SHARE, TrainConfig
from core.protocol import Reporter

BAD = [
    (["--crop", "100"], "--crop must be a multiple of 32 pixels, at least 64 (got 100)"),
    (["--crop", "32"], "--crop must be a multiple of 32 pixels, at least 64 (got 32)"),
    (["--iterations", "0"], "--iterations must be at least 1 (got 0)"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (["--accumulate", "0"], "--accumulate must be at least 1 (got 0)"),
    (["--eval-interval", "0"], "--eval-interval must be at least 1 (got 0)"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval must be at least 1 (got -1)"),
    (["--batch-size", "6", "--accumulate", "4"], "--batch-size (6) must be a multiple of --accumulate (4)"),
    (["--lr", "0"], "--lr must be positive (got 0.0)"),
    (["--contrastive-weight", "-1"], "--contrastive-weight must be 0 (off) or positive (got -1.0)"),
    (["--contrastive-temperature", "0"], "--contrastive-temperature must be positive (got 0.0)"),
    (["--contrastive-anchors", "1"], "--contrastive-anchors must be at least 2 (got 1)"),
    (["--contrastive-queue", "-5"], "--contrastive-queue must be 0 (none) or positive (got -5)"),
]


def _args(tmp_path, extra):
    return ["finetune", str(tmp_path / "m.srmf"), "--raster", "x.tif", "--labels", "y.tif", *extra]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_the_cli_and_the_function_refuse_the_same_bad_values(tmp_path, capsys, extra, message):
    from core.cli import build_parser, main
    from core.finetune.command import config_from_args
    from core.finetune.job import finetune

    assert main(_args(tmp_path, extra) + ["--json"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"] == message
    config = config_from_args(build_parser("finetune").parse_args(_args(tmp_path, extra)))
    with pytest.raises(InputError) as info:
        config.validate()
    assert str(info.value) == message
    with pytest.raises(InputError) as info:  # refused before the images, the classes or the model are looked at
        finetune(tmp_path / "f.srmf", images=[], classes=[], config=config, device="cpu",
                 reporter=Reporter(json_mode=True, stream=io.StringIO()))
    assert str(info.value) == message
    assert not list(tmp_path.iterdir())


def test_the_defaults_pass_validation():
    TrainConfig().validate()
    TrainConfig(crop=64, batch_size=6, accumulate=3, contrastive_weight=0.1).validate()


def test_cli_defaults_are_the_train_config_defaults():
    from core.cli import build_parser
    from core.finetune.command import config_from_args

    args = build_parser("finetune").parse_args(["finetune", "m.srmf"])
    assert config_from_args(args) == TrainConfig()
    assert args.val_share == VAL_SHARE
    # every option that maps to a TrainConfig field takes the field's default
    dests = {a.dest: a.default for a in build_parser("finetune")._subparsers._group_actions[0]
             .choices["finetune"]._actions}
    names = {f.name for f in fields(TrainConfig)} | {"warmup"}
    for dest, default in dests.items():
        if dest in names:
            field = "warmup_iterations" if dest == "warmup" else dest
            assert default == getattr(TrainConfig(), field), dest


def test_finetune_and_split_validation_default_to_the_same_share():
    import inspect

    from core.finetune.job import finetune, split_validation

    assert inspect.signature(finetune).parameters["val_share"].default == VAL_SHARE
    assert inspect.signature(split_validation).parameters["val_share"].default == VAL_SHARE


def _qgis_training_defaults() -> dict:
    """TRAINING_DEFAULTS of srmf_qgis/algorithms/finetune.py, read from its source (QGIS is not imported)."""
    import ast

    from conftest import ROOT

    tree = ast.parse((ROOT / "srmf_qgis" / "algorithms" / "finetune.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TRAINING_DEFAULTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("srmf_qgis/algorithms/finetune.py has no TRAINING_DEFAULTS")


def test_qgis_states_the_engine_defaults():
    """QGIS cannot import the engine, so it states the recipe's defaults again: they must be TrainConfig's
    (srmf:finetune and the fine-tune dialog read them from TRAINING_DEFAULTS; see
    tests/qgis/test_qgis_finetune_defaults.py)."""
    qgis = _qgis_training_defaults()
    engine = TrainConfig()
    assert qgis.pop("val_share") == VAL_SHARE
    assert qgis.pop("class_balancing") is engine.mars is engine.srr
    assert qgis == {k: getattr(engine, k) for k in qgis}
    assert qgis["iterations"] == 2000  # the CLI's default, now QGIS's too (it was 1000)


def test_qgis_states_no_other_training_number():
    """The algorithm and the dialog take the recipe's numbers from TRAINING_DEFAULTS, never a literal."""
    from conftest import ROOT

    alg = (ROOT / "srmf_qgis" / "algorithms" / "finetune.py").read_text(encoding="utf-8")
    dialog = (ROOT / "srmf_qgis" / "ui" / "finetune_dialog.py").read_text(encoding="utf-8")
    for literal in ("defaultValue=1000", "defaultValue=2000", "defaultValue=6e-5", "defaultValue=512",
                    "defaultValue=200", "defaultValue=0.2"):
        assert literal not in alg, literal
    for literal in ("iterations.setValue(", "val_share.setValue(", "balancing.setChecked("):
        line = next(l for l in dialog.splitlines() if literal in l)
        assert "TRAINING_DEFAULTS[" in line, line
