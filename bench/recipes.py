"""Reproducible training recipes on the real Dubai tiles: the embedded default model and the ablation.

``python -m bench.recipes default [--output resources/models/default.srmf] [--iterations N]
[--minutes M] [--eval-interval N] [--device D] [--recipe NAME] [--all-tiles] [--resume]`` — ``make train-default``
(``--all-tiles``: every tile trained on, none held out, the last iteration's model written).
``python -m bench.recipes ablation [--iterations N] [--device D]`` — ``make ablation``: the same budget
four ways (plain SegFormer head with random crops, + MARS, + MARS + SRR-TA, full SRMF with the text
bank), each evaluated on the validation tile, per-class table printed.

Data: the Dubai aerial set in ``../shared/data/dubai_hitl_aerial`` (SOURCES.md, section 5), 5 classes
(building, land, road, vegetation, water; unlabeled and black → ignore). Without ``--all-tiles``
(``make train-default``): training tiles 1, 2, 5, 6, 7, 8, the whole of tile 3 held out for validation;
with it all seven tiles and the recipe's cross-validated figures written into the header
(``tile_7/image_part_008``, whose label is known to be incomplete, is always left out of training).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VAL_TILE = "tile_3"
TRAIN_TILES = ["tile_1", "tile_2", "tile_5", "tile_6", "tile_7", "tile_8"]
ALL_TILES = sorted(TRAIN_TILES + [VAL_TILE])
DUBAI_GSD_M = 0.8  # estimated in SOURCES.md (football pitch in tile_8/image_part_003)


#: The training recipes the leave-one-tile-out study compares (bench/cv.py), by name: overrides of
#: :func:`default_config` plus the architecture's ``text_fusion`` (the text bank) and ``backbone``.
RECIPES = {
    "flip": dict(augment="flip"),  # SRMF as published: MARS + SRR-TA + text bank, random flips
    "d4": dict(augment="d4"),
    "photometric": dict(augment="photometric"),
    # A larger ImageNet backbone (about twice Lite0's compute per pixel), SRMF recipe otherwise.
    "lite2": dict(augment="flip", backbone="efficientnet_lite2"),
    # The plain SegFormer head: random crops, no MARS, no SRR-TA, no text bank (SRMF's three parts off).
    "plain-head": dict(augment="flip", mars=False, srr=False, text_fusion=False),
}
#: The recipe of the shipped default model (``make train-default`` reproduces it: 6 tiles, tile 3 held out).
#: The recipe study (README, "Recipe study") did not show a better one on imagery the candidates never saw,
#: so it stays.
DEFAULT_RECIPE = "flip"
DEFAULT_ITERATIONS = 3000


def recipe(name: str, **config_over):
    """``(TrainConfig, architecture dict)`` of one of :data:`RECIPES`, ``config_over`` on top (iterations,
    seed, ...). Raises KeyError: an unknown recipe."""
    over = dict(RECIPES[name])
    arch = {"backbone": over.pop("backbone", "efficientnet_lite0"), "text_fusion": over.pop("text_fusion", True),
            "encoder_weights": "imagenet", "text_encoder": "minilm", "gsd_m": DUBAI_GSD_M}
    return default_config(**{**over, **config_over}), arch


def default_config(**over):
    """The default model's recipe: the paper's optimiser and schedule shape, at a CPU-sized crop.

    Crop 256 px (MARS windows 512/768/1024 resized to 256) because the Dubai images are 509–2149 px:
    at 512 the ×3/×4 context windows would nearly always be clipped to the image.
    """
    from core.finetune.config import TrainConfig

    base = dict(iterations=3000, batch_size=8, lr=2e-4, crop=256, eval_interval=200, checkpoint_interval=50,
                seed=0, mars=True, srr=True, srr_k=4, warmup_iterations=100, val_window=512, val_stride=341)
    base.update(over)
    return TrainConfig(**base)


def _dubai(tiles, exclude_bad=True):
    from core.finetune.sources import load_dubai

    return load_dubai(tiles, exclude_bad=exclude_bad)


def train_default(output: Path, config, device: str = "auto", reporter=None, arch=None, train=None, val=None,
                  resume: bool = False) -> dict:
    """Train the embedded default model (EfficientNet-Lite0 ImageNet + MiniLM text bank) on Dubai: on
    :data:`TRAIN_TILES`, validated on :data:`VAL_TILE`, unless ``train`` / ``val`` images are given;
    ``resume`` continues a killed run from ``OUTPUT.work/``."""
    from core.classtable import dubai_class_table
    from core.finetune.job import finetune
    from core.model.modelfile import DEFAULT_INPUT
    from core.protocol import Reporter

    rep = reporter or Reporter()
    table = dubai_class_table()
    classes = [dict(c) for c in table.to_header()]
    if train is None:
        train, val = _dubai(TRAIN_TILES), _dubai([VAL_TILE], exclude_bad=False)
        described = (f"train {', '.join(TRAIN_TILES)} ({len(train)} images, tile_7/image_part_008 excluded); "
                     f"validation: whole {VAL_TILE}")
    elif not val:
        described = (f"train {', '.join(sorted({im.group for im in train}))} ({len(train)} images); no validation "
                     f"(every tile is trained on; the budget of {config.iterations} iterations was fixed by the "
                     f"leave-one-tile-out cross-validation, bench/cv.py)")
    else:
        described = (f"train {', '.join(sorted({im.group for im in train}))} ({len(train)} images); validation: "
                     f"whole {', '.join(sorted({im.group for im in val}))}")
    arch = arch or {"backbone": "efficientnet_lite0", "text_fusion": True, "encoder_weights": "imagenet",
                    "text_encoder": "minilm", "gsd_m": DUBAI_GSD_M}
    base = _BaseStub({"input": DEFAULT_INPUT, "classes": classes})
    return finetune(output, images=train, classes=classes, base_model=base, config=config, device=device,
                    val_images=val, overwrite=True, reporter=rep, architecture=arch, resume=resume,
                    data_description=[f"Dubai aerial (Humans in the Loop / MBRSC, CC0): {described}"])


def attach_cv_metrics(path: Path, recipe_name: str, iterations: int, record=None) -> dict:
    """Write the cross-validated figures of the recipe (:func:`bench.cv.cv_estimate`) into the header of the
    model at ``path`` as its ``metrics`` (the model was trained on every tile: nothing is left to validate it
    on, so the estimate is what travels with it); returns them.

    Raises:
        ValueError: the record has no finished run of that recipe at that budget (the model is left as it is).
    """
    from bench.cv import RECORD, cv_estimate
    from core.model.modelfile import load_model, save_model

    metrics = cv_estimate(recipe_name, iterations, record or RECORD)
    lm = load_model(path)
    header = {k: v for k, v in lm.header.items() if k not in ("format", "format_version")}
    header["metrics"] = metrics
    tmp = path.with_name(path.name + ".partial")
    save_model(tmp, lm.model, header)
    tmp.replace(path)
    return metrics


class _BaseStub:
    """Stands in for a base model when the network is built from scratch (only the header is read)."""

    def __init__(self, header):
        self.header = header
        self.path = Path("none")
        self.classes = header["classes"]


ABLATION = [
    ("SegFormer head, random crops", dict(text_fusion=False), dict(mars=False, srr=False)),
    ("+ MARS", dict(text_fusion=False), dict(mars=True, srr=False)),
    ("+ MARS + SRR-TA", dict(text_fusion=False), dict(mars=True, srr=True)),
    ("SRMF (+ text bank)", dict(text_fusion=True), dict(mars=True, srr=True)),
]


def ablation(iterations: int, device: str, out_dir: Path, reporter=None, minutes=None) -> list:
    """Train the four variants at the same budget and evaluate each on the validation tile."""
    from core.protocol import Reporter

    rep = reporter or Reporter()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, arch_over, cfg_over) in enumerate(ABLATION):
        arch = {"backbone": "efficientnet_lite0", "encoder_weights": "imagenet", "text_encoder": "minilm",
                "gsd_m": DUBAI_GSD_M, **arch_over}
        config = default_config(iterations=iterations, eval_interval=max(1, iterations // 4),
                                checkpoint_interval=max(1, iterations // 4),
                                max_seconds=None if minutes is None else minutes * 60, **cfg_over)
        rep.log(f"ablation {i + 1}/4: {name}")
        res = train_default(out_dir / f"ablation_{i + 1}.srmf", config, device, rep, arch)
        rows.append({"variant": name, "miou": res["metrics"]["miou"], "per_class_iou": res["metrics"]["per_class_iou"],
                     "iterations": res["iterations"], "seconds": res["seconds"]})
    return rows


def format_ablation(rows) -> str:
    names = list(rows[0]["per_class_iou"])
    head = "| variant | " + " | ".join(names) + " | mIoU | iterations | time (s) |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for r in rows:
        vals = " | ".join("n/a" if r["per_class_iou"][n] is None else f"{r['per_class_iou'][n]:.3f}" for n in names)
        lines.append(f"| {r['variant']} | {vals} | {r['miou']:.3f} | {r['iterations']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from core.errors import SRMFError
    from core.model.modelfile import DEFAULT_MODEL_PATH
    from core.protocol import Reporter

    p = argparse.ArgumentParser(prog="python -m bench.recipes")
    sub = p.add_subparsers(dest="recipe", required=True)
    d = sub.add_parser("default")
    d.add_argument("--output", default=str(DEFAULT_MODEL_PATH))
    d.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    d.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    d.add_argument("--eval-interval", type=int, default=None,
                   help="validate every N iterations (default 200; the best validation's model is written)")
    d.add_argument("--device", default="auto")
    d.add_argument("--recipe", dest="train_recipe", default=DEFAULT_RECIPE, choices=tuple(RECIPES),
                   help=f"the training recipe (default {DEFAULT_RECIPE}: the recipe study's verdict)")
    d.add_argument("--all-tiles", action="store_true",
                   help="train on every Dubai tile, no validation: the last iteration's model is written")
    d.add_argument("--resume", action="store_true", help="continue a stopped run from OUTPUT.work/")
    d.add_argument("--no-cv-metrics", action="store_true",
                   help="with --all-tiles: do not write the recipe's cross-validated figures into the header")
    d.add_argument("--json", action="store_true")
    a = sub.add_parser("ablation")
    a.add_argument("--iterations", type=int, default=300)
    a.add_argument("--minutes", type=float, default=None, help="wall-clock budget per variant")
    a.add_argument("--device", default="auto")
    a.add_argument("--out-dir", default="ablation-output")
    a.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rep = Reporter(json_mode=args.json)
    try:
        if args.recipe == "default":
            over = {} if args.eval_interval is None else {"eval_interval": args.eval_interval}
            cfg, arch = recipe(args.train_recipe, iterations=args.iterations,
                               max_seconds=None if args.minutes is None else args.minutes * 60, **over)
            train, val = (_dubai(ALL_TILES), []) if args.all_tiles else (None, None)
            res = train_default(Path(args.output), cfg, args.device, rep, arch, train=train, val=val,
                                resume=args.resume)
            if args.all_tiles and not args.no_cv_metrics:
                try:
                    res["metrics"] = attach_cv_metrics(Path(args.output), args.train_recipe, args.iterations)
                except ValueError as exc:
                    rep.warning(f"{exc}: the model carries no cross-validated figures")
            rep.result(res)
        else:
            rows = ablation(args.iterations, args.device, Path(args.out_dir), rep, args.minutes)
            table = format_ablation(rows)
            (Path(args.out_dir) / "ablation.json").write_text(json.dumps(rows, indent=2))
            rep.result({"rows": rows, "table": table}, text=table)
    except SRMFError as exc:
        rep.error(exc, exc.exit_code)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
