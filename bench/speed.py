"""Side-by-side speed benchmark of the network's execution (issue 11): the same model file, the same raster,
in one run, today's execution and the new ones.

Usage (from the repository root)::

    python -m bench.speed [--size 4096] [--sweep 2048,4096,8192] [--train-steps 3]
                          [--model resources/models/default.srmf] [--out-dir bench-output] [--quick]

Executions (each end-to-end run in its own subprocess, so its peak RSS is its own):

* ``before``: the execution as it was when issue 11 was filed — NCHW memory, float32, the textbook head
  (upsample the four branches, concatenate, 1×1 convs: ``forward_features(reference=True)``), batch 2;
* ``fp32``: the exact path now — channels_last memory, the re-associated head, float32;
* ``auto``: the default now — as ``fp32`` with ``--precision auto`` (bf16 autocast of the decode head
  where the CPU runs it natively, guarded by a float32 check of the first batch).

Figures: end-to-end raster MP/s (the whole ``segment`` job: open, read, normalise, forward, accumulate,
write), process CPU-seconds per window, peak RSS (VmHWM), class agreement with ``fp32`` over all pixels,
and training s/iteration (an optimiser step on batch 8 × 256² real crops: forward, loss, backward, AdamW;
no data loading). The sweep runs ``auto`` at several raster sizes to show peak RSS flat in raster size.

Inputs are real imagery only: the OpenEarthMap Adelaide tile repeated n × n by a VRT
(:func:`bench.segment.build_mosaic`). Results: Markdown on standard output and ``<out-dir>/speed.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

from bench.segment import REPO, RESULT_TAG, _mib, _proc_status_kib, build_mosaic, cpu_model

DEFAULT_MODEL = REPO / "resources" / "models" / "default.srmf"
EXECUTIONS = ("before", "fp32", "auto")


# -- the child process: one measurement ------------------------------------------------------------
def _legacy_predictor():
    """The WindowPredictor of the ``before`` execution: NCHW, float32, the textbook (reference) head."""
    import torch
    import torch.nn.functional as F

    class LegacyPredictor:
        def __init__(self, model, device, precision=None, log=None):
            from core.execution import FP32, GuardedRun

            self.model = model.eval().to(device).to(memory_format=torch.contiguous_format)
            self.device, self.run = device, GuardedRun(self.model, device, FP32)

        @property
        def precision(self):
            return self.run.precision

        @torch.inference_mode()
        def __call__(self, batch):
            batch = batch.contiguous()
            m = self.model
            fused = m.head.forward_features(m.stage_features(batch), reference=True)["fused"]
            logits = m.head.classifier(m.head.dropout(fused)).float()
            return F.interpolate(logits, size=batch.shape[-2:], mode="bilinear", align_corners=False)

    return LegacyPredictor


def _child_segment(spec: dict) -> dict:
    import core.segment.job as job
    from core.protocol import Reporter

    kwargs = dict(device="cpu", overwrite=True, reporter=Reporter(json_mode=True, stream=open("/dev/null", "w")))
    if spec["execution"] == "before":
        job.WindowPredictor = _legacy_predictor()
        kwargs.update(batch_size=2, precision="fp32")
    else:
        kwargs.update(precision=spec["execution"])
    t0 = time.perf_counter()
    res = job.segment_raster(spec["input"], spec["output"], spec["model"], **kwargs)
    return {"wall_seconds": time.perf_counter() - t0, "windows": res["windows"], "batch_size": res["batch_size"],
            "megapixels_per_second": res["megapixels_per_second"], "precision": res["precision"],
            "precision_agreement": res["precision_agreement"]}


def _child_train(spec: dict) -> dict:
    """s/iteration of an optimiser step on real crops (batch 8 × 256²) in the execution ``spec`` names."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from osgeo import gdal
    from core.execution import channels_last, precision_scope, resolve_precision
    from core.model.modelfile import load_model

    lm = load_model(spec["model"], device="cpu")
    model, dev, ex = lm.model.train(), torch.device("cpu"), spec["execution"]
    img = gdal.Open(spec["source"]).ReadAsArray()[:3].astype(np.float32)
    inp = lm.header["input"]
    img = (img - np.array(inp["mean"], np.float32)[:, None, None]) / np.array(inp["std"], np.float32)[:, None, None]
    x = torch.from_numpy(np.stack([img[:, y:y + 256, x0:x0 + 256] for y in (0, 512) for x0 in (0, 256, 512, 768)]))
    y = torch.randint(0, lm.num_classes, (8, 256, 256), generator=torch.Generator().manual_seed(0))
    precision = resolve_precision("fp32" if ex in ("before", "fp32") else ex, dev)
    if ex != "before":
        model, x = model.to(memory_format=torch.channels_last), channels_last(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with precision_scope(model, dev, precision):
            if ex == "before":
                fused = model.head.forward_features(model.stage_features(x), reference=True)["fused"]
                logits = model.head.classifier(model.head.dropout(fused))
            else:
                logits = model(x)
        loss = F.cross_entropy(F.interpolate(logits.float(), size=(256, 256), mode="bilinear"), y)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"s_per_iteration": sorted(times)[len(times) // 2], "s_per_iteration_min": min(times),
            "precision": precision.name}


def child_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    result = {"segment": _child_segment, "train": _child_train}[spec["kind"]](spec)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_seconds"] = round((ru.ru_utime - ru0.ru_utime) + (ru.ru_stime - ru0.ru_stime), 2)
    result["peak_rss_mib"] = _mib(_proc_status_kib("VmHWM"))
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- the parent process ----------------------------------------------------------------------------
def run_child(spec: dict) -> dict:
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.speed", "--child", json.dumps(spec)], cwd=str(REPO),
                          env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench child {spec} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def agreement(a: Path, b: Path) -> float:
    """Share of pixels with the same class in two class rasters (blockwise; nodata counts as a class)."""
    import numpy as np
    from osgeo import gdal

    da, db = gdal.Open(str(a)), gdal.Open(str(b))
    same = total = 0
    for y in range(0, da.RasterYSize, 1024):
        rows = min(1024, da.RasterYSize - y)
        ra = da.GetRasterBand(1).ReadAsArray(0, y, da.RasterXSize, rows)
        rb = db.GetRasterBand(1).ReadAsArray(0, y, db.RasterXSize, rows)
        same += int(np.count_nonzero(ra == rb))
        total += ra.size
    return same / max(total, 1)


def side_by_side(args, work: Path) -> List[dict]:
    vrt = build_mosaic(args.size, work)
    rows = []
    for ex in EXECUTIONS:
        out = work / f"classes_{ex}_{args.size}.tif"
        r = run_child({"kind": "segment", "execution": ex, "input": str(vrt), "output": str(out),
                       "model": str(args.model)})
        r.update(execution=ex, size=args.size, output=str(out),
                 cpu_seconds_per_window=round(r["process_cpu_seconds"] / max(r["windows"], 1), 3))
        if args.train_steps:
            t = run_child({"kind": "train", "execution": ex, "model": str(args.model), "steps": args.train_steps,
                           "source": str(REPO.parent / "shared" / "data" / "openearthmap_adelaide" / "adelaide_2.tif")})
            r["train_s_per_iteration"] = round(t["s_per_iteration"], 3)
            r["train_peak_rss_mib"] = t["peak_rss_mib"]
        print(f"{ex:7s} {r['megapixels_per_second']:.3f} MP/s, {r['cpu_seconds_per_window']:.3f} CPU-s/window, "
              f"peak RSS {r['peak_rss_mib']} MiB, batch {r['batch_size']}, precision {r['precision']}"
              + (f", train {r['train_s_per_iteration']} s/it" if args.train_steps else ""), flush=True)
        rows.append(r)
    ref = Path(next(r["output"] for r in rows if r["execution"] == "fp32"))
    for r in rows:
        r["agreement_with_fp32"] = round(agreement(Path(r["output"]), ref), 6)
    return rows


def sweep(args, work: Path) -> List[dict]:
    rows = []
    for size in args.sweep:
        vrt = build_mosaic(size, work)
        out = work / f"classes_sweep_{size}.tif"
        r = run_child({"kind": "segment", "execution": "auto", "input": str(vrt), "output": str(out),
                       "model": str(args.model)})
        r.update(size=size)
        print(f"sweep {size}²: {r['megapixels_per_second']:.3f} MP/s, peak RSS {r['peak_rss_mib']} MiB", flush=True)
        out.unlink(missing_ok=True)
        rows.append(r)
    return rows


def real_rasters() -> List[Path]:
    """Every real image of ``../shared/data`` (SOURCES.md): the three GeoTIFFs, the 77 Dubai tiles, the
    LoveDA/Potsdam/Vaihingen PNGs (the Vaihingen one is IRRG false colour: kept, it is what users load too)."""
    data = REPO.parent / "shared" / "data"
    tifs = [data / "openearthmap_adelaide" / "adelaide_2.tif", data / "deepforest_neon_osbs" / "OSBS_029.tif",
            data / "solaris_spacenet_atlanta" / "sample_geotiff.tif"]
    images = sorted(data.glob("dubai_hitl_aerial/tile_*/images/*")) + sorted(data.glob("srmf_mmseg_testdata/*/img_dir/*"))
    return tifs + [p for p in images if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif")]


def precision_agreement(args, work: Path) -> dict:
    """Class agreement of unguarded bf16 with float32, the trained model, over every real raster (valid
    pixels: 255 in neither), in this process; the figure ``auto``'s 99.5 % rule is judged against."""
    from osgeo import gdal
    from core.model.modelfile import load_model
    from core.protocol import Reporter
    from core.segment.job import segment_raster

    lm = load_model(args.model, device="cpu")
    rep = Reporter(json_mode=True, stream=open("/dev/null", "w"))
    per, same, total = [], 0, 0
    for path in real_rasters():
        outs = {}
        for prec in ("fp32", "bf16"):
            outs[prec] = work / f"agree_{prec}.tif"
            segment_raster(path, outs[prec], lm, device="cpu", precision=prec, overwrite=True, reporter=rep)
        dss = [gdal.Open(str(outs[k])) for k in ("fp32", "bf16")]  # kept open: a band outlives no dataset
        a, b = (ds.GetRasterBand(1).ReadAsArray() for ds in dss)
        valid = (a != 255) & (b != 255)
        n, k = int(valid.sum()), int(((a == b) & valid).sum())
        same, total = same + k, total + n
        per.append({"raster": str(path.relative_to(REPO.parent / "shared" / "data")), "pixels": n,
                    "agreement": round(k / max(n, 1), 6)})
        print(f"agreement {per[-1]['raster']}: {100 * per[-1]['agreement']:.3f} %", flush=True)
    worst = min(per, key=lambda r: r["agreement"])
    return {"overall": round(same / max(total, 1), 6), "pixels": total, "rasters": len(per), "worst": worst,
            "under_99_5": [r for r in per if r["agreement"] < 0.995], "per_raster": per}


def render(report: dict) -> str:
    base = next(r for r in report["side_by_side"] if r["execution"] == "before")
    lines = [f"machine: {report['machine']}; model {report['model']}; raster {report['size']}² (VRT of real tiles)", "",
             "| execution | MP/s | × before | CPU-s/window | peak RSS (MiB) | batch | precision | agreement with fp32 |"
             " training s/it | × before |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["side_by_side"]:
        tr = r.get("train_s_per_iteration")
        lines.append(f"| {r['execution']} | {r['megapixels_per_second']:.3f} | "
                     f"{r['megapixels_per_second'] / base['megapixels_per_second']:.2f} | {r['cpu_seconds_per_window']:.3f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['batch_size']} | {r['precision']} | "
                     f"{100 * r['agreement_with_fp32']:.3f} % | {tr if tr else ''} | "
                     f"{(base['train_s_per_iteration'] / tr) if tr else 0:.2f} |")
    if report["sweep"]:
        lines += ["", "| raster (auto) | MP/s | peak RSS (MiB) |", "|---|---|---|"]
        lines += [f"| {r['size']}² | {r['megapixels_per_second']:.3f} | {r['peak_rss_mib']:.0f} |" for r in report["sweep"]]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=4096, help="raster size of the side-by-side runs (pixels)")
    p.add_argument("--sweep", default="2048,4096,8192", help="raster sizes of the peak-RSS sweep ('' = none)")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per execution (0 = none)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out-dir", type=Path, default=REPO / "bench-output")
    p.add_argument("--quick", action="store_true", help="1024² side by side, no sweep, 1 training step")
    p.add_argument("--agreement", action="store_true",
                   help="only the bf16-vs-float32 class agreement of the model over every real raster")
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    args.sweep = [int(s) for s in args.sweep.split(",") if s.strip()]
    if args.quick:
        args.size, args.sweep, args.train_steps = 1024, [], 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.out_dir / "speed-work"
    work.mkdir(exist_ok=True)
    if args.agreement:
        res = precision_agreement(args, work)
        (args.out_dir / "precision-agreement.json").write_text(json.dumps(res, indent=1))
        print(f"bf16 vs float32, {res['rasters']} real rasters, {res['pixels']} pixels: {100 * res['overall']:.3f} % "
              f"identical classes; worst {res['worst']['raster']} {100 * res['worst']['agreement']:.2f} %; "
              f"{len(res['under_99_5'])} raster(s) under 99.5 %")
        return 0
    report = {"machine": f"{cpu_model()}, {__import__('os').cpu_count()} cores", "model": str(args.model),
              "size": args.size, "side_by_side": side_by_side(args, work), "sweep": sweep(args, work)}
    (args.out_dir / "speed.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (args.out_dir / "speed.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
