"""``python -m core findclass`` and ``findclass-handoff``: their arguments and reports (torch-free until the
job runs)."""
from __future__ import annotations

from core.findclass.params import CELL, FEATURE_SPACES
from core.findclass.params import DEFAULTS
from core.findclass.params import MODES


# -- command line ----------------------------------------------------------------------------------------
def add_findclass_arguments(p) -> None:
    """Arguments of ``python -m core findclass``."""
    p.add_argument("raster", help="raster to search (any format GDAL reads)")
    p.add_argument("examples", help="polygon layer with example polygons of the new class (any CRS)")
    p.add_argument("output_dir", help="folder for relevance.tif and candidates.gpkg (created when missing)")
    p.add_argument("--model", default=None, help="model file (default: the embedded default model)")
    p.add_argument("--layer", default=None, help="layer of the example file (default: its first)")
    p.add_argument("--clusters", type=int, default=DEFAULTS["clusters"], help="K, upper bound on centroids (default 1: one mean prototype; more for a class with distinct looks)")
    p.add_argument("--top-n", type=int, default=DEFAULTS["top_n"], help="candidate patches to write")
    p.add_argument("--negative-field", default=None, help="boolean field marking negative examples")
    p.add_argument("--patch", type=int, default=DEFAULTS["patch"], help="candidate patch size in pixels (multiple of 4)")
    p.add_argument("--mode", choices=MODES, default=DEFAULTS["mode"],
                   help="relevance: max (CAT) or mean cosine to the centroids")
    p.add_argument("--features", choices=FEATURE_SPACES, default=DEFAULTS["features"],
                   help="feature space: fused (256-ch map before the classifier), embedding (text-aligned), both")
    p.add_argument("--no-center", action="store_true", help="do not subtract the background mean feature")
    p.add_argument("--max-per-polygon", type=int, default=DEFAULTS["max_per_polygon"],
                   help="support cells sampled per polygon at most")
    p.add_argument("--recall-target", type=float, default=DEFAULTS["recall_target"],
                   help="recall of the held-out support at the calibrated threshold")
    p.add_argument("--window", type=int, default=None, help="window size in pixels (default: the model's)")
    p.add_argument("--stride", type=int, default=None, help="stride in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 where native and checked), fp32 or bf16")
    p.add_argument("--bands", default=None, help="1-based input bands in the model's order, e.g. 3,2,1")
    p.add_argument("--extent", default=None, help="search only xmin,ymin,xmax,ymax[,CRS] (default CRS: the raster's)")
    p.add_argument("--mask", default=None, help="search only inside these polygons (any CRS)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and of the support sampling")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, log, result, error)")


def run_findclass_command(args, rep) -> dict:
    """``python -m core findclass``: run :func:`find_class` and report."""
    from core.findclass.job import find_class
    from core.geo.raster import parse_bands

    res = find_class(args.raster, args.examples, args.output_dir, args.model, layer=args.layer,
                     clusters=args.clusters, top_n=args.top_n, negative_field=args.negative_field,
                     patch=args.patch, mode=args.mode, features=args.features, center=not args.no_center,
                     max_per_polygon=args.max_per_polygon, recall_target=args.recall_target,
                     window=args.window, stride=args.stride, batch_size=args.batch_size, device=args.device, precision=args.precision,
                     bands=parse_bands(args.bands), seed=args.seed, overwrite=args.overwrite, reporter=rep,
                     extent=args.extent, mask=args.mask)
    c = res["clusters"]
    lines = [f"Wrote {res['relevance']} ({res['relevance_width']} x {res['relevance_height']} cells of {CELL} px, "
             f"{res['crs'] or 'no CRS'}) and {res['candidates']} ({res['candidates_written']} candidates) "
             f"in {res['seconds']:.1f} s on {res['device']}",
             f"support: {res['support_cells']} cells from {res['examples']['positive']} example polygon(s); "
             f"clusters: {c['kept']} of K={c['requested']} (sizes {', '.join(map(str, c['sizes']))})"
             + (f", dropped {c['dropped']}" if c["dropped"] else ""),
             f"threshold {res['threshold']['threshold']:.4f} ({res['threshold']['method']}, recall target "
             f"{res['threshold']['recall_target']:.0%}): {res['share_above_threshold']:.1%} of the cells above",
             "resembles: " + ", ".join(d["name"] for d in res["resembles"])]
    if res["untrained_model"]:
        lines.append("WARNING: the model is an UNTRAINED PLACEHOLDER.")
    rep.result(res, text="\n".join(lines))
    return res


def add_handoff_arguments(p) -> None:
    """Arguments of ``python -m core findclass-handoff``."""
    p.add_argument("candidates", help="a reviewed candidates.gpkg of findclass (status accepted/rejected/pending)")
    p.add_argument("output_dir", help="folder for labels.gpkg, sources.json, classes.json, base_with_class.srmf")
    p.add_argument("--class-name", required=True, help="name of the new class")
    p.add_argument("--base-model", default=None, help="model to add the class to (default: the embedded one)")
    p.add_argument("--colour", default=None, help="colour of the new class, #RRGGBB")
    p.add_argument("--json", action="store_true", help="print JSON lines (log, result, error)")


def run_handoff_command(args, rep) -> dict:
    """Write the fine-tuning inputs of a reviewed findclass run (:func:`write_handoff`) and report them."""
    from core.findclass.handoff import write_handoff

    res = write_handoff(args.candidates, args.output_dir, args.class_name, base_model=args.base_model,
                        colour=args.colour)
    c = res["counts"]
    cmd = (f"python -m core finetune OUT.srmf --base-model {res['base_model']} --sources {res['sources']} "
           f"--classes {res['classes']}")
    rep.log(f"{c['examples']} example polygon(s) and {c['accepted']} accepted candidate(s) label the class "
            f"{args.class_name!r}; {c['rejected']} rejected and {c['pending']} pending candidate(s) left out")
    rep.result({**res, "finetune_command": cmd},
               text=f"Wrote {res['labels']}, {res['sources']}, {res['classes']} and {res['base_model']}\n"
                    f"Next (add labels of the other classes to sources.json first): {cmd}")
    return res
