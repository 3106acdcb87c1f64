"""``python -m core evaluate``: its arguments and its report (torch-free until the job runs)."""
from __future__ import annotations



# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_evaluate_arguments(parser) -> None:
    """Add the ``evaluate`` arguments to an argparse (sub)parser."""
    parser.add_argument("prediction", help="predicted class raster (uint8 class ids, 255 = nodata); "
                                           "with --model, the image to segment first")
    parser.add_argument("reference", help="reference class raster, or polygon layer (with --reference-field)")
    parser.add_argument("--reference-field", default=None, help="class field of a polygon reference layer")
    parser.add_argument("--classes", default=None,
                        help="class table JSON {\"classes\": [{\"name\", \"colour\", \"prompt\", \"value\"}]} "
                             "(default: the model's, or the prediction's category names)")
    parser.add_argument("--model", default=None, help="segment PREDICTION (an image) with this model first")
    parser.add_argument("--device", default="auto", help="with --model: auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="with --model: auto, fp32 or bf16 (as segment's)")
    parser.add_argument("--bands", default=None, help="with --model: 1-based input bands in the model's order")
    parser.add_argument("--output-json", default=None, help="write the result as JSON")
    parser.add_argument("--output-csv", default=None,
                        help="write the per-class table as CSV (and the confusion matrix to NAME_confusion.csv)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--json", action="store_true", help="print JSON lines (progress, log, result, error)")


def run_evaluate_command(args, reporter) -> dict:
    """Run ``evaluate`` from parsed arguments (see :func:`add_evaluate_arguments`); reports the result."""
    from core.evaluate.job import evaluate_rasters
    from core.evaluate.report import format_table
    from core.geo.raster import parse_bands

    result = evaluate_rasters(args.prediction, args.reference, reference_field=args.reference_field,
                              classes=args.classes, model=args.model, output_json=args.output_json,
                              output_csv=args.output_csv, overwrite=args.overwrite, reporter=reporter,
                              device=getattr(args, "device", "auto"), precision=getattr(args, "precision", "auto"),
                              bands=parse_bands(getattr(args, "bands", None)))
    reporter.result(result, text=format_table(result))
    return result
