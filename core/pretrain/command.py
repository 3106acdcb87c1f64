"""``python -m core pretrain``: its arguments and the report (torch-free until the job runs)."""
from __future__ import annotations

from core.pretrain.config import CAM_SIGNS, METHODS, PretrainConfig


def add_pretrain_arguments(p) -> None:
    """Arguments of ``python -m core pretrain OUT.srmf --raster A.tif [...]``; defaults are
    :class:`PretrainConfig`'s."""
    D = PretrainConfig()
    p.add_argument("output", help="the model file to write (.srmf): the pretrained encoder, an untrained head")
    p.add_argument("--raster", action="append", default=[], help="unlabelled raster (repeat for several)")
    p.add_argument("--bands", default=None, help="the rasters' bands in the model's band order, e.g. 3,2,1")
    p.add_argument("--method", default=D.method, choices=METHODS,
                   help="simclr (instance discrimination; the default: GraSS did not beat it in make eval-pretrain) or "
                        "grass (a SimCLR warm-up, then gradient-guided sampling)")
    p.add_argument("--iterations", type=int, default=None, help="optimiser steps")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (with or instead of --iterations)")
    p.add_argument("--warmup-iterations", type=int, default=None,
                   help="GraSS's SimCLR warm-up steps before gradient-guided sampling (default: half the budget)")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="windows per step (two views each; at least 2)")
    p.add_argument("--view", type=int, default=D.view, help="view side in pixels (a multiple of 32)")
    p.add_argument("--patch", type=int, default=None, help="side of the raster windows the views are cut from "
                                                           "(default: twice the view)")
    p.add_argument("--temperature", type=float, default=D.temperature, help="NT-Xent temperature")
    p.add_argument("--cam-threshold", type=float, default=D.cam_threshold,
                   help="region threshold, as a share of the gradient map's range above its minimum")
    p.add_argument("--cam-sign", default=D.cam_sign, choices=CAM_SIGNS,
                   help="loss: the map of dL/dF (the reference's); negative: of -dL/dF")
    p.add_argument("--lr", type=float, default=D.lr, help="AdamW learning rate (cosine decay)")
    p.add_argument("--min-valid", type=float, default=D.min_valid, help="least share of valid pixels in a window")
    p.add_argument("--checkpoint-interval", type=int, default=D.checkpoint_interval, help="checkpoint every N steps")
    p.add_argument("--base-model", default=None,
                   help="model whose encoder to start from (default: the embedded model's architecture, ImageNet encoder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, log, metrics, result, error)")


def config_from_args(args) -> PretrainConfig:
    """The :class:`PretrainConfig` of parsed ``pretrain`` arguments (not yet validated)."""
    return PretrainConfig(method=args.method, iterations=args.iterations, minutes=args.minutes,
                          warmup_iterations=args.warmup_iterations, batch_size=args.batch_size, view=args.view,
                          patch=args.patch, temperature=args.temperature, cam_threshold=args.cam_threshold,
                          cam_sign=args.cam_sign, lr=args.lr, min_valid=args.min_valid,
                          checkpoint_interval=args.checkpoint_interval, seed=args.seed)


def run_pretrain_command(args, rep) -> dict:
    """``python -m core pretrain``: check the recipe, then :func:`core.pretrain.job.pretrain`.

    Raises:
        InputError: a bad argument, output, base model or raster, before anything is written.
    """
    from core.geo.raster import parse_bands
    from core.pretrain.job import pretrain

    config = config_from_args(args)
    config.validate()  # before torch and the rasters are touched
    return pretrain(args.output, rasters=args.raster, config=config, base_model=args.base_model,
                    bands=parse_bands(args.bands), device=args.device, resume=args.resume,
                    overwrite=args.overwrite, reporter=rep)
