"""Does bf16 training (``--precision auto`` where native: the decode head in bf16 autocast, channels_last)
reach the validation mIoU of float32 training? Issue 11, item 6.

Usage (from the repository root)::

    python -m bench.train_precision [--iterations 120] [--seeds 0,1,2] [--out-dir bench-output]

Each run trains the default model's recipe (:func:`bench.recipes.default_config`: EfficientNet-Lite0
ImageNet + MiniLM text bank, MARS + SRR-TA, batch 8, crop 256) from ImageNet on the Dubai training tiles
and validates once, at the end, on the whole held-out tile 3 (held-out tiles, never pixels of the
training images), in float32 and in auto, for every seed. Prints every run (losers included), the mean
and spread per precision, and the paired differences; writes ``<out-dir>/train-precision.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

PRECISIONS = ("fp32", "auto")


def run(precision: str, seed: int, iterations: int, work: Path) -> dict:
    from bench.recipes import default_config, train_default
    from core.protocol import Reporter

    config = default_config(iterations=iterations, eval_interval=iterations, checkpoint_interval=iterations,
                            seed=seed, precision=precision)
    res = train_default(work / f"{precision}_{seed}.srmf", config, "cpu",
                        Reporter(json_mode=True, stream=open(work / f"{precision}_{seed}.log", "w")))
    return {"precision": precision, "seed": seed, "iterations": res["iterations"], "miou": res["metrics"]["miou"],
            "per_class_iou": res["metrics"]["per_class_iou"], "seconds": round(res["seconds"], 1),
            "s_per_iteration": round(res["seconds"] / max(res["iterations"], 1), 3)}


def summary(rows: List[dict]) -> dict:
    out = {}
    for p in PRECISIONS:
        v = [r["miou"] for r in rows if r["precision"] == p]
        out[p] = {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v,
                  "s_per_iteration": statistics.mean(r["s_per_iteration"] for r in rows if r["precision"] == p)}
    seeds = sorted({r["seed"] for r in rows})
    diffs = [next(r["miou"] for r in rows if r["precision"] == "auto" and r["seed"] == s)
             - next(r["miou"] for r in rows if r["precision"] == "fp32" and r["seed"] == s) for s in seeds]
    out["paired_auto_minus_fp32"] = {"per_seed": diffs, "mean": statistics.mean(diffs),
                                     "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_precision", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=120)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out-dir", type=Path, default=Path("bench-output"))
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="srmf-train-precision-") as d:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for prec in PRECISIONS:
                rows.append(run(prec, seed, args.iterations, Path(d)))
                r = rows[-1]
                print(f"{prec:5s} seed {seed}: mIoU {r['miou']:.4f} after {r['iterations']} iterations, "
                      f"{r['s_per_iteration']:.2f} s/iteration (data, validation included)", flush=True)
    report = {"iterations": args.iterations, "runs": rows, "summary": summary(rows)}
    (args.out_dir / "train-precision.json").write_text(json.dumps(report, indent=1))
    s = report["summary"]
    for prec in PRECISIONS:
        print(f"{prec}: mIoU {s[prec]['mean']:.4f} ± {s[prec]['sd']:.4f} (runs {', '.join(f'{v:.4f}' for v in s[prec]['runs'])}), "
              f"{s[prec]['s_per_iteration']:.2f} s/iteration")
    d = s["paired_auto_minus_fp32"]
    print(f"auto - fp32, paired by seed: {d['mean']:+.4f} ± {d['sd']:.4f} ({', '.join(f'{v:+.4f}' for v in d['per_seed'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
