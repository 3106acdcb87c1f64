"""``python -m core finetune``: its arguments, their validation and the report (torch-free until the job runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence
from core.errors import InputError


# -- command line -------------------------------------------------------------------------------------
def add_finetune_arguments(p) -> None:
    """Arguments of ``python -m core finetune`` (names follow ArcGIS Pro's Train Deep Learning Model)."""
    p.add_argument("output", help="the model file to write (.srmf)")
    p.add_argument("--raster", action="append", default=[], help="training raster (repeat for several)")
    p.add_argument("--labels", action="append", default=[],
                   help="labels of the raster at the same position: a class raster, or a polygon layer with --label-field")
    p.add_argument("--label-field", default=None, help="class field of polygon labels (values or class names)")
    p.add_argument("--sources", default=None, help="JSON job file: a list of training sources (see core.finetune.sources.load_sources)")
    p.add_argument("--classes", default=None,
                   help='class table JSON {"classes": [{"name", "colour", "prompt", "value", "from"}]}; '
                        "default: the base model's classes, label value = class id")
    p.add_argument("--base-model", default=None, help="model to start from (default: the embedded default model)")
    p.add_argument("--iterations", type=int, default=2000, help="max iterations (optimiser steps)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per iteration")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps per iteration")
    p.add_argument("--lr", type=float, default=6e-5, help="learning rate (the head's is 10x)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: min(1500, iterations/10))")
    p.add_argument("--crop", type=int, default=512, help="training tile size in pixels")
    p.add_argument("--val-share", type=float, default=0.2, help="share of labelled pixels held out for validation")
    p.add_argument("--val-groups", default=None, help="comma-separated groups (tiles/rasters) to hold out")
    p.add_argument("--val-raster", action="append", default=[], help="separate validation raster(s)")
    p.add_argument("--val-labels", action="append", default=[], help="labels of the validation raster(s)")
    p.add_argument("--eval-interval", type=int, default=200, help="validate every N iterations")
    p.add_argument("--checkpoint-interval", type=int, default=200, help="checkpoint every N iterations")
    p.add_argument("--no-mars", action="store_true", help="class balancing off: no multi-scale anchored sampling")
    p.add_argument("--no-srr", action="store_true", help="class balancing off: no rare-region resampling (SRR-TA)")
    p.add_argument("--srr-k", type=int, default=4, help="rare-region crops per drawn image")
    p.add_argument("--contrastive-weight", type=float, default=0.0,
                   help="weight of the class-balanced contrastive (InfoNCE) loss on the fused features; 0 = off")
    p.add_argument("--contrastive-temperature", type=float, default=0.1,
                   help="temperature of the contrastive loss")
    p.add_argument("--contrastive-anchors", type=int, default=64,
                   help="contrastive anchors drawn per class present in a batch (at least 2)")
    p.add_argument("--contrastive-queue", type=int, default=0,
                   help="per-class memory queue of earlier anchors, for small batches (0 = none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, log, metrics, result, error)")


def _labels_are_vector(path: str) -> bool:
    from osgeo import gdal

    gdal.UseExceptions()
    try:
        ds = gdal.OpenEx(str(path), gdal.OF_VECTOR)
    except RuntimeError:
        return False
    return ds is not None and ds.GetLayerCount() > 0


def _sources_from_args(rasters: Sequence[str], labels: Sequence[str], field: Optional[str], what: str) -> List[dict]:
    if len(rasters) != len(labels):
        raise InputError(f"--{what}raster and --{what}labels must come in pairs: got {len(rasters)} raster(s) "
                         f"and {len(labels)} label layer(s)")
    sources = []
    for r, l in zip(rasters, labels):
        if not Path(l.split("|")[0]).exists():
            raise InputError(f"Label layer not found: {l}")
        if _labels_are_vector(l):
            if not field:
                raise InputError(f"{l} is a polygon layer: give its class field with --label-field")
            src = {"raster": r, "polygons": l.split("|")[0], "field": field}
            if "|layername=" in l:
                src["layer"] = l.split("|layername=", 1)[1].split("|")[0]
            sources.append(src)
        else:
            sources.append({"raster": r, "labels": l})
    return sources


def run_finetune_command(args, rep) -> dict:
    """``python -m core finetune``: parse, load data, train, report (see :func:`finetune`)."""
    from core.finetune.job import finetune
    from core.classtable import load_class_table
    from core.finetune.sources import load_sources
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model
    from core.geo.raster import check_output_path
    from core.finetune.config import TrainConfig

    out = Path(args.output)
    if not args.resume:
        check_output_path(out, args.overwrite, "output model")
    if args.crop < 64 or args.crop % 32:
        raise InputError(f"--crop must be a multiple of 32 pixels, at least 64 (got {args.crop})")
    for name in ("iterations", "batch_size", "accumulate", "eval_interval", "checkpoint_interval"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.batch_size % args.accumulate:
        raise InputError(f"--batch-size ({args.batch_size}) must be a multiple of --accumulate ({args.accumulate})")
    if not args.contrastive_weight >= 0:
        raise InputError(f"--contrastive-weight must be 0 (off) or positive (got {args.contrastive_weight})")
    if not args.contrastive_temperature > 0:
        raise InputError(f"--contrastive-temperature must be positive (got {args.contrastive_temperature})")
    if args.contrastive_anchors < 2:
        raise InputError(f"--contrastive-anchors must be at least 2 (got {args.contrastive_anchors})")
    if args.contrastive_queue < 0:
        raise InputError(f"--contrastive-queue must be 0 (none) or positive (got {args.contrastive_queue})")
    lm = load_model(args.base_model or DEFAULT_MODEL_PATH)
    if args.classes:
        cpath = Path(args.classes)
        if not cpath.is_file():
            raise InputError(f"Class table not found: {cpath}")
        try:
            doc = json.loads(cpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"Class table {cpath} is not valid JSON ({exc})") from exc
        raw = doc["classes"] if isinstance(doc, dict) and "classes" in doc else doc
        table = load_class_table(doc)
    else:
        raw = [{"name": c["name"], "colour": c.get("colour"), "prompt": c.get("prompt"), "value": int(c["id"])}
               for c in lm.classes]
        table = load_class_table({"classes": raw})
    sources = []
    if args.sources:
        try:
            sources = json.loads(Path(args.sources).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"--sources {args.sources}: {exc}") from exc
    sources += _sources_from_args(args.raster, args.labels, args.label_field, "")
    if not sources:
        raise InputError("No training data: give --raster and --labels (or --sources)")
    images = load_sources(sources, table)
    val_images = None
    if args.val_raster:
        val_images = load_sources(_sources_from_args(args.val_raster, args.val_labels, args.label_field, "val-"), table)
    config = TrainConfig(iterations=args.iterations, batch_size=args.batch_size, accumulate=args.accumulate,
                         lr=args.lr, warmup_iterations=args.warmup, crop=args.crop,
                         eval_interval=args.eval_interval, checkpoint_interval=args.checkpoint_interval,
                         seed=args.seed, mars=not args.no_mars, srr=not args.no_srr, srr_k=args.srr_k,
                         contrastive_weight=args.contrastive_weight,
                         contrastive_temperature=args.contrastive_temperature,
                         contrastive_anchors=args.contrastive_anchors, contrastive_queue=args.contrastive_queue)
    classes = [{**{k: v for k, v in c.items() if k in ("name", "colour", "prompt", "from")}} for c in raw]
    result = finetune(out, images=images, classes=classes, base_model=lm, config=config, device=args.device,
                      val_share=args.val_share,
                      val_groups=[g for g in args.val_groups.split(",") if g] if args.val_groups else None,
                      val_images=val_images, overwrite=args.overwrite, resume=args.resume, reporter=rep,
                      data_description=[json.dumps(s) for s in sources])
    miou = result["metrics"]["miou"]
    lines = [f"Wrote {result.get('output')} after {result['iterations']} iterations in {result['seconds']:.0f} s "
             f"on {result['device']}",
             f"validation ({result['validation']}): mIoU {miou:.4f} at iteration {result['best_iteration']}"
             if miou is not None else "no validation data: the last iteration's model was written"]
    for n, v in (result["metrics"]["per_class_iou"] or {}).items():
        lines.append(f"  {n:<20s} IoU {v if v is not None else 'n/a'}")
    rep.result(result, text="\n".join(lines))
    return result
