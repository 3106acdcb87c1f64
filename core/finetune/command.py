"""``python -m core finetune``: its arguments, their validation and the report (torch-free until the job runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence
from core.errors import InputError
from core.finetune.config import VAL_SHARE, TrainConfig


# -- command line -------------------------------------------------------------------------------------
def add_finetune_arguments(p) -> None:
    """Arguments of ``python -m core finetune`` (names follow ArcGIS Pro's Train Deep Learning Model);
    the recipe's defaults are :class:`TrainConfig`'s, stated there once."""
    D = TrainConfig()
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
    p.add_argument("--model-bands", default=None,
                   help="the new model's input bands by name, e.g. red,green,blue,nir (default: the base model's); "
                        "bands beyond the base model's widen its first convolution")
    p.add_argument("--bands", default=None,
                   help="the training rasters' bands in the model's band order, e.g. 1,2,3,4 (default: by colour "
                        "interpretation or band description)")
    p.add_argument("--iterations", type=int, default=D.iterations, help="max iterations (optimiser steps)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="samples per iteration")
    p.add_argument("--accumulate", type=int, default=D.accumulate, help="gradient accumulation steps per iteration")
    p.add_argument("--lr", type=float, default=D.lr, help=f"learning rate (the head's is {D.head_lr_mult:g}x)")
    p.add_argument("--warmup", type=int, default=D.warmup_iterations, help="warm-up iterations (default: min(1500, iterations/10))")
    p.add_argument("--crop", type=int, default=D.crop, help="training crop size in pixels")
    p.add_argument("--val-share", type=float, default=VAL_SHARE, help="share of labelled pixels held out for validation")
    p.add_argument("--val-groups", default=None, help="comma-separated groups (tiles/rasters) to hold out")
    p.add_argument("--val-raster", action="append", default=[], help="separate validation raster(s)")
    p.add_argument("--val-labels", action="append", default=[], help="labels of the validation raster(s)")
    p.add_argument("--eval-interval", type=int, default=D.eval_interval, help="validate every N iterations")
    p.add_argument("--checkpoint-interval", type=int, default=D.checkpoint_interval, help="checkpoint every N iterations")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decode head only: the encoder's weights and batch-norm statistics stay as they are")
    p.add_argument("--no-mars", action="store_true", help="class balancing off: no multi-scale anchored sampling")
    p.add_argument("--no-srr", action="store_true", help="class balancing off: no rare-region resampling (SRR-TA)")
    p.add_argument("--srr-k", type=int, default=D.srr_k, help="rare-region crops per drawn image")
    p.add_argument("--contrastive-weight", type=float, default=D.contrastive_weight,
                   help="weight of the class-balanced contrastive (InfoNCE) loss on the fused features; 0 = off")
    p.add_argument("--contrastive-temperature", type=float, default=D.contrastive_temperature,
                   help="temperature of the contrastive loss")
    p.add_argument("--contrastive-anchors", type=int, default=D.contrastive_anchors,
                   help="contrastive anchors drawn per class present in a batch (at least 2)")
    p.add_argument("--contrastive-queue", type=int, default=D.contrastive_queue,
                   help="per-class memory queue of earlier anchors, for small batches (0 = none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=D.precision, help="auto (bf16 autocast where native), fp32 or bf16")
    p.add_argument("--augment", default=D.augment,
                   help="flip (flips), d4 (+ quarter turns) or photometric (+ colour, gain, gamma, blur jitter)")
    p.add_argument("--seed", type=int, default=D.seed)
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
    """``python -m core finetune``: check the arguments, load the base model, the class table and the
    training data, train (see :func:`core.finetune.job.finetune`), report.

    Raises:
        InputError: a bad argument (:meth:`TrainConfig.validate`), class table or training source,
            before anything is written.
    """
    from core.finetune.job import finetune
    from core.finetune.sources import load_sources
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model
    from core.geo.raster import check_output_path, parse_bands

    out = Path(args.output)
    if not args.resume:
        check_output_path(out, args.overwrite, "output model")
    config = config_from_args(args)
    config.validate()
    lm = load_model(args.base_model or DEFAULT_MODEL_PATH)
    raw, table = _class_table(args.classes, lm)
    sources = _training_sources(args)
    model_bands = _model_bands(args.model_bands, lm)
    reading = {"bands": parse_bands(args.bands), "model_bands": model_bands}
    images = load_sources(sources, table, **reading)
    val_images = None
    if args.val_raster:
        val_images = load_sources(_sources_from_args(args.val_raster, args.val_labels, args.label_field, "val-"), table,
                                  **reading)
    for img in images + (val_images or []):
        for warning in img.source.get("warnings", ()):
            rep.warning(warning)
    classes = [{**{k: v for k, v in c.items() if k in ("name", "colour", "prompt", "from")}} for c in raw]
    result = finetune(out, images=images, classes=classes, base_model=lm, config=config, device=args.device,
                      val_share=args.val_share,
                      val_groups=[g for g in args.val_groups.split(",") if g] if args.val_groups else None,
                      val_images=val_images, overwrite=args.overwrite, resume=args.resume, reporter=rep,
                      data_description=[json.dumps(s) for s in sources], model_bands=list(model_bands))
    rep.result(result, text=_summary(result))
    return result


def _model_bands(text: Optional[str], lm) -> tuple:
    """The ``--model-bands`` names (checked: RGB first, known names), or the base model's bands."""
    if not text:
        return tuple(lm.header["input"]["bands"])
    from core.model.bands import check_band_names

    return tuple(check_band_names([t for t in text.split(",") if t.strip()]))


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``finetune`` arguments (not yet validated)."""
    return TrainConfig(iterations=args.iterations, batch_size=args.batch_size, accumulate=args.accumulate,
                       lr=args.lr, warmup_iterations=args.warmup, crop=args.crop,
                       eval_interval=args.eval_interval, checkpoint_interval=args.checkpoint_interval,
                       seed=args.seed, mars=not args.no_mars, srr=not args.no_srr, srr_k=args.srr_k,
                       contrastive_weight=args.contrastive_weight,
                       contrastive_temperature=args.contrastive_temperature,
                       contrastive_anchors=args.contrastive_anchors, contrastive_queue=args.contrastive_queue,
                       precision=getattr(args, "precision", TrainConfig.precision),
                       freeze_encoder=getattr(args, "freeze_encoder", False),
                       augment=getattr(args, "augment", TrainConfig.augment))


def _class_table(path: Optional[str], lm):
    """``(raw entries, ClassTable)`` of ``--classes`` (a JSON file), or of the base model's classes
    (label value = class id) when it is not given. Raises InputError: file missing or not JSON."""
    from core.classtable import load_class_table

    if path:
        cpath = Path(path)
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
    return raw, table


def _training_sources(args) -> List[dict]:
    """The training sources of ``--sources`` (a JSON list) followed by the ``--raster``/``--labels`` pairs.
    Raises InputError: unreadable ``--sources``, unpaired arguments, no source at all."""
    sources = []
    if args.sources:
        try:
            sources = json.loads(Path(args.sources).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"--sources {args.sources}: {exc}") from exc
    sources += _sources_from_args(args.raster, args.labels, args.label_field, "")
    if not sources:
        raise InputError("No training data: give --raster and --labels (or --sources)")
    return sources


def _summary(result: dict) -> str:
    """The text form of a fine-tune result: output, validation mIoU, the per-class IoU."""
    miou = result["metrics"]["miou"]
    lines = [f"Wrote {result.get('output')} after {result['iterations']} iterations in {result['seconds']:.0f} s "
             f"on {result['device']}",
             f"validation ({result['validation']}): mIoU {miou:.4f} at iteration {result['best_iteration']}"
             if miou is not None else "no validation data: the last iteration's model was written"]
    for n, v in (result["metrics"]["per_class_iou"] or {}).items():
        lines.append(f"  {n:<20s} IoU {v if v is not None else 'n/a'}")
    return "\n".join(lines)
