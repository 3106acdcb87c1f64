"""GPU check (issue 11, item 7): the CUDA path of the engine checked and timed in one run of ~10 minutes.

Usage (from the repository root, on a machine with an NVIDIA GPU)::

    python -m bench.gpu_check [--out-dir gpu-check-output] [--max-minutes 9.5]     # make gpu-check

In this order, printing figures as it goes and writing them all to ``<out-dir>/gpu_check.json`` (after
every step, so a run that is killed keeps what it measured) and the summary table to
``<out-dir>/gpu_check.md``:

1. **CUDA against the CPU** (the pass criterion): ``python -m core segment`` with the embedded default
   model on the real rasters ``openearthmap_adelaide/adelaide_2.tif`` (1024², RGB) and
   ``deepforest_neon_osbs/OSBS_029.tif`` (400², nodata 255) from ``../shared/data``, once with
   ``--device cuda --precision auto`` (bf16 where the engine's own check accepts it) and once with
   ``--device cpu --precision fp32``; both class rasters are read with GDAL and the share of pixels with
   identical classes is reported (pixels that are 255 = nodata in either are left out). Passes at
   >= 99.5 % on every raster. Also: seconds, MP/s, the precision used and the engine's
   ``precision_agreement`` of each run.
2. **Segment benchmark**: ``python -m bench.segment --device cuda --backbones mit_b5,efficientnet_lite0
   --sizes 4096,16384 --naive-sizes 4096`` (README's GPU goal: mit_b5 >= 50 MP/s end to end); its
   output in ``<out-dir>/bench_segment.log``, its tables in ``<out-dir>/bench-segment/segment-bench.{md,json}``
   and the figures of every run (end-to-end and raw MP/s, their ratio, peak RSS, naive) in the JSON.
   Runs are size-major, mit_b5 first, and bench.segment saves after each one, so the 5-minute limit
   loses the last runs only.
3. **Fine-tuning speed**: 200 iterations of ``python -m core finetune --device cuda`` on the real Dubai
   tiles (``../shared/data/dubai_hitl_aerial``) with bench/recipes.py's data and recipe (``make
   train-default``): tiles 1, 2, 5, 6, 7, 8 for training without ``tile_7/image_part_008`` (its label is
   known to be wrong), the whole of tile 3 for validation (``--val-groups tile_3``, validated once, at
   the end), batch 8, crop 256, lr 2e-4, warm-up 100. Reports s/iteration in steady state (between the
   loss lines of iterations 10 and 200, which the engine prints as they happen and this script
   timestamps) and overall (the result's seconds / iterations, start-up and validation included).
   4-minute limit.

Each step has a time limit (capped by ``--max-minutes`` for the whole run, so that the check ends, with
its summary, inside a 10-minute command limit); a failed or timed-out step is recorded and the next one
runs. Exit code: 0 when step 1 passes, 1 when it does not, 2 when there is no CUDA GPU (one line
``no CUDA GPU: ...``, at once) or the input data are missing.

The data folder ``../shared/data`` beside the checkout must exist on the GPU machine (bench.segment reads
it there too): copy it there first when only the checkout was copied.

Where the figures go in the README ("Benchmark figures" and "Recipes"): the bullet "GPU (mit_b5, bf16,
goal >= 50 MP/s on an H100): not measured" becomes the step-2 rows (backbone, raster, end-to-end MP/s,
raw MP/s, ratio, peak RSS; ``bench-segment/segment-bench.md`` has them as a table) with the GPU's name,
torch and CUDA versions from ``environment``; step 1's agreement (per raster, with the precision used)
goes beside it as the check that the CUDA path gives the CPU's classes; step 3's s/iteration goes to
"Recipes" as the GPU time of ``make train-default DEVICE=cuda`` (3000 iterations x s/iteration).

A hidden ``--device cpu --quick`` runs everything tiny on the CPU (step 1 as it is, on the CPU twice;
step 2 at 1024² with 2 raw windows and no naive run; step 3 for 2 iterations on tiles 2 and 3): a dry run
of the whole script without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RASTERS = (DATA / "openearthmap_adelaide" / "adelaide_2.tif", DATA / "deepforest_neon_osbs" / "OSBS_029.tif")
DUBAI = DATA / "dubai_hitl_aerial"
NODATA = 255
PASS_SHARE = 0.995
LIMIT_S = {"segment": 120, "bench": 300, "finetune": 240}  # per segment run, bench.segment, finetune
RESERVE_FOR_FINETUNE_S = 150  # step 2 stops in time for step 3 to run
BACKBONES = "mit_b5,efficientnet_lite0"
FINETUNE_ITERATIONS = {False: 200, True: 2}  # by --quick
TAIL_LINES = 40


# -- running a command ------------------------------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(cmd: List[str], timeout: float, log_path: Path, echo: Callable[[str], None]) -> dict:
    """Run ``cmd`` in the repository root in its own process group, stdout and stderr merged; every line
    timestamped (seconds from the start), passed to ``echo`` as it comes and written to ``log_path``. After
    ``timeout`` seconds the whole group is stopped (SIGTERM, then SIGKILL). Returns ``{command, exit_code,
    timed_out, seconds, log, tail, lines}`` (``lines``: ``[(t, text)]``, not JSON-able; popped by callers)."""
    lines: List[Tuple[float, str]] = []
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=_child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

        def pump() -> None:
            for raw in proc.stdout:
                text = raw.rstrip("\n")
                lines.append((time.perf_counter() - t0, text))
                log.write(text + "\n")
                echo(text)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
        reader.join(timeout=10)
    return {"command": shlex.join(cmd), "exit_code": proc.returncode, "timed_out": timed_out,
            "limit_s": round(timeout), "seconds": round(time.perf_counter() - t0, 1), "log": str(log_path),
            "tail": [t for _, t in lines[-TAIL_LINES:]], "lines": lines}


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def json_lines(lines: List[Tuple[float, str]]) -> List[Tuple[float, dict]]:
    """The JSON objects among the output lines (the engine's ``--json`` protocol), with their times."""
    out = []
    for t, text in lines:
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append((t, obj))
    return out


def result_of(lines) -> Tuple[Optional[dict], Optional[str]]:
    """``(result, error message)`` of an engine command's JSON lines (a result's fields may sit under
    ``data``)."""
    result, error = None, None
    for _, obj in json_lines(lines):
        if obj.get("type") == "result":
            result = obj["data"] if isinstance(obj.get("data"), dict) else obj
        elif obj.get("type") == "error":
            error = f"{obj.get('error')}: {obj.get('message')}"
    return result, error


def echo_engine(text: str) -> None:
    """Echo an engine ``--json`` line briefly: logs, metrics and errors; progress and results not."""
    try:
        obj = json.loads(text) if text.startswith("{") else None
    except ValueError:
        obj = None
    if obj is None:
        print("    | " + text, flush=True)
    elif obj.get("type") in ("log", "error"):
        print(f"    | {obj.get('level', 'error')}: {obj.get('message')}", flush=True)
    elif obj.get("type") == "metrics":
        print("    | metrics " + json.dumps({k: v for k, v in obj.items() if k != "type"}), flush=True)


def _failure(run: dict, error: Optional[str]) -> Optional[str]:
    if run["timed_out"]:
        return f"timed out after {run['limit_s']} s"
    if run["exit_code"] != 0:
        return f"exit code {run['exit_code']}" + (f": {error}" if error else "")
    return error


# -- the session -------------------------------------------------------------------------------------------
class Check:
    """The run's options, output folder, time budget and the report written after every step."""

    def __init__(self, args):
        self.device, self.quick = args.device, args.quick
        self.out = Path(args.out_dir) if Path(args.out_dir).is_absolute() else REPO / args.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.max_minutes * 60
        self.report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": self.device,
                       "quick": self.quick, "max_minutes": args.max_minutes, "steps": {}}

    def limit(self, step_limit: float, reserve: float = 0.0) -> float:
        """Seconds a step may take: its own limit, capped by what the whole run has left."""
        return min(step_limit, self.deadline - time.perf_counter() - reserve)

    def save(self) -> None:
        self.report["total_seconds"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")


def environment(device: str) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cpu_count": os.cpu_count()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    try:
        from osgeo import gdal

        env["gdal"] = gdal.__version__
    except ImportError:
        env["gdal"] = None
    return env


def cuda_problem(device: str) -> Optional[str]:
    """Why ``device`` cannot be used (None when it can): the one line printed before exit code 2."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
    except ImportError as exc:
        return f"no CUDA GPU: torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda}); run this on a machine with an NVIDIA GPU "
                "(a CPU dry run: --device cpu --quick)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"no CUDA GPU: {device} asked for, {torch.cuda.device_count()} visible"
    return None


def missing_data() -> List[str]:
    need = list(RASTERS) + [DUBAI / t / sub for t in ("tile_1", "tile_2", "tile_3", "tile_5", "tile_6", "tile_7",
                                                      "tile_8") for sub in ("images", "masks")]
    return [str(p) for p in need if not p.exists()]


# -- step 1: CUDA against the CPU -------------------------------------------------------------------------
def segment_once(check: Check, raster: Path, out: Path, device: str, precision: str) -> dict:
    """``python -m core segment`` once; its result's figures, or the error."""
    cmd = [sys.executable, "-m", "core", "segment", str(raster), str(out), "--device", device,
           "--precision", precision, "--overwrite", "--json"]
    timeout = check.limit(LIMIT_S["segment"])
    if timeout < 10:
        return {"device": device, "precision_asked": precision, "error": "skipped: the run's time budget is spent"}
    run = run_logged(cmd, timeout, check.out / f"segment_{out.stem}.log", echo_engine)
    result, error = result_of(run.pop("lines"))
    row = {"device_asked": device, "precision_asked": precision, "output": str(out), **run,
           "error": _failure(run, error)}
    if result is not None:
        for key in ("device", "precision", "precision_agreement", "seconds", "megapixels_per_second",
                    "batch_size", "windows", "skipped_windows", "width", "height", "nodata_pixels"):
            row[key] = result.get(key)
    elif row["error"] is None:
        row["error"] = "no result line in the output"
    if row["error"] is None:
        row.pop("tail")
    return row


def compare_classes(a: Path, b: Path) -> dict:
    """Share of pixels with identical classes in two class rasters, pixels 255 (nodata) in either left out."""
    from osgeo import gdal

    gdal.UseExceptions()
    ds_a, ds_b = gdal.Open(str(a)), gdal.Open(str(b))  # kept referenced: a band outlives no dataset
    x, y = ds_a.GetRasterBand(1).ReadAsArray(), ds_b.GetRasterBand(1).ReadAsArray()
    ds_a = ds_b = None
    if x.shape != y.shape:
        return {"error": f"sizes differ: {x.shape} and {y.shape}"}
    valid = (x != NODATA) & (y != NODATA)
    n = int(valid.sum())
    same = int((x[valid] == y[valid]).sum())
    return {"pixels": int(x.size), "compared_pixels": n, "identical_pixels": same,
            "identical_share": same / n if n else None,
            "nodata_in_one_only_pixels": int(((x == NODATA) != (y == NODATA)).sum())}


def step_segment(check: Check) -> dict:
    """Step 1: each raster segmented on ``check.device`` (precision auto) and on the CPU (fp32), compared."""
    out = check.out / "segment"
    out.mkdir(exist_ok=True)
    rows: List[dict] = []
    step = {"criterion": f"identical classes >= {PASS_SHARE * 100:.1f} % of the pixels that are not nodata",
            "rasters": rows, "passed": False}
    check.report["steps"]["segment"] = step  # saved after each raster
    for raster in RASTERS:
        print(f"  {raster.name}", flush=True)
        row = {"raster": str(raster.relative_to(DATA.parent.parent)), "runs": {}}
        for device, precision in ((check.device, "auto"), ("cpu", "fp32")):
            key = f"{device}_{precision}"
            r = segment_once(check, raster, out / f"{raster.stem}_{key.replace(':', '')}.tif", device, precision)
            row["runs"][key] = r
            print(f"    {key}: " + (f"ERROR {r['error']}" if r.get("error") else
                                    f"{r['seconds']:.2f} s, {r['megapixels_per_second']:.3f} MP/s, precision "
                                    f"{r['precision']} (agreement {r['precision_agreement']}), device {r['device']}, "
                                    f"batch {r['batch_size']}, {r['windows']} windows"), flush=True)
        done = [r for r in row["runs"].values() if not r.get("error")]
        if len(done) == 2:
            row.update(compare_classes(Path(done[0]["output"]), Path(done[1]["output"])))
        else:
            row["error"] = "a segment run failed"
        share = row.get("identical_share")
        row["passed"] = share is not None and share >= PASS_SHARE
        print("    identical classes: " + ("—" if share is None else
                                            f"{share * 100:.3f} % of {row['compared_pixels']} px "
                                            f"({row['nodata_in_one_only_pixels']} px nodata in one only)")
              + f" -> {'PASS' if row['passed'] else 'FAIL'} (>= {PASS_SHARE * 100:.1f} %)", flush=True)
        rows.append(row)
        check.save()
    step["passed"] = all(r["passed"] for r in rows)
    return step


# -- step 2: bench.segment ---------------------------------------------------------------------------------
def bench_command(check: Check, bench_dir: Path) -> List[str]:
    cmd = [sys.executable, "-m", "bench.segment", "--device", check.device, "--backbones", BACKBONES,
           "--out-dir", str(bench_dir)]
    if check.quick:
        return cmd + ["--sizes", "1024", "--naive-sizes", "", "--raw-windows", "2"]
    return cmd + ["--sizes", "4096,16384", "--naive-sizes", "4096"]


def bench_runs(report: dict) -> List[dict]:
    """The figures of every run in bench.segment's report (complete or not)."""
    rows = []
    for r in report.get("runs", []):
        e, raw, nv = r.get("e2e") or {}, r.get("raw") or {}, r.get("naive") or {}
        e_mps, raw_mps = e.get("megapixels_per_second"), raw.get("megapixels_per_second")
        rows.append({"backbone": r["backbone"], "size": r["size"], "windows": raw.get("windows") or e.get("windows"),
                     "e2e_seconds": e.get("seconds"), "e2e_mp_per_s": e_mps, "raw_mp_per_s": raw_mps,
                     "e2e_over_raw": e_mps / raw_mps if e_mps and raw_mps else None,
                     "raw_timed_windows": raw.get("timed_windows"),
                     "batch_size": e.get("batch_size") or raw.get("batch_size"),
                     "peak_rss_e2e_mib": e.get("peak_rss_mib"), "peak_rss_raw_mib": raw.get("peak_rss_mib"),
                     "naive_seconds": nv.get("seconds"), "naive_mp_per_s": nv.get("megapixels_per_second"),
                     "naive_peak_rss_mib": nv.get("peak_rss_mib"), "measured": bool(e)})
    return rows


def step_bench(check: Check) -> dict:
    """Step 2: ``python -m bench.segment`` on ``check.device``; its figures, complete or as far as it got."""
    bench_dir = check.out / "bench-segment"
    bench_json = bench_dir / "segment-bench.json"
    if bench_json.exists():
        bench_json.unlink()  # never report an earlier run's figures
    timeout = check.limit(LIMIT_S["bench"], 0 if check.quick else RESERVE_FOR_FINETUNE_S)
    if timeout < 30:
        return {"error": "skipped: the run's time budget is spent"}
    run = run_logged(bench_command(check, bench_dir), timeout, check.out / "bench_segment.log",
                     lambda s: print("    | " + s, flush=True))
    run.pop("lines")
    report = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    step = {**run, "error": _failure(run, None), "runs": bench_runs(report), "info": report.get("info"),
            "notes": report.get("notes"), "bench_json": str(bench_json),
            "bench_md": str(bench_dir / "segment-bench.md")}
    for r in step["runs"]:
        if r["measured"]:
            print(f"  {r['backbone']} {r['size']}²: end to end {r['e2e_mp_per_s']:.2f} MP/s "
                  f"({r['e2e_seconds']:.1f} s), "
                  f"raw {r['raw_mp_per_s']:.2f} MP/s, ratio {r['e2e_over_raw']:.2f}, batch {r['batch_size']}, "
                  f"peak RSS {r['peak_rss_e2e_mib']:.0f} MiB"
                  + (f"; naive {r['naive_mp_per_s']:.2f} MP/s" if r["naive_mp_per_s"] else ""), flush=True)
    return step


# -- step 3: fine-tuning speed ----------------------------------------------------------------------------
def dubai_job(folder: Path, quick: bool) -> Tuple[Path, Path, str]:
    """``(sources.json, classes.json, validation tile)`` of bench/recipes.py's Dubai data: its training tiles
    without the known bad labels (load_dubai's exclude_bad), its validation tile; tiles 2 and 3 if quick."""
    from bench.recipes import TRAIN_TILES, VAL_TILE
    from core.classtable import dubai_class_table
    from core.finetune.sources import DUBAI_BAD_LABELS

    tiles = (["tile_2"] if quick else list(TRAIN_TILES)) + [VAL_TILE]
    sources = []
    for t in tiles:
        bad = [] if t == VAL_TILE else [b.split("/", 1)[1] for b in DUBAI_BAD_LABELS if b.split("/")[0] == t]
        # named tile_N/image_part_00M, group tile_N (the folder above images/), as load_dubai names them
        sources.append({"images": str(DUBAI / t / "images"), "masks": str(DUBAI / t / "masks"), "group": t,
                        "exclude": bad})
    src_path, cls_path = folder / "sources.json", folder / "classes.json"
    src_path.write_text(json.dumps(sources, indent=2) + "\n")
    cls_path.write_text(json.dumps(dubai_class_table().to_obj(), indent=2) + "\n")
    return src_path, cls_path, VAL_TILE


def finetune_command(check: Check, folder: Path, iterations: int) -> List[str]:
    src, cls, val_tile = dubai_job(folder, check.quick)
    # bench/recipes.py's default_config: batch 8, crop 256, lr 2e-4, warm-up 100, SRR k 4
    return [sys.executable, "-m", "core", "finetune", str(folder / "gpu_check.srmf"), "--sources", str(src),
            "--classes", str(cls), "--val-groups", val_tile, "--iterations", str(iterations),
            "--batch-size", "8", "--crop", "256", "--lr", "2e-4", "--warmup", str(min(100, max(1, iterations // 2))),
            "--srr-k", "4", "--eval-interval", str(iterations), "--checkpoint-interval", str(iterations),
            "--seed", "0", "--device", check.device, "--overwrite", "--json"]


def iteration_times(lines) -> dict:
    """s/iteration in steady state from the timestamped loss lines (``metrics`` with ``loss``), which the
    loop prints every 10 iterations as they happen: between the first and the last of them."""
    points = [(t, o["iteration"]) for t, o in json_lines(lines)
              if o.get("type") == "metrics" and "loss" in o and "iteration" in o]
    out = {"loss_lines": len(points)}
    if len(points) >= 2 and points[-1][1] > points[0][1]:
        (t_a, i_a), (t_b, i_b) = points[0], points[-1]
        out.update(steady_from_iteration=i_a, steady_to_iteration=i_b,
                   steady_seconds_per_iteration=(t_b - t_a) / (i_b - i_a))
    return out


def step_finetune(check: Check) -> dict:
    """Step 3: ``python -m core finetune`` on the Dubai tiles on ``check.device``; s/iteration."""
    folder = check.out / "finetune"
    folder.mkdir(exist_ok=True)
    shutil.rmtree(folder / "gpu_check.srmf.work", ignore_errors=True)  # a fresh run, never a resumed one
    iterations = FINETUNE_ITERATIONS[check.quick]
    timeout = check.limit(LIMIT_S["finetune"])
    if timeout < 30:
        return {"error": "skipped: the run's time budget is spent"}
    run = run_logged(finetune_command(check, folder, iterations), timeout, check.out / "finetune.log", echo_engine)
    lines = run.pop("lines")
    result, error = result_of(lines)
    step = {**run, "error": _failure(run, error), "iterations_asked": iterations, **iteration_times(lines)}
    if result is not None:
        its = result.get("iterations") or 0
        metrics = result.get("metrics") or {}
        step.update(iterations=its, train_seconds=result.get("seconds"), device_used=result.get("device"),
                    validation=result.get("validation"), miou=metrics.get("miou"),
                    overall_seconds_per_iteration=(result["seconds"] / its) if its and result.get("seconds") else None)
    elif step["error"] is None:
        step["error"] = "no result line in the output"
    if step["error"] is None:
        step.pop("tail")
    steady, overall = step.get("steady_seconds_per_iteration"), step.get("overall_seconds_per_iteration")
    print(f"  {step.get('iterations', 0)} iterations on {step.get('device_used')}: "
          + (f"{steady:.3f} s/iteration steady (iterations {step['steady_from_iteration']}-"
             f"{step['steady_to_iteration']}), " if steady else "")
          + (f"{overall:.3f} s/iteration overall (start-up and validation included), " if overall else "")
          + (f"validation mIoU {step['miou']:.4f}" if step.get("miou") is not None else "no validation mIoU")
          + (f"; ERROR {step['error']}" if step["error"] else ""), flush=True)
    return step


# -- summary -----------------------------------------------------------------------------------------------
def summary_rows(report: dict) -> List[Tuple[str, str, str]]:
    steps = report["steps"]
    rows = []
    s1 = steps.get("segment") or {}
    figs = []
    for r in s1.get("rasters", []):
        share = r.get("identical_share")
        runs = [f"{k} {v['megapixels_per_second']:.2f} MP/s ({v['precision']})" for k, v in r["runs"].items()
                if v.get("megapixels_per_second") is not None]
        figs.append(f"{Path(r['raster']).stem}: " + ("—" if share is None else f"{share * 100:.2f} % identical")
                    + (", " + " vs ".join(runs) if runs else ""))
    rows.append(("1 segment: device vs CPU fp32", "PASS" if s1.get("passed") else "FAIL", "; ".join(figs) or "—"))
    s2 = steps.get("bench") or {}
    figs = [f"{r['backbone']} {r['size']}² e2e {r['e2e_mp_per_s']:.2f} / raw {r['raw_mp_per_s']:.2f} MP/s"
            for r in s2.get("runs", []) if r["measured"]]
    rows.append(("2 bench.segment", _status(s2), "; ".join(figs) or "—"))
    s3 = steps.get("finetune") or {}
    steady, overall = s3.get("steady_seconds_per_iteration"), s3.get("overall_seconds_per_iteration")
    miou = s3.get("miou")
    fig = ", ".join(x for x in (f"{steady:.3f} s/it steady" if steady else "",
                                f"{overall:.3f} s/it overall" if overall else "",
                                f"{s3.get('iterations')} it" if s3.get("iterations") else "",
                                f"validation mIoU {miou:.4f}" if miou is not None else "") if x)
    rows.append(("3 finetune", _status(s3), fig or "—"))
    return rows


def _status(step: dict) -> str:
    if not step:
        return "not run"
    if step.get("error"):
        return "TIMEOUT" if step.get("timed_out") else "ERROR"
    return "ok"


def print_summary(check: Check) -> None:
    rows = summary_rows(check.report)
    env = check.report.get("environment", {})
    lines = ["# GPU check", "",
             f"- device {check.device} ({env.get('gpu') or 'CPU'}); torch {env.get('torch')} (CUDA "
             f"{env.get('torch_cuda')}), GDAL {env.get('gdal')}, {env.get('cpu_count')} CPUs; "
             f"{check.report['total_seconds']:.0f} s in all" + (" (--quick dry run)" if check.quick else ""), "",
             "| step | status | figures |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    for name, step in check.report["steps"].items():
        if step.get("error"):
            lines.append(f"\n{name}: {step['error']}" + (f" (log: {step['log']})" if step.get("log") else ""))
    text = "\n".join(lines) + "\n"
    (check.out / "gpu_check.md").write_text(text)
    print("\n" + text, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="gpu-check-output", help="where gpu_check.json, .md, logs and outputs go")
    ap.add_argument("--max-minutes", type=float, default=9.5, help="time budget of the whole run (default 9.5)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run with --quick
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    problem = cuda_problem(args.device)
    if problem:
        print(problem, file=sys.stderr, flush=True)
        return 2
    missing = missing_data()
    if missing:
        print(f"missing input data: {', '.join(missing)} (the shared/data folder beside the checkout)",
              file=sys.stderr, flush=True)
        return 2
    check = Check(args)
    check.report["environment"] = environment(args.device)
    print(f"GPU check on {args.device}: {json.dumps(check.report['environment'])}; output in {check.out}", flush=True)
    steps = (("segment", "1. segment on the device and on the CPU (fp32), classes compared", step_segment),
             ("bench", "2. python -m bench.segment", step_bench),
             ("finetune", f"3. fine-tuning, {FINETUNE_ITERATIONS[args.quick]} iterations on the Dubai tiles",
              step_finetune))
    for key, title, fn in steps:
        print(f"\n== {title}", flush=True)
        try:
            check.report["steps"][key] = fn(check)
        except Exception as exc:  # noqa: BLE001 - a broken step is recorded; the next one runs
            check.report["steps"][key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  ERROR {type(exc).__name__}: {exc}", flush=True)
        check.save()
    passed = bool(check.report["steps"].get("segment", {}).get("passed"))
    check.report["passed"] = passed
    check.save()
    print_summary(check)
    print(f"written: {check.out / 'gpu_check.json'}, {check.out / 'gpu_check.md'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
