"""The engine's observable behaviour on the real rasters of ``../shared/data``, recorded through the
command line only (``python -m core ... --json``), so that a change of the engine's internal layout can be
checked to change nothing (issue 10).

    python tests/engine_baseline.py record tests/engine_baseline.json   # before a refactor
    python tests/engine_baseline.py compare tests/engine_baseline.json  # after it: exit 1 on any difference

What is recorded, per case: the ``result`` line of each command with timings and temporary paths dropped,
the ``metrics`` lines (fine-tune loss history and validation), and digests of what was written — the
pixel data of every raster (per band, not the file bytes, so GDAL metadata order does not matter), the
features of every vector layer, and the tensors of a written model file. Cases:

- segment: OSBS_029 (EPSG:32617, nodata 255), the Atlanta panchromatic scene (1 band uint16, nodata 0,
  with class probabilities) and Adelaide (EPSG:4326) with the embedded default model;
- evaluate: the Atlanta segmentation against the SpaceNet building polygons; the Dubai tile_2/005
  segmentation against its real mask (decoded from the SOURCES.md colours);
- findclass: water on Dubai tile_2/005 from the water polygons of its mask's left third;
- finetune: 20 seeded CPU iterations on that tile (batch 2, crop 128), then a segmentation with the result.

Float values compare with a relative tolerance of 1e-6 (``--rtol``); digests compare exactly. Digests of
floating-point work are only reproducible on the same CPU kind and torch build: on another machine
(``machine`` differs) the comparison is *portable* — digests are skipped, and the class areas, metrics,
per-band pixel statistics and weight sums compare with a relative tolerance of 1e-3. The fine-tune case
(``finetune_20``) is the exception there: 20 optimiser steps amplify the last-bit differences of another
CPU's vector width (AVX2 against the AVX-512 of the recording) into slightly different weights, so its numbers
compare within 1 % relative or 0.005 absolute (measured on AVX2: loss 0.18 %, overall accuracy 0.001, the
smallest class's IoU 0.0019, class areas 0.34 %); a broken loss, sampler or optimiser moves them far more.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OSBS = DATA / "deepforest_neon_osbs" / "OSBS_029.tif"
ATLANTA = DATA / "solaris_spacenet_atlanta" / "sample_geotiff.tif"
ATLANTA_POLYGONS = DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"
ADELAIDE = DATA / "openearthmap_adelaide" / "adelaide_2.tif"
DUBAI = DATA / "dubai_hitl_aerial" / "tile_2"
DUBAI_COLOURS = {(60, 16, 152): 0, (132, 41, 246): 1, (110, 193, 228): 2, (254, 221, 58): 3, (226, 169, 41): 4}
DUBAI_CLASSES = [("building", "#3C1098"), ("land", "#8429F6"), ("road", "#6EC1E4"),
                 ("vegetation", "#FEDD3A"), ("water", "#E2A929")]
GT = (500000.0, 0.8, 0.0, 2780000.0, 0.0, -0.8)
VOLATILE = {"seconds", "megapixels_per_second", "peak_memory_mb", "peak_rss_mb", "elapsed", "started", "finished",
            "created", "device_name", "threads"}


# The exact path, whatever the machine or its free memory: float32 (auto would pick bf16 only where the CPU
# runs it natively) and a fixed batch of windows (a CPU job otherwise sizes it from the free memory).
PINNED = {"segment": ["--precision", "fp32", "--batch-size", "2"],
          "findclass": ["--precision", "fp32", "--batch-size", "2"], "finetune": ["--precision", "fp32"]}


def _engine(args, tmp: Path) -> dict:
    """Run ``python -m core ARGS --json``; the result line and the metrics lines, paths made relative
    (to ``<tmp>``, ``<data>`` and ``<repo>``, so a clone anywhere compares equal)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [*args, *PINNED.get(str(args[0]), [])]
    proc = subprocess.run([sys.executable, "-m", "core", *map(str, args), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    result, metrics = None, []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("type") == "result":
            result = msg.get("data", msg)
        elif msg.get("type") == "metrics":
            metrics.append(msg.get("data", msg))
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"python -m core {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"result": _clean(result, tmp), "metrics": _clean(metrics, tmp)}


def _clean(obj, tmp: Path):
    if isinstance(obj, dict):
        return {k: _clean(v, tmp) for k, v in sorted(obj.items()) if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_clean(v, tmp) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(tmp), "<tmp>").replace(str(DATA), "<data>").replace(str(ROOT), "<repo>")
    return obj


def machine() -> str:
    """The CPU kind and torch build that floating-point digests depend on."""
    import platform

    import torch

    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def raster_digest(path) -> dict:
    """md5 of each band's pixel data (native type) and its mean, with the size, geotransform and CRS."""
    from osgeo import gdal

    ds = gdal.Open(str(path))
    bands = []
    for b in range(1, ds.RasterCount + 1):
        band = ds.GetRasterBand(b)
        arr = band.ReadAsArray()
        bands.append({"md5": hashlib.md5(np.ascontiguousarray(arr).tobytes()).hexdigest(), "dtype": str(arr.dtype),
                      "nodata": band.GetNoDataValue(), "mean": float(np.mean(arr, dtype=np.float64))})
    srs = ds.GetSpatialRef()
    out = {"size": [ds.RasterXSize, ds.RasterYSize], "geotransform": list(ds.GetGeoTransform()),
           "crs": srs.GetAuthorityCode(None) if srs is not None else None, "bands": bands}
    ds = None
    return out


def vector_digest(path, tmp: Path) -> dict:
    """Per layer: feature count and md5 of the features' attributes and WKT geometry, in FID order (JSON
    text fields are compared as their cleaned content: no timings, no temporary paths)."""
    from osgeo import ogr

    ds = ogr.Open(str(path))
    out = {}
    for i in range(ds.GetLayerCount()):
        lyr = ds.GetLayer(i)
        h = hashlib.md5()
        n = 0
        for f in lyr:
            g = f.GetGeometryRef()
            items = {k: _clean(_json_or_text(v), tmp) for k, v in f.items().items()}
            h.update(json.dumps([f.GetFID(), items, g.ExportToWkt() if g else None], sort_keys=True,
                                default=str).encode())
            n += 1
        out[lyr.GetName()] = {"features": n, "md5": h.hexdigest()}
    ds = None
    return out


def _json_or_text(v):
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            pass
    return v


def model_digest(path) -> dict:
    """md5 of every tensor of a ``.srmf`` model file (safetensors), and its class table."""
    from safetensors import safe_open

    tensors, total = {}, 0.0
    with safe_open(str(path), framework="np") as f:
        header = json.loads(f.metadata()["srmf"])
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            tensors[k] = hashlib.md5(np.ascontiguousarray(t).tobytes()).hexdigest()
            total += float(np.abs(t.astype(np.float64)).sum())
    return {"tensors": hashlib.md5(json.dumps(tensors, sort_keys=True).encode()).hexdigest(),
            "n_tensors": len(tensors), "abs_sum": total, "classes": header.get("classes")}


def _dubai_scene(tmp: Path):
    """tile_2/image_part_005 as a georeferenced GeoTIFF, its mask as class ids (255 = unlabelled), and the
    water of the mask's left third as example polygons."""
    from osgeo import gdal, osr
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from polygons import polygonize_mask, write_rgb_geotiff

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32640)
    image = np.asarray(Image.open(DUBAI / "images" / "image_part_005.jpg").convert("RGB")).transpose(2, 0, 1)
    rgb = np.asarray(Image.open(DUBAI / "masks" / "image_part_005.png").convert("RGB"))
    ids = np.full(rgb.shape[:2], 255, np.uint8)
    for colour, cid in DUBAI_COLOURS.items():
        ids[np.all(rgb == colour, axis=-1)] = cid
    H, W = ids.shape
    image = np.ascontiguousarray(image[:, :H, :W])
    scene = tmp / "dubai.tif"
    write_rgb_geotiff(scene, image, GT, srs)
    ref = tmp / "dubai_ids.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(ref), W, H, 1, gdal.GDT_Byte)
    ds.SetGeoTransform(GT)
    ds.SetSpatialRef(srs)
    ds.GetRasterBand(1).WriteArray(ids)
    ds.GetRasterBand(1).SetNoDataValue(255)
    ds = None
    water = ids == 4
    water[:, W // 3:] = False
    examples = tmp / "water_examples.gpkg"
    polygonize_mask(examples, water, GT, srs)
    return scene, ref, examples


def _classes_file(tmp: Path, name: str, entries, **extra) -> Path:
    p = tmp / name
    p.write_text(json.dumps({"classes": entries, **extra}))
    return p


def record() -> dict:
    out = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="srmf-baseline-") as d:
        tmp = Path(d)
        for name, src, extra in (("osbs", OSBS, []), ("atlanta", ATLANTA, ["--probabilities", tmp / "atlanta_p.tif"]),
                                 ("adelaide", ADELAIDE, [])):
            o = tmp / f"{name}_classes.tif"
            run = _engine(["segment", src, o, "--device", "cpu", *extra], tmp)
            run["raster"] = raster_digest(o)
            if extra:
                run["probabilities"] = raster_digest(extra[1])
            out[f"segment_{name}"] = run
        entries = [{"name": n, "colour": c} for n, c in DUBAI_CLASSES]
        entries[0]["value"] = "yes"
        table = _classes_file(tmp, "atlanta_classes.json", entries, background="land")
        out["evaluate_atlanta_polygons"] = _engine(
            ["evaluate", tmp / "atlanta_classes.tif", ATLANTA_POLYGONS, "--reference-field", "building",
             "--classes", table, "--output-csv", tmp / "atlanta_eval.csv"], tmp)
        scene, ref, examples = _dubai_scene(tmp)
        run = _engine(["segment", scene, tmp / "dubai_classes.tif", "--device", "cpu"], tmp)
        run["raster"] = raster_digest(tmp / "dubai_classes.tif")
        out["segment_dubai"] = run
        out["evaluate_dubai_raster"] = _engine(["evaluate", tmp / "dubai_classes.tif", ref], tmp)
        fc = tmp / "findclass"
        run = _engine(["findclass", scene, examples, fc, "--device", "cpu", "--top-n", "30", "--patch", "32"], tmp)
        run["relevance"] = raster_digest(fc / "relevance.tif")
        run["candidates"] = vector_digest(fc / "candidates.gpkg", tmp)
        out["findclass_water"] = run
        model = tmp / "tuned.srmf"
        run = _engine(["finetune", model, "--raster", scene, "--labels", ref, "--iterations", "20",
                       "--batch-size", "2", "--crop", "128", "--eval-interval", "20", "--checkpoint-interval", "20",
                       "--seed", "0", "--device", "cpu"], tmp)
        run["model"] = model_digest(model)
        seg = _engine(["segment", scene, tmp / "dubai_tuned.tif", "--model", model, "--device", "cpu"], tmp)
        run["segment_with_result"] = {"result": seg["result"], "raster": raster_digest(tmp / "dubai_tuned.tif")}
        out["finetune_20"] = run
    return out


DIGESTS = {"md5", "tensors", "machine"}


#: Cases whose numbers are the outcome of training: on another machine kind they compare within
#: (relative, absolute) tolerances of their own (module docstring).
TRAINED = {"finetune_20": (1e-2, 5e-3)}


def differences(a, b, rtol: float, path: str = "", portable: bool = False, atol: float = None) -> list:
    """Paths where two recorded values differ (floats within ``rtol``; ``portable``: digests skipped and
    numbers, integers too, within ``rtol``; absolute tolerance ``atol``, default 1e-9, portable 1e-3)."""
    atol = (1e-3 if portable else 1e-9) if atol is None else atol
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}/{k}: only in the baseline" for k in a.keys() - b.keys()]
        diffs += [f"{path}/{k}: only in the new run" for k in b.keys() - a.keys()]
        for k in sorted(a.keys() & b.keys()):
            if not (portable and k in DIGESTS):
                diffs += differences(a[k], b[k], rtol, f"{path}/{k}", portable, atol)
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in differences(x, y, rtol, f"{path}[{i}]", portable, atol)]
    number = (int, float)
    if (isinstance(a, float) or (portable and isinstance(a, number))) and isinstance(b, number) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b)):
            return []
    elif a == b:
        return []
    return [f"{path}: {a!r} (baseline) vs {b!r} (now)"]


def portable_differences(base: dict, now: dict) -> list:
    """:func:`differences` of two records made on different machine kinds: digests skipped, numbers within
    1e-3, the :data:`TRAINED` cases within their own tolerances."""
    def cases(record: dict, keys, keep: bool) -> dict:
        return {k: v for k, v in record.items() if (k in keys) == keep}

    diffs = differences(cases(base, TRAINED, False), cases(now, TRAINED, False), 1e-3, portable=True)
    for case, (case_rtol, case_atol) in TRAINED.items():  # a case missing on one side is named by differences
        diffs += differences(cases(base, {case}, True), cases(now, {case}, True), case_rtol, "", True, case_atol)
    return diffs


def compare(baseline: Path, rtol: float = 1e-6) -> tuple:
    """Record now and compare with ``baseline``: ``(differences, mode)``, mode "exact" on the machine kind
    that recorded it, else "portable" (see the module docstring)."""
    base = json.loads(Path(baseline).read_text())
    now = record()
    portable = base.get("machine") != now["machine"]
    diffs = portable_differences(base, now) if portable else differences(base, now, rtol)
    return diffs, ("portable: recorded on " + str(base.get("machine")) + ", now " + now["machine"]) if portable else "exact"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("record", "compare"))
    p.add_argument("baseline", type=Path)
    p.add_argument("--rtol", type=float, default=1e-6)
    args = p.parse_args(argv)
    if args.mode == "record":
        now = record()
        args.baseline.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now) - 1} cases in {args.baseline} on {now['machine']}")
        return 0
    diffs, mode = compare(args.baseline, args.rtol)
    for d in diffs:
        print(d)
    n = len(json.loads(args.baseline.read_text())) - 1
    print(f"{n} cases: {'identical' if not diffs else f'{len(diffs)} differences'} to {args.baseline} ({mode})")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
