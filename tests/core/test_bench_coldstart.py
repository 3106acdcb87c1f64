"""The metrics of the cold-start benchmark (bench/coldstart.py): average precision, recall at a review
budget and the paired comparison that decides findclass's default K."""
from __future__ import annotations

import numpy as np
import pytest

from bench.coldstart import average_precision, paired_comparison, recall_at


def test_average_precision_and_recall_at_a_budget():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = np.array([True, False, True, False, False])
    # hits at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert average_precision(scores, positive) == pytest.approx((1 + 2 / 3) / 2)
    assert recall_at(scores, positive, 2) == pytest.approx(0.5)
    assert recall_at(scores, positive, 3) == pytest.approx(1.0)
    assert average_precision(scores, np.zeros(5, bool)) is None
    # a perfect ranking has AP 1; the reversed one is the worst
    assert average_precision(-scores, positive) < average_precision(scores, positive) < 1.0


def test_paired_comparison_pairs_by_class_k_and_draw():
    rows = []
    for cls in ("building", "road"):
        for k in (1, 5):
            for d in range(3):
                base = 0.2 + 0.1 * d  # a large draw-to-draw spread ...
                rows.append({"class": cls, "k": k, "draw": d, "method": "prototype", "auprc": base})
                rows.append({"class": cls, "k": k, "draw": d, "method": "CAT-3", "auprc": base + 0.01})
                rows.append({"class": cls, "k": k, "draw": d, "method": "random", "auprc": None})
    out = paired_comparison(rows, resamples=500)
    # ... that the pairing removes: CAT-3 is 0.01 better on every one of the 12 pairs
    assert out["CAT-3"]["pairs"] == 12 and out["CAT-3"]["wins"] == 12 and out["CAT-3"]["losses"] == 0
    assert out["CAT-3"]["mean_difference"] == pytest.approx(0.01)
    assert out["CAT-3"]["ci95"][0] == pytest.approx(0.01) and out["CAT-3"]["ci95"][1] == pytest.approx(0.01)
    assert "random" not in out  # no AUPRC (no positives) → no pair
