"""Accuracy figures from a confusion matrix (rows = reference, columns = prediction, pixel counts): IoU, mIoU,
OA, kappa, precision, recall, F1. Training validation and the evaluate command share them."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence
import numpy as np
from core.classtable import IGNORE


# ------------------------------------------------------------------------------------------------
# Confusion matrix and metrics
# ------------------------------------------------------------------------------------------------
def confusion_matrix(pred: np.ndarray, ref: np.ndarray, num_classes: int, ignore: int = IGNORE,
                     out: Optional[np.ndarray] = None) -> np.ndarray:
    """Confusion matrix of class indices; rows = reference, columns = prediction.

    Streaming: call it on each block with ``out=`` the running matrix (it is added to in place and
    returned), or sum the matrices of the blocks.

    Args:
        pred, ref: integer arrays of the same shape (any shape), class indices ``0..num_classes-1``;
            a pixel that is ``ignore`` in either array is not counted.
        num_classes: K. ignore: the ignored index (255).
        out: optional int64 (K, K) matrix to accumulate into.

    Returns:
        int64 (K, K): ``C[r, p]`` = number of pixels of reference class r predicted as p.

    Raises:
        ValueError: shapes differ, or a non-ignored value is outside ``0..K-1``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    K = int(num_classes)
    keep = (pred != ignore) & (ref != ignore)
    p = pred[keep].astype(np.int64, copy=False)
    r = ref[keep].astype(np.int64, copy=False)
    if p.size and (p.min() < 0 or p.max() >= K or r.min() < 0 or r.max() >= K):
        raise ValueError(f"class index outside 0..{K - 1} (prediction {p.min()}..{p.max()}, "
                         f"reference {r.min()}..{r.max()})")
    cm = np.bincount(r * K + p, minlength=K * K).reshape(K, K).astype(np.int64, copy=False)
    if out is None:
        return cm
    out += cm
    return out


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den > 0 else None


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> Dict[str, Any]:
    """Accuracy metrics of a confusion matrix (see the module docstring for the exact rules).

    Args:
        cm: int (K, K), rows = reference, columns = prediction. class_names: K names.

    Returns:
        A JSON-able dict: ``overall_accuracy``, ``kappa``, ``miou``, ``tail_miou``, ``tail_classes``
        (names), ``mean_f1`` (over the same classes as mIoU), ``per_class`` (list of ``{"index",
        "name", "precision", "recall", "f1", "iou", "support", "predicted", "frequency", "tail"}``),
        ``frequencies`` (K floats), ``median_frequency``, ``pixels_evaluated``, ``confusion_matrix``
        (lists of int). Undefined values (a zero denominator) are ``None``.

    Raises:
        ValueError: ``cm`` is not square, is negative, or does not match ``class_names``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    K = cm.shape[0]
    if len(class_names) != K:
        raise ValueError(f"{len(class_names)} class names for a {K} x {K} confusion matrix")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative counts")
    n = int(cm.sum())
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    oa = _ratio(int(tp.sum()), n)
    kappa = None
    if n > 0:
        pe = float((support.astype(np.float64) * predicted.astype(np.float64)).sum()) / (float(n) * float(n))
        if pe < 1.0:
            kappa = (oa - pe) / (1.0 - pe)
    freqs = [(_ratio(int(s), n) or 0.0) for s in support]
    present = [k for k in range(K) if support[k] > 0]
    median = float(np.median([freqs[k] for k in present])) if present else None
    tail = [k for k in present if freqs[k] < median] if present else []
    per_class = []
    for k in range(K):
        s, c, t = int(support[k]), int(predicted[k]), int(tp[k])
        per_class.append({
            "index": k, "name": str(class_names[k]),
            "precision": _ratio(t, c), "recall": _ratio(t, s),
            "f1": _ratio(2 * t, s + c), "iou": _ratio(t, s + c - t),
            "support": s, "predicted": c, "frequency": freqs[k], "tail": k in tail,
        })
    return {
        "overall_accuracy": oa,
        "kappa": kappa,
        "miou": _mean([pc["iou"] for pc in per_class]),
        "tail_miou": _mean([per_class[k]["iou"] for k in tail]),
        "tail_classes": [str(class_names[k]) for k in tail],
        "mean_f1": _mean([pc["f1"] for pc in per_class]),
        "median_frequency": median,
        "frequencies": freqs,
        "per_class": per_class,
        "pixels_evaluated": n,
        "confusion_matrix": cm.tolist(),
    }


# -- validation ------------------------------------------------------------------------------------
def confusion(pred: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """int64 (K, K) confusion matrix, rows = reference, columns = prediction; 255 ignored in either."""
    m = (ref != IGNORE) & (pred != IGNORE) & (ref < k) & (pred < k)
    return np.bincount(ref[m].astype(np.int64) * k + pred[m], minlength=k * k).reshape(k, k)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN where the class is neither in the reference nor predicted."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
