"""``python -m core segment``: its arguments and its report (torch-free until the job runs)."""
from __future__ import annotations

from core.protocol import Reporter

HELP = "segment a raster into a class raster"


def add_segment_arguments(seg) -> None:
    """Arguments of ``python -m core segment INPUT OUTPUT``."""
    from core.cli import int_arg
    from core.model.modelfile import DEFAULT_INFERENCE

    seg.add_argument("input", help="input raster (any format GDAL reads)")
    seg.add_argument("output", help="output class raster (GeoTIFF, uint8, 255 = nodata)")
    seg.add_argument("--model", default=None, help="model file (default: the embedded default model)")
    seg.add_argument("--window", type=int_arg("--window"), default=None, help=f"window (tile) size in pixels (default: the model's, {DEFAULT_INFERENCE['window']})")
    seg.add_argument("--stride", type=int_arg("--stride"), default=None, help=f"stride in pixels (default: the model's, {DEFAULT_INFERENCE['stride']})")
    seg.add_argument("--batch-size", type=int_arg("--batch-size"), default=None, help="windows per forward pass")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    seg.add_argument("--precision", default="auto", help="auto (bf16 where native and checked), fp32 or bf16")
    seg.add_argument("--bands", default=None, help="1-based input bands in the model's order, e.g. 3,2,1; one band is replicated")
    seg.add_argument("--resolution", default="auto",
                     help="processing resolution: auto (the model's GSD when the raster's pixels are more than 1.5x "
                          "off it; the default), native, or metres; the output is always on the input's grid")
    seg.add_argument("--pixel-size", type=float, default=None,
                     help="the raster's pixel size in metres, for a raster without georeferencing (for --resolution)")
    seg.add_argument("--extent", default=None,
                     help="area of interest xmin,ymin,xmax,ymax[,CRS] (default CRS: the raster's); the output covers it")
    seg.add_argument("--mask", default=None,
                     help="polygon layer of the area of interest (any CRS); pixels outside its polygons are nodata")
    seg.add_argument("--tta", action="store_true",
                     help="test-time augmentation: every window also flipped and turned, logits averaged (8x the time)")
    seg.add_argument("--polygons", default=None,
                     help="also write the class polygons (GeoPackage: class_id, class_name, area_m2)")
    seg.add_argument("--min-area", type=float, default=None,
                     help="minimum mapping unit of the polygons in m2 (smaller regions merge into a neighbour)")
    seg.add_argument("--min-pixels", type=int_arg("--min-pixels"), default=None,
                     help="minimum mapping unit of the polygons in pixels")
    seg.add_argument("--simplify", type=float, default=None,
                     help="simplify the polygons by this many pixels (coverage simplification: adjacent polygons "
                          "keep sharing their edges, the outline of the classified area is kept; 1 removes the "
                          "pixel stair-steps)")
    seg.add_argument("--probabilities", default=None, help="also write per-class probabilities (uint8 GeoTIFF, p*250)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--json", action="store_true", help="print JSON lines (progress, log, result, error)")


def run_segment_command(args, rep: Reporter) -> dict:
    """Segment ``args.input`` into ``args.output`` (:func:`core.segment.job.segment_raster`) and report it."""
    from core.geo.raster import parse_bands
    from core.segment.job import segment_raster

    if args.simplify is not None and not args.polygons:
        from core.errors import InputError

        raise InputError("--simplify applies to the class polygons: give --polygons PATH.gpkg as well")
    result = segment_raster(args.input, args.output, args.model, window=args.window, stride=args.stride,
                            batch_size=args.batch_size, device=args.device, precision=args.precision, bands=parse_bands(args.bands),
                            probabilities=args.probabilities, overwrite=args.overwrite, reporter=rep,
                            resolution=args.resolution, pixel_size=args.pixel_size, tta=args.tta,
                            extent=args.extent, mask=args.mask, polygons=args.polygons, min_area_m2=args.min_area,
                            min_pixels=args.min_pixels, simplify=args.simplify)
    lines = [f"Wrote {result['output']} ({result['width']} x {result['height']} px, {result['crs'] or 'no CRS'}) "
             f"in {result['seconds']:.1f} s ({result['megapixels_per_second']:.2f} MP/s on {result['device']})"]
    if result.get("polygons"):
        pg = result["polygons"]
        lines.append(f"Wrote {pg['polygons']} ({pg['features']} class polygons"
                     + (f", none under {pg['min_pixels']} px" if pg["min_pixels"] > 1 else "") + ")")
    if result["probabilities"]:
        lines.append(f"Wrote {result['probabilities']} (per-class probability x 250)")
    lines.append(f"{'class':<20s} {'pixels':>12s} {'area (ha)':>12s}")
    for a in result["class_areas"]:
        ha = "" if a["area_ha"] is None else f"{a['area_ha']:.4f}"
        lines.append(f"{a['name']:<20s} {a['pixels']:>12d} {ha:>12s}")
    if result["area_note"]:
        lines.append("Note: " + result["area_note"])
    if result["untrained_model"]:
        lines.append("WARNING: the model is an UNTRAINED PLACEHOLDER; the classes are not meaningful.")
    rep.result(result, text="\n".join(lines))
    return result
