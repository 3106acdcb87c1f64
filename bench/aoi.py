"""The cost of an area of interest grows with the area, not the raster (issue 15, part 1).

``python -m bench.aoi [--size 4096] [--share 0.05]``: the embedded default model on a ``size``² VRT that
tiles the real Adelaide raster (``bench.segment.build_mosaic``), segmented whole and then with
``--extent`` over a centred square of ``share`` of its area, at its own pixels (``--resolution native``,
float32, so the two runs differ by the area only), each in this process one after the other: windows run,
seconds and MP/s of the input covered, side by side.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    from osgeo import gdal

    from bench.segment import build_mosaic
    from core.protocol import Reporter
    from core.segment.job import segment_raster

    ap = argparse.ArgumentParser(prog="python -m bench.aoi", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--share", type=float, default=0.05)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vrt = build_mosaic(args.size, Path(tmp))
        ds = gdal.Open(str(vrt))
        gt = ds.GetGeoTransform()
        side = int(round(args.size * math.sqrt(args.share)))
        c0 = (args.size - side) // 2
        x0, x1 = gt[0] + c0 * gt[1], gt[0] + (c0 + side) * gt[1]
        y1, y0 = gt[3] + c0 * gt[5], gt[3] + (c0 + side) * gt[5]
        for name, extent in (("whole raster", None), (f"{args.share:.0%} area of interest", f"{x0!r},{y0!r},{x1!r},{y1!r}")):
            t0 = time.perf_counter()
            res = segment_raster(vrt, Path(tmp) / "classes.tif", None, device="cpu", precision="fp32", overwrite=True,
                                 resolution="native", extent=extent,
                                 reporter=Reporter(json_mode=True, stream=io.StringIO()))
            dt = time.perf_counter() - t0
            rows.append({"run": name, "pixels": res["width"] * res["height"], "windows": res["windows"],
                         "seconds": round(dt, 2), "megapixels_per_second": round(res["width"] * res["height"] / 1e6 / dt, 3)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'run':28s} {'pixels':>12s} {'windows':>8s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['run']:28s} {r['pixels']:12d} {r['windows']:8d} {r['seconds']:8.1f}")
    print(f"time ratio {rows[1]['seconds'] / rows[0]['seconds']:.3f} for an area ratio {rows[1]['pixels'] / rows[0]['pixels']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
