"""The leave-one-tile-out recipe study (bench/cv.py, issue 12): the record survives a stop (finished runs are
skipped, the rest run), and the report pairs recipes by fold, seed and budget."""
from __future__ import annotations

import json

import pytest
import torch

from bench import cv

CLASSES = ("building", "land", "road", "vegetation", "water")


def _row(recipe, fold, seed, miou, iterations=300):
    return {"fold": fold, "recipe": recipe, "seed": seed, "iterations": iterations, "eval_interval": iterations,
            "miou": miou, "per_class_iou": {c: miou for c in CLASSES}, "seconds": 1.0}


def test_grid_skips_recorded_runs_and_appends_the_others(tmp_path, monkeypatch):
    record = tmp_path / "runs.jsonl"
    record.write_text(json.dumps(_row("flip", "tile_1", 0, 0.5)) + "\n")
    calls = []

    def fake_run(fold, recipe, seed, iterations, out, device, eval_interval=0):
        calls.append((fold, recipe, seed))
        return _row(recipe, fold, seed, 0.4)

    monkeypatch.setattr(cv, "run_one", fake_run)
    args = ["--record", str(record), "--out", str(tmp_path / "w"), "--folds", "tile_1,tile_2",
            "--recipes", "flip,plain-head", "--seeds", "0", "--iterations", "300", "--eval-interval", "300"]
    assert cv.main(args) == 0
    assert calls == [("tile_1", "plain-head", 0), ("tile_2", "flip", 0), ("tile_2", "plain-head", 0)]
    assert len(record.read_text().splitlines()) == 4
    calls.clear()
    assert cv.main(args) == 0 and calls == []  # all recorded: nothing runs again
    assert cv.main(args[:-2]) == 0 and len(calls) == 4  # another validation schedule is another run


def test_report_pairs_by_fold_seed_and_budget():
    rows = []
    for fold in ("tile_1", "tile_2", "tile_3"):
        for seed, base in ((0, 0.50), (1, 0.55)):
            rows.append(_row("flip", fold, seed, base))
            rows.append(_row("d4", fold, seed, base + (0.02 if fold != "tile_3" else -0.01)))
    rows.append(_row("d4", "tile_1", 0, 0.9, iterations=800))  # another budget: not paired with the 300 runs
    text = cv.report(rows)
    line = next(ln for ln in text.splitlines() if ln.startswith("| d4 | 300 |"))
    assert "| 6 | 0.535 ± 0.031 |" in line
    assert "+0.010 [-0.006, +0.026], p 0.17, ahead 4/6" in line
    assert next(ln for ln in text.splitlines() if ln.startswith("| d4 | 800 |")).endswith("| n/a |")
    assert next(ln for ln in text.splitlines() if ln.startswith("| flip | 300 |")).endswith("| — |")


def test_plain_head_turns_all_three_srmf_parts_off():
    assert cv.RECIPES["plain-head"] == dict(augment="flip", mars=False, srr=False, text_fusion=False)
    assert cv.RECIPES["flip"] == dict(augment="flip")  # the default recipe: SRMF's parts on
    with pytest.raises(KeyError):
        cv.run_one("tile_1", "no-such-recipe", 0, 1, None, "cpu")


def test_default_recipe_on_all_tiles_trains_without_validation(tmp_path):
    """``bench.recipes default --all-tiles``: every Dubai tile trained on, none held out; the model file says so."""
    from bench.recipes import ALL_TILES, main
    from core.model.modelfile import read_header

    out = tmp_path / "all.srmf"
    assert main(["default", "--output", str(out), "--iterations", "1", "--all-tiles", "--recipe", "d4",
                 "--device", "cpu", "--eval-interval", "7", "--json"]) == 0
    prov = read_header(out)["provenance"]
    assert len(ALL_TILES) == 7 and prov["validation_images"] == [] and prov["validation"] == "no validation data"
    assert "train " + ", ".join(ALL_TILES) + " (62 images); no validation" in prov["training_data"][0]
    assert prov["recipe"]["augment"] == "d4" and prov["recipe"]["iterations"] == 1
    assert prov["recipe"]["eval_interval"] == 7  # --eval-interval reaches the recipe


def test_cv_estimate_travels_in_the_header_of_an_all_tiles_model(tmp_path):
    from bench.recipes import attach_cv_metrics
    from conftest import make_random_model
    from core.model.modelfile import load_model, read_header

    record = tmp_path / "runs.jsonl"
    rows = [_row("plain-head", f, s, 0.5 + 0.01 * i) for i, (f, s) in enumerate(
        (f, s) for f in ("tile_1", "tile_2", "tile_3") for s in (0, 1))]
    rows.append(_row("plain-head", "tile_1", 0, 0.9, iterations=900))  # another budget: not in the estimate
    rows.append(_row("flip", "tile_1", 0, 0.1))  # another recipe: neither
    record.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_random_model(tmp_path / "m.srmf")
    before = load_model(model).model.state_dict()
    metrics = attach_cv_metrics(model, "plain-head", 300, record)
    header = read_header(model)
    assert header["metrics"] == metrics and metrics["runs"] == 6 and metrics["miou"] == pytest.approx(0.525)
    assert metrics["per_class_iou"]["road"] == pytest.approx(0.525) and metrics["folds"] == ["tile_1", "tile_2", "tile_3"]
    assert "leave-one-tile-out cross-validation" in metrics["estimate"]
    after = load_model(model).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the header changed
    with pytest.raises(ValueError, match="no finished cross-validation run"):
        attach_cv_metrics(model, "d4", 300, record)
