"""The label-efficiency evaluation of pretraining (bench/pretrain_eval.py, issue 14): the few-label draws that
every arm shares, and the report's paired differences."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.pretrain_eval import FT_WINDOW, few_label_images, report


def test_few_label_draws_hold_the_fraction_in_windows_and_repeat_by_draw():
    from core.finetune.sources import load_dubai

    images = load_dubai(["tile_1"], parts=[1, 2, 3])
    total = sum(int((im.label != 255).sum()) for im in images)
    for fraction in (0.01, 0.05):
        kept, share = few_label_images(images, fraction, draw=0)
        got = sum(int((im.label != 255).sum()) for im in kept)
        assert share == pytest.approx(got / total)
        assert fraction <= share < fraction + FT_WINDOW ** 2 / total  # stops at the window that reaches it
        by_name = {im.name: im for im in images}
        for im in kept:  # kept labels are the original ones; the rest is ignore
            orig = by_name[im.name].label
            inside = im.label != 255
            assert np.array_equal(im.label[inside], orig[inside])
            assert np.array_equal(im.image, by_name[im.name].image)
        again, _ = few_label_images(images, fraction, draw=0)
        assert all(np.array_equal(a.label, b.label) for a, b in zip(kept, again))  # a draw is a seed
    other, _ = few_label_images(images, 0.05, draw=1)
    assert any(not np.array_equal(a.label, b.label) for a, b in zip(few_label_images(images, 0.05, 0)[0], other))


def test_report_pairs_arms_by_draw_and_measures_the_noise_floor(tmp_path):
    rows = []
    for d in range(3):
        for arm, gain in (("E0", 0.0), ("E1", 0.02), ("E2", 0.03)):
            rows.append({"kind": "finetune", "arm": arm, "fraction": 0.01, "draw": d, "mode": "full", "seed": d,
                         "miou": 0.3 + 0.1 * d + gain})  # a large draw-to-draw spread, a constant gain
    rows.append({"kind": "finetune", "arm": "E0", "fraction": 0.01, "draw": 0, "mode": "full", "seed": 100,
                 "miou": 0.305})
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = report(tmp_path)
    assert "| 1% | full | 0.4000 ± 0.1000 (n=3) | 0.4200 ± 0.1000 (n=3) | 0.4300 ± 0.1000 (n=3) | +0.0100" in text
    assert "E2-E1 over all cells: mean +0.0100 mIoU" in text and "ahead in 3 of 3" in text
    assert "noise floor (E0, same labels, another training seed): mean |ΔmIoU| 0.0050 over 1 pairs" in text
    assert (tmp_path / "report.md").read_text().startswith("# Pretraining evaluation")


@pytest.mark.parametrize("e2_gain, met", [(0.05, "met"), (-0.01, "NOT met")])
def test_report_verdict_follows_the_rule(tmp_path, e2_gain, met):
    rows = [{"kind": "finetune", "arm": arm, "fraction": f, "draw": d, "mode": "full", "seed": d,
             "miou": 0.3 + 0.05 * d + gain}
            for f in (0.01, 0.05) for d in range(3) for arm, gain in (("E0", 0.0), ("E1", 0.01), ("E2", 0.01 + e2_gain))]
    rows.append({"kind": "finetune", "arm": "E0", "fraction": 0.01, "draw": 0, "mode": "full", "seed": 100, "miou": 0.31})
    (tmp_path / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = report(tmp_path)
    assert f"floor): {met} (mean {e2_gain:+.4f}, ahead in {2 if e2_gain > 0 else 0} of 2 cells, twice the noise floor 0.0200)" in text
    assert f"at 1% of the labels: E1 - E0 +0.0100 (n=3), E2 - E0 {0.01 + e2_gain:+.4f} (n=3)" in text
