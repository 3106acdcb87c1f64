"""Does resolution-aware inference help the embedded default model? (issue 12, part 1)

``python -m bench.resolution``: segments every labelled real image of ../shared/data whose ground sample
distance is known with the embedded default model (trained at 0.8 m), once on its own pixels
(``--resolution native``) and once at the model's GSD (``--resolution auto``), and prints the IoU of each class
the image's labels share with the model, per image and pooled, side by side. Nothing is trained; the
images are ones the model never saw (it was trained on Dubai).

Label mappings onto the model's classes (building, land, road, vegetation, water); what has no
counterpart is ignored (255), never forced:
- LoveDA (Google Earth, 0.3 m, the SRMF paper's dataset): building, road, water as they are; barren →
  land; forest → vegetation; background, agriculture and no-data ignored (agriculture is crops or bare
  soil depending on the season, background anything else).
- ISPRS Potsdam (5 cm): building; impervious surfaces → road (roads, pavements, parking: the model's
  "road" is paved ground); low vegetation and trees → vegetation; car, clutter, boundary ignored.
- SpaceNet Atlanta (0.5 m, WorldView-2 pan, 43 footprints): building vs not building (binary: any other
  class predicted counts as not building).
The shared Dubai tiles are the model's training and validation data and are left out.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from osgeo import gdal

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
MM = DATA / "srmf_mmseg_testdata"
CLASSES = ["building", "land", "road", "vegetation", "water"]
IGN = 255

LOVEDA = {1: IGN, 2: 0, 3: 2, 4: 4, 5: 1, 6: 3, 7: IGN, 0: IGN}
POTSDAM = {0: IGN, 1: 2, 2: 0, 3: 3, 4: 3, 5: IGN, 6: IGN}


def _lut(mapping):
    lut = np.full(256, IGN, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _images():
    """(name, image path, label uint8 (H, W) in the model's class ids or None for binary, pixel size m, binary)."""
    for i in (0, 1, 2):
        ann = gdal.Open(str(MM / "pseudo_loveda_dataset" / "ann_dir" / f"{i}.png")).ReadAsArray()
        yield f"loveda/{i}", MM / "pseudo_loveda_dataset" / "img_dir" / f"{i}.png", _lut(LOVEDA)[ann], 0.3, False
    ann = gdal.Open(str(MM / "pseudo_potsdam_dataset" / "ann_dir" / "2_10_0_0_512_512.png")).ReadAsArray()
    yield ("potsdam/2_10", MM / "pseudo_potsdam_dataset" / "img_dir" / "2_10_0_0_512_512.png", _lut(POTSDAM)[ann],
           0.05, False)
    atl = DATA / "solaris_spacenet_atlanta" / "sample_geotiff.tif"
    ds = gdal.Open(str(atl))
    mem = gdal.GetDriverByName("MEM").Create("", ds.RasterXSize, ds.RasterYSize, 1, gdal.GDT_Byte)
    mem.SetGeoTransform(ds.GetGeoTransform())
    mem.SetProjection(ds.GetProjection())
    vec = gdal.OpenEx(str(DATA / "solaris_spacenet_atlanta" / "geotiff_labels.geojson"))
    gdal.RasterizeLayer(mem, [1], vec.GetLayer(0), burn_values=[1])
    building = mem.GetRasterBand(1).ReadAsArray()
    yield "atlanta (buildings)", atl, building, None, True


def _confusion(pred, ref, k):
    keep = (pred != IGN) & (ref != IGN)
    return np.bincount(ref[keep].astype(np.int64) * k + pred[keep], minlength=k * k).reshape(k, k)


def _ious(cm):
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    present = cm.sum(1) > 0
    return [float(inter[i] / union[i]) if present[i] and union[i] > 0 else None for i in range(len(cm))]


def main(argv=None) -> int:
    from core.protocol import Reporter
    from core.segment.job import segment_raster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--model", default=None, help="model file (default: the embedded default model)")
    ap.add_argument("--modes", default="native,auto", help="processing resolutions to compare")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    rows, pooled = [], {m: np.zeros((5, 5), np.int64) for m in modes}
    pooled_b = {m: np.zeros((2, 2), np.int64) for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, label, pixel, binary in _images():
            row = {"image": name, "pixel_size_m": pixel}
            for mode in modes:
                out = Path(tmp) / f"{mode}.tif"
                t0 = time.perf_counter()
                res = segment_raster(path, out, args.model, device="cpu", precision="fp32", overwrite=True,
                                     resolution=mode, pixel_size=pixel,
                                     reporter=Reporter(json_mode=True, stream=io.StringIO()))
                ds = gdal.Open(str(out))
                pred = ds.GetRasterBand(1).ReadAsArray()
                ds = None
                if binary:
                    p = np.where(pred == 255, IGN, (pred == 0).astype(np.uint8))
                    cm = _confusion(p, label.astype(np.uint8), 2)
                    pooled_b[mode] += cm
                    row[mode] = {"building_iou": _ious(cm)[1]}
                else:
                    cm = _confusion(pred, label, 5)
                    pooled[mode] += cm
                    row[mode] = dict(zip(CLASSES, _ious(cm)))
                row[mode]["seconds"] = round(time.perf_counter() - t0, 2)
                row[mode]["processed"] = ([res["processing"]["width"], res["processing"]["height"]]
                                          if res["processing"]["resampled"] else "native")
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {m: dict(zip(CLASSES, _ious(pooled[m]))) for m in pooled}
    for m in summary:
        vals = [v for v in summary[m].values() if v is not None]
        summary[m]["miou_rgb_images"] = float(np.mean(vals))
        summary[m]["atlanta_building_iou"] = _ious(pooled_b[m])[1]
    print("\nper class IoU, LoveDA + Potsdam pooled; Atlanta building IoU")
    print(f"{'':22s} " + " ".join(f"{m:>8s}" for m in modes))
    for key in CLASSES + ["miou_rgb_images", "atlanta_building_iou"]:
        vals = [summary[m][key] for m in modes]
        print(f"{key:22s} " + " ".join("        " if v is None else f"{v:8.4f}" for v in vals))
    if args.json:
        Path(args.json).write_text(json.dumps({"images": rows, "pooled": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
