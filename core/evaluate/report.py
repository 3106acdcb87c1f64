"""The evaluation's outputs: the per-class CSV, the confusion-matrix CSV, JSON and the text table of the log,
written atomically (nothing half-written is left when a write fails)."""
from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path
from typing import List, Tuple
import numpy as np
from core.files import atomic_output


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def _csv_text(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["id", "name", "support", "frequency", "precision", "recall", "f1", "iou", "tail_class", "value"]
    w.writerow(cols)
    for pc in result["per_class"]:
        w.writerow([pc["id"], pc["name"], pc["support"], _fmt(pc["frequency"]), _fmt(pc["precision"]),
                    _fmt(pc["recall"]), _fmt(pc["f1"]), _fmt(pc["iou"]), _fmt(pc["tail"]), ""])
    for key in ("overall_accuracy", "kappa", "miou", "tail_miou", "mean_f1", "pixels_evaluated"):
        w.writerow(["", key, "", "", "", "", "", "", "", _fmt(result[key])])
    w.writerow(["", "tail_classes", "", "", "", "", "", "", "", ";".join(result["tail_classes"])])
    return buf.getvalue()


def _confusion_csv_text(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = [c["name"] for c in result["classes"]]
    cm = np.asarray(result["confusion_matrix"], dtype=np.int64).reshape(len(names), len(names))
    w.writerow(["reference \\ prediction", *names, "total"])
    for name, row in zip(names, cm):
        w.writerow([name, *row.tolist(), int(row.sum())])
    w.writerow(["total", *cm.sum(axis=0).tolist(), int(cm.sum())])
    return buf.getvalue()


def confusion_csv_path(csv_path) -> Path:
    """Where the confusion-matrix CSV goes beside the per-class CSV: ``NAME_confusion.csv``."""
    p = Path(csv_path)
    return p.with_name(f"{p.stem}_confusion{p.suffix or '.csv'}")


def _write_atomic(items: List[Tuple[Path, str]]) -> None:
    """Write every (path, text) to a temporary file beside it, then rename them all."""
    with contextlib.ExitStack() as stack:  # all renamed at the end, none if any write fails
        for path, text in items:
            tmp = stack.enter_context(atomic_output(path))
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def format_table(result: dict) -> str:
    """A readable text report of an evaluation result."""
    def f(v, w=9):
        return f"{'-':>{w}s}" if v is None else f"{v:>{w}.4f}"

    lines = [f"Evaluated {result['pixels_evaluated']} pixels: {result.get('prediction')} vs {result.get('reference')}"]
    lines.append(f"{'class':<20s} {'support':>10s} {'freq':>7s} {'precision':>9s} {'recall':>9s} {'F1':>9s} {'IoU':>9s}")
    for pc in result["per_class"]:
        name = pc["name"] + (" *" if pc["tail"] else "")
        lines.append(f"{name:<20s} {pc['support']:>10d} {pc['frequency']:>7.3f} {f(pc['precision'])} "
                     f"{f(pc['recall'])} {f(pc['f1'])} {f(pc['iou'])}")
    lines.append(f"overall accuracy {f(result['overall_accuracy'], 0)}   kappa {f(result['kappa'], 0)}   "
                 f"mIoU {f(result['miou'], 0)}   tail mIoU {f(result['tail_miou'], 0)}")
    lines.append("* tail classes (reference frequency below the median): " + (", ".join(result["tail_classes"]) or "none"))
    lines.append("confusion matrix (rows reference, columns prediction):")
    names = [c["name"][:10] for c in result["classes"]]
    lines.append(f"{'':<12s}" + "".join(f"{n:>12s}" for n in names))
    for n, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{n:<12s}" + "".join(f"{v:>12d}" for v in row))
    for key, label in (("json", "JSON"), ("csv", "CSV"), ("confusion_csv", "confusion CSV")):
        if result.get(key):
            lines.append(f"Wrote {label}: {result[key]}")
    return "\n".join(lines)
