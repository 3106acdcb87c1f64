"""Benchmark of the segment job: end-to-end speed, raw network speed and peak memory.

Usage (from the repository root)::

    python -m bench.segment [--sizes 4096,16384] [--backbones efficientnet_lite0,mit_b0]
                            [--naive-sizes 4096] [--batch-size N] [--device auto|cpu|cuda]
                            [--out-dir bench-output] [--quick]

Inputs are real imagery only: the OpenEarthMap Adelaide tile (1024 x 1024 RGB uint8 GeoTIFF) repeated
n x n times by a small GDAL VRT mosaic (one SimpleSource per tile), no synthetic pixels. Models are
seeded random models of the real architecture (speed does not depend on the weights' values).

For every backbone and raster size, each measurement runs in its own subprocess, so that its peak
resident memory (VmHWM / ru_maxrss) is its own:

* ``e2e``: :func:`core.segment.job.segment_raster`, the whole job (open, read, normalise, forward,
  accumulate, write the class GeoTIFF), in raster megapixels per second;
* ``raw``: the network alone (``WindowPredictor(batch)`` in a loop on pre-built, normalised input
  tensors of the same windows and batch size), on a sample of the windows where the full set would
  take too long, extrapolated to the full window count and expressed in raster megapixels per second,
  so that ``e2e / raw`` says how much of the network's speed the job keeps (goal >= 0.9);
* ``naive`` (sizes in ``--naive-sizes``): the whole raster read into memory and
  :func:`core.windows.slide_inference_in_memory` (one full (K, H, W) logit tensor), then the class
  raster written.

Results: a Markdown table on standard output and ``<out-dir>/segment-bench.{md,json}``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCE = SHARED_DATA / "openearthmap_adelaide" / "adelaide_2.tif"
RESULT_TAG = "BENCH-RESULT "
BACKBONES = ("efficientnet_lite0", "mit_b0")
# On the CPU, rasters larger than this run for --large-backbones only (see --help).
LARGE_SIZE = 8192
# Windows timed by the raw measurement (after WARMUP_BATCHES batches); 0 = all of them.
RAW_SAMPLE = {"cpu": 16, "cuda": 512}
WARMUP_BATCHES = 3


# -- helpers used by both processes -----------------------------------------------------------------
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_busy_seconds() -> Optional[float]:
    """System-wide busy CPU time (all cores) from /proc/stat, seconds."""
    try:
        with open("/proc/stat") as fh:
            parts = fh.readline().split()[1:]
        v = [int(x) for x in parts]
        busy = v[0] + v[1] + v[2] + sum(v[5:8])  # user nice system irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mib(kib: Optional[float]) -> Optional[float]:
    return None if kib is None else round(kib / 1024.0, 1)


# -- inputs ---------------------------------------------------------------------------------------
def build_mosaic(size: int, out_dir: Path, source: Path = SOURCE) -> Path:
    """A VRT that tiles the real ``source`` raster n x n times to ``size`` x ``size`` pixels.

    Same bands, data type, colour interpretation, CRS and pixel size as the source; its origin is the
    source's origin. Returns the VRT's path (a few kB per tile on disk, no pixels copied).
    """
    from osgeo import gdal

    gdal.UseExceptions()
    src = gdal.Open(str(source))
    sw, sh = src.RasterXSize, src.RasterYSize
    if size % sw or size % sh:
        raise SystemExit(f"--sizes: {size} is not a multiple of the source tile ({sw} x {sh} px)")
    nx, ny = size // sw, size // sh
    srs = src.GetSpatialRef()
    gt = src.GetGeoTransform()
    lines = [f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">']
    if srs is not None:
        mapping = ",".join(str(i) for i in srs.GetDataAxisToSRSAxisMapping())
        lines.append(f'  <SRS dataAxisToSRSAxisMapping="{mapping}">{escape(srs.ExportToWkt())}</SRS>')
    lines.append("  <GeoTransform>" + ", ".join(repr(float(g)) for g in gt) + "</GeoTransform>")
    fname = escape(str(source.resolve()))
    for b in range(1, src.RasterCount + 1):
        band = src.GetRasterBand(b)
        dtype = gdal.GetDataTypeName(band.DataType)
        bx, by = band.GetBlockSize()
        interp = gdal.GetColorInterpretationName(band.GetColorInterpretation())
        lines.append(f'  <VRTRasterBand dataType="{dtype}" band="{b}">')
        lines.append(f"    <ColorInterp>{interp}</ColorInterp>")
        nd = band.GetNoDataValue()
        if nd is not None:
            lines.append(f"    <NoDataValue>{nd!r}</NoDataValue>")
        for j in range(ny):
            for i in range(nx):
                lines += [
                    "    <SimpleSource>",
                    f'      <SourceFilename relativeToVRT="0">{fname}</SourceFilename>',
                    f"      <SourceBand>{b}</SourceBand>",
                    f'      <SourceProperties RasterXSize="{sw}" RasterYSize="{sh}" DataType="{dtype}" '
                    f'BlockXSize="{bx}" BlockYSize="{by}" />',
                    f'      <SrcRect xOff="0" yOff="0" xSize="{sw}" ySize="{sh}" />',
                    f'      <DstRect xOff="{i * sw}" yOff="{j * sh}" xSize="{sw}" ySize="{sh}" />',
                    "    </SimpleSource>",
                ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    text = "\n".join(lines) + "\n"
    path = out_dir / f"{source.stem}_x{nx}x{ny}_{size}.vrt"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    # Check: the mosaic opens at the right size and its last tile holds the source's pixels.
    ds = gdal.Open(str(path))
    assert (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) == (size, size, src.RasterCount), path
    x0, y0 = (nx - 1) * sw, (ny - 1) * sh
    a = ds.GetRasterBand(1).ReadRaster(x0, y0, sw, 64)
    b_ = src.GetRasterBand(1).ReadRaster(0, 0, sw, 64)
    assert a == b_, f"{path}: the last tile does not hold the source's pixels"
    return path


# -- the child process: one measurement -----------------------------------------------------------
class _ProgressStream(io.TextIOBase):
    """A Reporter stream that turns JSON progress lines into a line on stderr every 10 %."""

    def __init__(self, label: str, step: float = 10.0):
        self.label, self.step, self.next = label, step, step
        self.t0 = time.perf_counter()

    def write(self, s: str) -> int:
        for line in s.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "progress" and msg.get("percent", 0) >= self.next:
                print(f"    [{self.label}] {msg['percent']:5.1f} %  {time.perf_counter() - self.t0:7.1f} s  "
                      f"peak RSS so far {(_proc_status_kib('VmHWM') or 0) / 1024:.0f} MiB",
                      file=sys.stderr, flush=True)
                while self.next <= msg["percent"]:
                    self.next += self.step
            elif msg.get("type") == "log" and msg.get("level") != "info":
                print(f"    [{self.label}] {msg['level']}: {msg['message']}", file=sys.stderr, flush=True)
        return len(s)

    def flush(self) -> None:
        pass


def _child_info(spec: dict) -> dict:
    import torch
    from osgeo import gdal

    import segmentation_models_pytorch as smp
    from core.device import DEFAULT_BATCH, resolve_device

    dev = resolve_device(spec.get("device", "auto"))
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        props = torch.cuda.get_device_properties(dev)
        device_name = f"{name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        device_name = f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {"device": str(dev), "device_type": dev.type, "device_name": device_name,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": None if mem_gib is None else round(mem_gib, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gdal": gdal.__version__,
            "smp": smp.__version__, "python": platform.python_version(),
            "gdal_cachemax_mib": round(gdal.GetCacheMax() / 2**20, 1),
            "default_batch": DEFAULT_BATCH.get(dev.type, 4)}


def _child_build_model(spec: dict) -> dict:
    import torch

    from core.model.modelfile import save_model
    from core.model.network import SRMFNet, architecture_config

    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(54, 384), dim=1)
    m = SRMFNet(spec["backbone"], 5, text_bank=bank)
    save_model(spec["model"], m, {
        "architecture": architecture_config(m),
        "classes": [{"id": i, "name": f"c{i}", "colour": "#808080", "prompt": f"c{i}"} for i in range(5)],
        "text_encoder": {"id": "random", "dim": 384},
        "text_bank": {"prompts": [f"p{i}" for i in range(54)]},
        "provenance": {"untrained": True, "note": "seeded random weights for bench.segment"},
    })
    return {"model": spec["model"], "parameters": sum(p.numel() for p in m.parameters())}


def _open_job(spec: dict):
    """The pieces segment_raster builds before its loop: model, raster, bands, scaling, plan, batch."""
    from core.model.modelfile import load_model
    from core.geo.raster import StripReader, compute_scaling, open_raster, select_bands
    from core.device import DEFAULT_BATCH, resolve_device
    from core.windows import SlidePlan

    dev = resolve_device(spec["device"])
    lm = load_model(spec["model"], device="cpu")
    ds = open_raster(spec["input"])
    inp = lm.header["input"]
    bands = select_bands(ds, spec["input"], None, inp["bands"])
    scaling = compute_scaling(ds, bands, inp["scaling"], inp["value_range"])
    reader = StripReader(ds, bands, scaling)
    inf = lm.header["inference"]
    plan = SlidePlan(ds.RasterYSize, ds.RasterXSize, int(inf["window"]), int(inf["stride"]))
    batch = int(spec.get("batch_size") or DEFAULT_BATCH.get(dev.type, 4))
    return dev, lm, ds, inp, reader, plan, batch


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _child_raw(spec: dict) -> dict:
    """The network alone on pre-built input tensors of the job's windows (a sample if asked)."""
    from core.windows import WindowPredictor, _batched, _window_tensor

    dev, lm, ds, inp, reader, plan, batch = _open_job(spec)
    predictor = WindowPredictor(lm.model, dev, spec.get("precision", "auto"))
    total = plan.n_windows
    want = total if spec["raw_windows"] <= 0 else min(total, spec["raw_windows"])
    # Batches exactly as the engine forms them (per row of windows), in its order, until `want`
    # windows plus the warm-up batches are built. The first batches of a fresh process are slower
    # (allocator and oneDNN warm-up: ~10 % over the first few on the CPU), hence several.
    n_warm = int(spec.get("warmup_batches", WARMUP_BATCHES))
    batches = []
    n_built = 0
    for y in plan.ys:
        if n_built >= want + n_warm * batch:
            break
        data, valid = reader.read(y, plan.win_h)
        for chunk in _batched(plan.row(y), batch):
            if n_built >= want + n_warm * batch:
                break
            batches.append(_window_tensor(data, valid, chunk, y, plan.window, inp["mean"], inp["std"]))
            n_built += len(chunk)
    # Few windows: warm up on what there is, then time the same batches again.
    warm = batches[:min(n_warm, max(1, len(batches) - 1))]
    timed = batches[len(warm):] or batches
    for b in warm:
        predictor(b)
    _sync(dev)
    per_batch = []
    n_timed = 0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for b in timed:
        t0 = time.perf_counter()
        out = predictor(b)
        _sync(dev)
        per_batch.append(time.perf_counter() - t0)
        n_timed += b.shape[0]
        del out
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    s_per_window = sum(per_batch) / n_timed
    med = sorted(per_batch)[len(per_batch) // 2]
    mp = plan.width * plan.height / 1e6
    return {"windows": total, "timed_windows": n_timed, "sampled": n_timed < total, "batch_size": batch,
            "seconds_per_window": s_per_window, "batch_seconds": [round(t, 4) for t in per_batch],
            "warmup_batches": len(warm), "median_batch_seconds": med,
            "extrapolated_seconds": s_per_window * total, "cpu_seconds_per_window": cpu / n_timed,
            "megapixels_per_second": mp / (s_per_window * total)}


def _remove_output(path: Path, spec: dict) -> None:
    """Delete a measured output and its .aux.xml sidecar unless --keep-outputs."""
    if spec.get("keep_outputs"):
        return
    for p in (path, Path(str(path) + ".aux.xml")):
        if p.exists():
            p.unlink()


def _child_e2e(spec: dict) -> dict:
    from core.protocol import Reporter
    from core.segment.job import segment_raster

    rep = Reporter(json_mode=True, stream=_ProgressStream(spec["label"]))
    kwargs = dict(batch_size=spec.get("batch_size"), device=spec["device"], overwrite=True, reporter=rep)
    if spec.get("profile"):
        import cProfile
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        res = prof.runcall(segment_raster, spec["input"], spec["output"], spec["model"], **kwargs)
        wall = time.perf_counter() - t0
        prof.dump_stats(spec["profile"])
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        Path(spec["profile"]).with_suffix(".txt").write_text(buf.getvalue())
    else:
        t0 = time.perf_counter()
        res = segment_raster(spec["input"], spec["output"], spec["model"], **kwargs)
        wall = time.perf_counter() - t0
    out = Path(spec["output"])
    size = out.stat().st_size if out.exists() else None
    _remove_output(out, spec)
    return {"seconds": res["seconds"], "wall_seconds": wall, "forward_seconds": res["forward_seconds"],
            "windows": res["windows"], "skipped_windows": res["skipped_windows"],
            "batch_size": res["batch_size"], "window": res["window"], "stride": res["stride"],
            "megapixels_per_second": res["megapixels_per_second"], "output_bytes": size}


def _child_naive(spec: dict) -> dict:
    from core.geo.raster import AtomicGeoTIFF, style_class_band
    from core.windows import WindowPredictor, slide_inference_in_memory

    t0 = time.perf_counter()
    dev, lm, ds, inp, reader, plan, batch = _open_job(spec)
    t_read0 = time.perf_counter()
    image, valid = reader.read(0, plan.height)
    t_read = time.perf_counter() - t_read0
    predictor = WindowPredictor(lm.model, dev, spec.get("precision", "auto"))
    t_inf0 = time.perf_counter()
    logits, classes = slide_inference_in_memory(image, valid, plan, predictor, lm.num_classes,
                                                inp["mean"], inp["std"], batch)
    arr = classes.cpu().numpy()
    t_inf = time.perf_counter() - t_inf0
    del logits
    t_w0 = time.perf_counter()
    out = AtomicGeoTIFF(spec["output"], ds, 1)
    style_class_band(out.band(1), lm.classes)
    out.band(1).WriteArray(arr, 0, 0)
    out.commit()
    t_write = time.perf_counter() - t_w0
    seconds = time.perf_counter() - t0
    _remove_output(Path(spec["output"]), spec)
    mp = plan.width * plan.height / 1e6
    return {"seconds": seconds, "read_seconds": t_read, "inference_seconds": t_inf, "write_seconds": t_write,
            "windows": plan.n_windows, "batch_size": batch, "megapixels_per_second": mp / seconds}


def child_main(spec: dict) -> None:
    kind = spec["kind"]
    rss0 = _proc_status_kib("VmRSS")
    busy0, ru0, w0 = _cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn = {"info": _child_info, "build-model": _child_build_model, "raw": _child_raw,
          "e2e": _child_e2e, "naive": _child_naive}[kind]
    result = fn(spec)
    wall = time.perf_counter() - w0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    busy1 = _cpu_busy_seconds()
    own_cpu = (ru.ru_utime - ru0.ru_utime) + (ru.ru_stime - ru0.ru_stime)
    result.update({
        "peak_rss_mib": _mib(_proc_status_kib("VmHWM")),      # this process's own high-water mark
        "ru_maxrss_mib": _mib(ru.ru_maxrss),                  # getrusage(RUSAGE_SELF), KiB on Linux
        "start_rss_mib": _mib(rss0),                          # after Python start-up, before imports
        "process_cpu_seconds": round(own_cpu, 2), "process_wall_seconds": round(wall, 2),
    })
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - own_cpu)
        result["others_cpu_seconds"] = round(others, 1)
        result["others_cpu_share"] = round(others / max(wall * (os.cpu_count() or 1), 1e-9), 3)
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- the parent process ----------------------------------------------------------------------------
def grid_windows(size: int, window: int = 512, stride: int = 341) -> int:
    """Windows on a size x size raster (the engine's default grid), for estimates only."""
    n = 1 if size <= window else (size - window + stride - 1) // stride + 1
    return n * n


def run_child(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    proc = subprocess.run([sys.executable, "-m", "bench.segment", "--child", json.dumps(spec)],
                          cwd=str(REPO), env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench child {spec['kind']} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _fmt(v, nd=2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _gib(mib) -> str:
    return "—" if mib is None else f"{mib / 1024:.2f} GiB"


def render_markdown(report: dict) -> str:
    info, cfg = report["info"], report["config"]
    lines = [
        "# SRMF segment benchmark",
        "",
        f"- device: {info['device']} — {info['device_name']}; RAM {info['ram_gib']} GiB",
        f"- torch {info['torch']} (CUDA {info['cuda']}), GDAL {info['gdal']}, "
        f"segmentation-models-pytorch {info['smp']}, Python {info['python']}; GDAL cache max "
        f"{info['gdal_cachemax_mib']} MiB",
        f"- batch size {cfg['batch_size']}, window {cfg.get('window', '?')} px, stride {cfg.get('stride', '?')} px; "
        f"input: {cfg['source']} tiled n×n by a VRT (real imagery)",
        f"- command: `{cfg['command']}`; started {report['started']}, took {report.get('total_minutes', '?')} min",
        "",
        "| backbone | raster | windows | end-to-end s | end-to-end MP/s | raw forward MP/s | e2e / raw "
        "| peak RSS streaming | peak RSS raw forward | naive s | naive MP/s | naive peak RSS | CPU used by others "
        "(raw, e2e, naive) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        e, raw, nv = r.get("e2e") or {}, r.get("raw") or {}, r.get("naive") or {}
        ratio = (e["megapixels_per_second"] / raw["megapixels_per_second"]) if e and raw else None
        raw_txt = _fmt(raw.get("megapixels_per_second"), 3)
        if raw.get("sampled"):
            raw_txt += f" ({raw['timed_windows']}/{raw['windows']} win)"
        others = [x.get("others_cpu_share") for x in (raw, e, nv) if x.get("others_cpu_share") is not None]
        lines.append(
            f"| {r['backbone']} | {r['size']}² | {raw.get('windows') or e.get('windows', '—')} "
            f"| {_fmt(e.get('seconds'), 1)} | {_fmt(e.get('megapixels_per_second'), 3)} | {raw_txt} "
            f"| {_fmt(ratio, 2)} | {_gib(e.get('peak_rss_mib'))} | {_gib(raw.get('peak_rss_mib'))} "
            f"| {_fmt(nv.get('seconds'), 1)} "
            f"| {_fmt(nv.get('megapixels_per_second'), 3)} | {_gib(nv.get('peak_rss_mib'))} "
            f"| {', '.join(f'{o * 100:.0f} %' for o in others) or '—'} |")
    lines += ["", "Where the end-to-end time goes (seconds):", "",
              "| backbone | raster | end-to-end | in the forward loop (predictor + accumulate) | rest (read, "
              "normalise, write, set-up) | raw forward, extrapolated | s / window (raw) | CPU-s / window (raw) "
              "| CPU-s / window (e2e) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        e, raw = r.get("e2e") or {}, r.get("raw") or {}
        if not e:
            continue
        rest = e["seconds"] - e["forward_seconds"]
        lines.append(f"| {r['backbone']} | {r['size']}² | {e['seconds']:.1f} | {e['forward_seconds']:.1f} "
                     f"| {rest:.1f} | {_fmt(raw.get('extrapolated_seconds'), 1)} "
                     f"| {_fmt(raw.get('seconds_per_window'), 3)} | {_fmt(raw.get('cpu_seconds_per_window'), 3)} "
                     f"| {_fmt(e['process_cpu_seconds'] / max(e['windows'], 1), 3)} |")
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.segment", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,16384", help="raster sizes, px a side, multiples of 1024")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--naive-sizes", default="4096", help="sizes that also run the naive whole-image engine")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: the engine's)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--out-dir", default="bench-output")
    ap.add_argument("--large-backbones", default=None,
                    help=f"backbones that run sizes above {LARGE_SIZE} px (default: all on CUDA, "
                         "efficientnet_lite0 only on the CPU, where one such run takes ~40 min); 'all' for all")
    ap.add_argument("--raw-windows", type=int, default=None,
                    help="windows timed by the raw forward measurement, 0 = all "
                         f"(default {RAW_SAMPLE['cpu']} on the CPU, {RAW_SAMPLE['cuda']} on CUDA)")
    ap.add_argument("--profile", action="store_true", help="cProfile the end-to-end runs (<out-dir>/*.prof, .txt)")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the class GeoTIFFs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2048² only, naive at 2048², 8 raw windows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.quick:
        args.sizes, args.naive_sizes = "2048", "2048"
        if args.raw_windows is None:
            args.raw_windows = 8
    sizes = [int(s) for s in _csv(args.sizes)]
    naive_sizes = {int(s) for s in _csv(args.naive_sizes)}
    backbones = _csv(args.backbones)
    out_dir = (REPO / args.out_dir) if not Path(args.out_dir).is_absolute() else Path(args.out_dir)
    for sub in ("inputs", "models", "outputs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    if not SOURCE.exists():
        raise SystemExit(f"The source imagery {SOURCE} is missing (the shared data folder)")

    info = run_child({"kind": "info", "device": args.device})
    dev_type = info["device_type"]
    batch = args.batch_size or info["default_batch"]
    raw_windows = RAW_SAMPLE.get(dev_type, 16) if args.raw_windows is None else args.raw_windows
    if args.large_backbones is None:
        large = set(backbones) if dev_type == "cuda" else {"efficientnet_lite0"}
    else:
        large = set(backbones) if args.large_backbones == "all" else set(_csv(args.large_backbones))
    print(f"device: {info['device_name']}; torch {info['torch']}; batch size {batch}", file=sys.stderr, flush=True)

    notes: List[str] = []
    models: Dict[str, Path] = {}
    for bb in backbones:
        path = out_dir / "models" / f"{bb}_random.srmf"
        if not path.exists():
            run_child({"kind": "build-model", "backbone": bb, "model": str(path)})
        models[bb] = path
    inputs = {s: build_mosaic(s, out_dir / "inputs") for s in sorted(set(sizes) | naive_sizes)}

    runs = []
    for s in sizes:  # size-major: the short runs of every backbone first
        for bb in backbones:
            if s > LARGE_SIZE and bb not in large:
                notes.append(f"{bb} at {s}² skipped: on the {dev_type.upper()} a run that size takes tens of "
                             f"minutes, so sizes above {LARGE_SIZE} px run for {', '.join(sorted(large))} only "
                             "(memory is the point of that size; pass --large-backbones all to run it)")
                continue
            runs.append({"backbone": bb, "size": s, "input": str(inputs[s])})
    if not runs:
        raise SystemExit("nothing to run")

    report = {"started": started, "info": info, "runs": runs, "notes": notes,
              "config": {"command": "python -m bench.segment " + " ".join(sys.argv[1:] if argv is None else argv),
                         "sizes": sizes, "naive_sizes": sorted(naive_sizes), "backbones": backbones,
                         "batch_size": batch, "device": args.device, "raw_windows": raw_windows,
                         "large_backbones": sorted(large), "source": str(SOURCE.relative_to(SHARED_DATA.parent.parent))
                         if SHARED_DATA.parent.parent in SOURCE.parents else str(SOURCE)}}
    json_path, md_path = out_dir / "segment-bench.json", out_dir / "segment-bench.md"

    def save() -> None:
        report["total_minutes"] = round((time.perf_counter() - t_start) / 60, 1)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(render_markdown(report))

    base = {"device": args.device, "batch_size": batch, "keep_outputs": args.keep_outputs}
    notes.append(f"raw forward speed measured just before each end-to-end run (same contention), on "
                 + ("all windows" if raw_windows <= 0 else f"a sample of at most {raw_windows} windows")
                 + f" after {WARMUP_BATCHES} warm-up batches, batched as the engine batches them, extrapolated "
                 "to the full window count; 'peak RSS raw forward' = that process (model + one batch forward), the floor "
                 "under any engine's peak")
    eta_done = False
    # For each configuration: raw forward, end to end (streaming), naive where asked; one subprocess each.
    for r in runs:
        bb, s = r["backbone"], r["size"]
        label = f"{bb} {s}² raw"
        print(f"== {label}", file=sys.stderr, flush=True)
        r["raw"] = run_child({**base, "kind": "raw", "label": label, "input": r["input"],
                              "model": str(models[bb]), "raw_windows": raw_windows})
        print(f"   {r['raw']['seconds_per_window']:.3f} s/window, {r['raw']['megapixels_per_second']:.3f} MP/s "
              f"({r['raw']['timed_windows']} of {r['raw']['windows']} windows timed), "
              f"peak RSS {r['raw']['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        if not eta_done:
            spw = r["raw"]["seconds_per_window"]
            n = sum(grid_windows(x["size"]) * (2 if x["size"] in naive_sizes else 1) for x in runs)
            print(f"estimated time of the end-to-end and naive runs at {spw:.2f} s/window: {n * spw / 60:.0f} min "
                  f"({n} windows; other backbones differ)", file=sys.stderr, flush=True)
            eta_done = True
        label = f"{bb} {s}² e2e"
        print(f"== {label}", file=sys.stderr, flush=True)
        spec = {**base, "kind": "e2e", "label": label, "input": r["input"], "model": str(models[bb]),
                "output": str(out_dir / "outputs" / f"{bb}_{s}_classes.tif")}
        if args.profile:
            spec["profile"] = str(out_dir / f"profile_{bb}_{s}.prof")
        r["e2e"] = run_child(spec)
        report["config"]["window"], report["config"]["stride"] = r["e2e"]["window"], r["e2e"]["stride"]
        print(f"   {r['e2e']['seconds']:.1f} s, {r['e2e']['megapixels_per_second']:.3f} MP/s, "
              f"peak RSS {r['e2e']['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        save()
        if s in naive_sizes:
            label = f"{bb} {s}² naive"
            print(f"== {label}", file=sys.stderr, flush=True)
            r["naive"] = run_child({**base, "kind": "naive", "label": label, "input": r["input"],
                                    "model": str(models[bb]),
                                    "output": str(out_dir / "outputs" / f"{bb}_{s}_naive_classes.tif")})
            print(f"   {r['naive']['seconds']:.1f} s, {r['naive']['megapixels_per_second']:.3f} MP/s, "
                  f"peak RSS {r['naive']['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
            save()

    shares = [x.get("others_cpu_share") for r in runs for x in (r.get("e2e"), r.get("naive"))
              if x and x.get("others_cpu_share") is not None]
    if shares and max(shares) > 0.05:
        notes.append(f"other processes used up to {max(shares) * 100:.0f} % of the machine's CPU time during a "
                     "run (column 'CPU used by others'): figures of those runs are slowed by contention")
    notes.append("peak RSS = the measuring subprocess's own high-water mark (VmHWM), which includes Python, "
                 "torch, GDAL and the model (a fresh process per measurement)")
    save()
    print(render_markdown(report))
    print(f"written: {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
