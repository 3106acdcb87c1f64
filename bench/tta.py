"""Does test-time augmentation pay on the CPU? (issue 12, part 3)

``python -m bench.tta``: the embedded default model on the whole Dubai tile 3 — the tile it was validated
on and never trained on (9 images, 682 x 658 px) — by SRMF's slide inference (window 512, stride 341),
without and with ``--tta`` (every window also flipped and turned: the 8 symmetries of the square, logits
averaged), float32 on the CPU. Prints per-class IoU, mIoU and seconds side by side, per image and pooled,
and the paired per-image mIoU differences (mean, sd, and how many images gain). Inference is
deterministic: one run per setting is the measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    from core.finetune.sources import load_dubai
    from core.metrics import confusion_matrix, metrics_from_confusion
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model
    from core.windows import SlidePlan, WindowPredictor, slide_inference_in_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", default="tile_3")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load_model(DEFAULT_MODEL_PATH)
    names = [c["name"] for c in lm.classes]
    K = len(names)
    inp = lm.header["input"]
    window, stride = lm.header["inference"]["window"], lm.header["inference"]["stride"]
    images = load_dubai([args.tile])
    pooled = {m: np.zeros((K, K), np.int64) for m in ("plain", "tta")}
    seconds = {"plain": 0.0, "tta": 0.0}
    rows = []
    for im in images:
        row = {"image": im.name}
        plan = SlidePlan(im.image.shape[1], im.image.shape[2], window, stride)
        for mode in ("plain", "tta"):
            predictor = WindowPredictor(lm.model, torch.device("cpu"), "fp32", tta=mode == "tta")
            t0 = time.perf_counter()
            _, classes = slide_inference_in_memory(im.image, getattr(im, "valid", None), plan, predictor, K, inp["mean"], inp["std"], 1)
            dt = time.perf_counter() - t0
            seconds[mode] += dt
            cm = confusion_matrix(classes.numpy(), im.label, K)
            pooled[mode] += cm
            m = metrics_from_confusion(cm, names)
            row[mode] = {"miou": m["miou"], "seconds": round(dt, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"tile": args.tile, "images": rows, "seconds": seconds}
    diffs = np.array([r["tta"]["miou"] - r["plain"]["miou"] for r in rows])
    out["paired_miou_difference"] = {"mean": float(diffs.mean()), "sd": float(diffs.std(ddof=1)),
                                     "images_gaining": int((diffs > 0).sum()), "n": len(diffs)}
    print(f"\n{'':12s} {'plain':>8s} {'tta':>8s}")
    for mode in ("plain", "tta"):
        out[mode] = metrics_from_confusion(pooled[mode], names)
    for i, n in enumerate(names):
        a, b = out["plain"]["per_class"][i]["iou"], out["tta"]["per_class"][i]["iou"]
        print(f"{n:12s} {a:8.4f} {b:8.4f}")
    print(f"{'mIoU':12s} {out['plain']['miou']:8.4f} {out['tta']['miou']:8.4f}")
    print(f"{'seconds':12s} {seconds['plain']:8.1f} {seconds['tta']:8.1f}")
    d = out["paired_miou_difference"]
    print(f"per-image mIoU difference (tta - plain): mean {d['mean']:+.4f}, sd {d['sd']:.4f}, "
          f"{d['images_gaining']} of {d['n']} images gain")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
