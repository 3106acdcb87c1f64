"""Side by side: the SRMF head re-associated (issue 11, item 3) against the textbook formulation (upsample,
concatenate, convolve), on the embedded default model, real 512 px windows of adelaide_2.tif, CPU.

    python -m bench.head [--batch 2 4] [--repeats 5] [--threads 2]

Each (variant, batch) runs in its own process: forward-only (no_grad) time per batch (median of the
repeats, after one warm-up), the head's share of it, and the process's peak RSS (ru_maxrss) above its
state after loading the model; and for training, one forward+backward with its time and peak. Prints a
table; the figures depend on the machine's load (this one is shared), so compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RASTER = ROOT.parent / "shared" / "data" / "openearthmap_adelaide" / "adelaide_2.tif"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(variant: str, batch: int, repeats: int, threads: int, train: bool) -> dict:
    import numpy as np
    import torch
    from osgeo import gdal

    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model

    torch.set_num_threads(threads)
    lm = load_model(DEFAULT_MODEL_PATH)
    model = lm.model
    ds = gdal.Open(str(RASTER))
    arr = ds.ReadAsArray(0, 0, 1024, 1024).astype(np.float32)
    mean = np.asarray(lm.header["input"]["mean"], np.float32)[:, None, None]
    std = np.asarray(lm.header["input"]["std"], np.float32)[:, None, None]
    wins = [arr[:, y:y + 512, x:x + 512] for y in (0, 512) for x in (0, 512)]
    x = torch.from_numpy(np.stack([(wins[i % 4] - mean) / std for i in range(batch)]))
    reference = variant == "reference"

    def run():
        feats = model.stage_features(x)
        t = time.perf_counter()
        g = model.head.forward_features(feats, reference=reference)["fused"]
        out = model.head.classifier(model.head.dropout(g))
        return out, time.perf_counter() - t

    base = _peak_mib()
    times, head_times = [], []
    if train:
        model.train()
        for _ in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            out, th = run()
            out.float().mean().backward()
            times.append(time.perf_counter() - t0)
            head_times.append(th)
    else:
        model.eval()
        with torch.no_grad():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                out, th = run()
                times.append(time.perf_counter() - t0)
                head_times.append(th)
    times, head_times = sorted(times[1:]), sorted(head_times[1:])
    return {"variant": variant, "batch": batch, "mode": "train" if train else "inference",
            "s_per_batch": times[len(times) // 2], "head_s": head_times[len(head_times) // 2],
            "peak_above_model_mib": _peak_mib() - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        variant, batch, train = args.child.split(":")
        print(json.dumps(_child(variant, int(batch), args.repeats, args.threads, train == "train")))
        return 0
    rows = []
    for mode in ("inference", "train"):
        for batch in args.batch:
            for variant in ("reference", "reassociated"):
                out = subprocess.run([sys.executable, "-m", "bench.head", "--child", f"{variant}:{batch}:{mode}",
                                      "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                     cwd=ROOT, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':<10s} {'batch':>5s} {'head':<13s} {'s/batch':>8s} {'head s':>7s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['mode']:<10s} {r['batch']:>5d} {r['variant']:<13s} {r['s_per_batch']:>8.3f} {r['head_s']:>7.3f} "
              f"{r['peak_above_model_mib']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
