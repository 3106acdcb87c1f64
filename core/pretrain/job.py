"""The ``pretrain`` command: unlabelled rasters → a ``.srmf`` whose encoder is self-supervised-pretrained.

Steps: the starting network (the embedded model's architecture with the ImageNet encoder, or a given
model's encoder), the raster pool (:mod:`core.pretrain.views`), then SimCLR steps — NT-Xent (temperature
0.5) on the projections of two views of each window (:func:`core.losses.nt_xent`) — and, for ``grass``
after the warm-up, gradient-guided steps (:mod:`core.pretrain.grass`): only the crops of the regions
around the loss gradient's peak are trained on. AdamW on the encoder and the projection head, a linear
warm-up over the first 5 % of the budget then a cosine decay (by iterations, or by the clock with
``minutes``). Every step draws its windows and views from generators seeded by (seed, step), so a run
resumed from its checkpoint (``OUTPUT.work/checkpoint.safetensors``: safetensors + JSON, never a pickle)
continues exactly where the killed one would have gone (with an iteration budget).

The output is a complete model file: the pretrained encoder, the architecture's decode head freshly
initialised and flagged untrained (``provenance.untrained_head``), the starting model's classes, text bank
and input statistics, and a ``pretraining`` block in the header (method, steps, time, rasters, loss curve).
``finetune --base-model`` trains a fresh head on it; ``segment`` refuses it.
"""
from __future__ import annotations

import datetime as _dt
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence
import numpy as np
import torch
from torch import nn
from core.errors import Cancelled, InputError
from core.pretrain.config import PretrainConfig

LR_WARMUP_SHARE = 0.05  # the learning rate rises linearly over the first 5 % of the budget


def pretrain(output, *, rasters: Sequence[str], config: PretrainConfig, base_model=None,
             bands: Optional[Sequence[int]] = None, device: str = "auto", resume: bool = False,
             overwrite: bool = False, reporter=None, stop_after: Optional[int] = None,
             keep_work_dir: bool = False) -> dict:
    """Pretrain an encoder on unlabelled rasters and write it as a model file.

    Args:
        output: the ``.srmf`` to write. rasters: raster files (any GDAL raster; nodata-aware).
        config: :class:`PretrainConfig`. base_model: a model file whose encoder to start from (default:
            the embedded model's architecture with the ImageNet encoder). bands: 1-based raster bands in the
            model's order (default: by colour interpretation; a 1-band raster is replicated).
        resume: continue a killed run from ``OUTPUT.work/checkpoint.safetensors``.
        stop_after: raise Cancelled after this many steps, with the checkpoint written (tests).
        keep_work_dir: keep ``OUTPUT.work/`` (its last checkpoint holds the projection head: the evaluation's
            mechanism check reads it).

    Returns:
        The result dict: output, method, iterations, gs_iterations, seconds, first and last loss, device.

    Raises:
        InputError: a bad recipe, output, base model or raster (see :class:`PretrainConfig` and
            :class:`core.pretrain.views.RasterPool`), before anything is written; a checkpoint of another
            recipe with ``resume``. Cancelled: SIGTERM/Ctrl-C or ``stop_after`` (the checkpoint is kept).
    """
    from core.device import resolve_device
    from core.geo.raster import check_output_path
    from core.protocol import Reporter
    from core.pretrain.views import RasterPool

    rep = reporter or Reporter()
    config.validate()
    out = Path(output)
    if out.suffix.lower() != ".srmf":
        raise InputError(f"The output model {out} must end in .srmf")
    if not resume:
        check_output_path(out, overwrite, "output model")
    dev = resolve_device(device)
    model, header, start_note = starting_model(base_model, config.seed)
    pool = RasterPool(list(rasters), header, bands, config.patch_size, config.view, config.min_valid, log=rep.log)
    run = _Run(model, pool, config, dev, out.with_name(out.name + ".work"), rep)
    rep.log(f"pretraining ({config.method}) from {start_note} on {len(pool.rasters)} raster(s), device {dev}, "
            f"batch {config.batch_size} x 2 views of {config.view} px from windows of {config.patch_size} px")
    existed = run.work.exists()
    if resume:
        run.restore()
    try:
        run.loop(stop_after)
    except BaseException:
        run.tidy(existed)
        raise
    header = pretrained_header(header, config, run, [str(p) for p in rasters], start_note, dev)
    from core.model.modelfile import save_model

    save_model(out, model, header)
    if not keep_work_dir:
        shutil.rmtree(run.work, ignore_errors=True)
    result = {"output": str(out), **header["pretraining"]}
    result.pop("loss_curve", None)
    rep.result(result, text=f"Wrote {out}: {config.method} pretraining, {run.step} steps "
                            f"({run.state['gs_steps']} gradient-guided) in {run.seconds():.0f} s, loss "
                            f"{run.state['first_loss']:.4f} -> {run.recent_loss():.4f}")
    return result


def starting_model(base_model, seed: int):
    """``(SRMFNet, header, note)``: the network pretraining starts from — ``base_model``'s architecture and
    encoder (a path or LoadedModel), or, by default, the embedded model's architecture with the ImageNet
    encoder — its decode head freshly initialised (seeded), and the header its classes, text bank and input
    come from. Raises ModelFileError: an unreadable base model."""
    from core.model.backbones import build_encoder
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model
    from core.model.network import build_from_config

    lm = base_model if hasattr(base_model, "header") else load_model(base_model or DEFAULT_MODEL_PATH)
    header = {k: v for k, v in lm.header.items() if k not in ("metrics", "provenance", "pretraining")}
    arch = header["architecture"]
    torch.manual_seed(seed)
    bank = lm.model.head.text_bank if lm.model.head.uses_text_bank else None
    model = build_from_config(arch, len(header["classes"]), bank, in_bands=len(header["input"]["bands"]))
    if base_model is None:
        encoder, _ = build_encoder(arch["backbone"], "imagenet")
        note = f"the ImageNet {arch['backbone']} encoder"
    else:
        encoder = lm.model.encoder
        note = f"the encoder of {Path(str(lm.path)).name}"
    model.encoder.load_state_dict(encoder.state_dict())
    return model, header, note


class _Run:
    """The pretraining loop's state: encoder + projection head, AdamW, step, clock, losses, checkpoints."""

    def __init__(self, model, pool, config: PretrainConfig, device, work: Path, rep):
        from core.pretrain.grass import ProjectionHead

        self.model, self.pool, self.config, self.device, self.work, self.rep = model, pool, config, device, work, rep
        torch.manual_seed(config.seed)
        self.net = nn.ModuleDict({"encoder": model.encoder, "projector": ProjectionHead(model.encoder.out_channels[-1])})
        self.net.to(device).train()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.state = {"step": 0, "seconds": 0.0, "first_loss": None, "gs_steps": 0, "losses": [], "curve": [],
                      "recipe": _recipe_key(config, pool)}
        self.t0 = time.perf_counter()
        self.ckpt = work / "checkpoint.safetensors"

    def seconds(self) -> float:
        return self.state["seconds"] + (time.perf_counter() - self.t0)

    def recent_loss(self) -> float:
        tail = self.state["losses"][-self.config.log_interval:]
        return float(np.mean(tail)) if tail else float("nan")

    def restore(self) -> None:
        """Load the checkpoint (``--resume``). Raises InputError: none, or one of another recipe or pool."""
        from core.checkpoint import load_checkpoint

        state = load_checkpoint(self.ckpt, self.net, self.optimizer)
        if state.get("recipe") != self.state["recipe"]:
            raise InputError(f"--resume: the checkpoint {self.ckpt} is of another recipe or raster pool; run "
                             "without --resume (and --overwrite) to start again")
        self.state = state
        self.step = int(state["step"])
        self.t0 = time.perf_counter()
        self.rep.log(f"resumed at step {self.step} ({state['seconds']:.0f} s of training done)")

    def done(self) -> bool:
        c = self.config
        return (c.iterations is not None and self.step >= c.iterations) or \
            (c.minutes is not None and self.seconds() >= 60.0 * c.minutes)

    def loop(self, stop_after: Optional[int]) -> None:
        from core.finetune.loop import tune_cpu_allocator

        if self.device.type == "cpu":
            tune_cpu_allocator()
        while self.step == 0 or not self.done():  # at least one step, however small the clock budget
            gs = not self.config.in_warmup(self.step, self.seconds())
            loss = self.one_step(gs)
            self.record(loss, gs)
            if self.step % self.config.checkpoint_interval == 0 or self.done():
                self.checkpoint()
            if stop_after is not None and self.step >= stop_after:
                raise Cancelled(f"stopped after step {self.step} (stop_after)")
        self.rep.close_progress()

    def one_step(self, gs: bool) -> float:
        """One optimiser step (an ID step, or a GS step when ``gs``); returns the loss trained on."""
        from core.losses import nt_xent
        from core.pretrain.grass import crop_and_resize, gradient_guided_boxes
        from core.pretrain.views import views_of

        c = self.config
        rng = np.random.default_rng([c.seed, self.step])
        torch.manual_seed(c.seed * 1_000_003 + self.step)
        v1, v2, _ = views_of(self.pool, rng, c.batch_size, c.view)
        x1, x2 = v1.images.to(self.device), v2.images.to(self.device)
        loss_fn = lambda a, b: nt_xent(a, b, c.temperature)  # noqa: E731
        if gs:
            b1, b2, *_ = gradient_guided_boxes(self.net["encoder"], self.net["projector"], x1, x2, loss_fn,
                                               c.cam_threshold, c.cam_sign, c.view)
            x1, x2 = crop_and_resize(x1, b1, c.view), crop_and_resize(x2, b2, c.view)
        for g in self.optimizer.param_groups:
            g["lr"] = c.lr * lr_factor(c.progress(self.step, self.seconds()))
        z = self.net["projector"](self.net["encoder"](torch.cat([x1, x2]))[-1])
        loss = loss_fn(z[: len(x1)], z[len(x1):])
        if not torch.isfinite(loss):
            raise InputError(f"the contrastive loss is not finite at step {self.step}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def record(self, loss: float, gs: bool) -> None:
        c, st = self.config, self.state
        self.step += 1
        st["step"] = self.step
        st["losses"].append(loss)
        st["gs_steps"] += int(gs)
        if st["first_loss"] is None:
            st["first_loss"] = loss
        self.rep.progress(c.progress(self.step, self.seconds()), "pretraining")
        if self.step % c.log_interval == 0 or self.done():
            recent = self.recent_loss()
            st["curve"].append([self.step, round(recent, 5)])
            self.rep.metrics({"iteration": self.step, "loss": recent, "stage": "gs" if gs else "id",
                              "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(self.seconds(), 1)},
                             text=f"step {self.step}{'/' + str(c.iterations) if c.iterations else ''} "
                                  f"({'gradient-guided' if gs else 'warm-up'}): loss {recent:.4f}")

    def checkpoint(self) -> None:
        from core.checkpoint import save_checkpoint

        self.state["seconds"] = self.seconds()
        self.t0 = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.ckpt, self.net, self.optimizer, self.state)

    def tidy(self, existed: bool) -> None:
        """After a failure or a cancel: keep a checkpoint (and say how to go on), else remove what this run made."""
        if self.ckpt.exists():
            self.rep.log(f"the last checkpoint is kept in {self.work}: run the same command with --resume to continue")
        elif not existed and self.work.is_dir() and not any(self.work.iterdir()):
            shutil.rmtree(self.work, ignore_errors=True)


def lr_factor(progress: float) -> float:
    """The learning-rate multiplier at a share ``progress`` of the budget: linear warm-up over the first
    :data:`LR_WARMUP_SHARE`, then a cosine decay to 0 (SimCLR's schedule)."""
    if progress < LR_WARMUP_SHARE:
        return max(progress / LR_WARMUP_SHARE, 1e-3)
    t = (progress - LR_WARMUP_SHARE) / (1.0 - LR_WARMUP_SHARE)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _recipe_key(config: PretrainConfig, pool) -> dict:
    """What a resumed run must share with its checkpoint: the recipe but its budget, and the rasters."""
    rec = {k: v for k, v in asdict(config).items() if k not in ("iterations", "minutes", "checkpoint_interval",
                                                                "log_interval")}
    return {**rec, "rasters": [r.path for r in pool.rasters]}


def pretrained_header(header: dict, config: PretrainConfig, run: _Run, rasters, start_note: str, dev) -> dict:
    """The output model's header: the starting header plus the ``pretraining`` block and the untrained-head flag."""
    block = {"method": config.method, "iterations": run.step, "gs_iterations": run.state["gs_steps"],
             "warmup_iterations": run.step - run.state["gs_steps"], "seconds": round(run.seconds(), 1),
             "rasters": list(rasters), "started_from": start_note, "batch_size": config.batch_size,
             "view": config.view, "patch": config.patch_size, "temperature": config.temperature,
             "cam_threshold": config.cam_threshold, "cam_sign": config.cam_sign, "lr": config.lr,
             "seed": config.seed, "device": str(dev), "first_loss": run.state["first_loss"],
             "last_loss": run.recent_loss(), "loss_curve": run.state["curve"],
             "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    provenance = {"untrained": False, "untrained_head": True,
                  "note": f"Self-supervised pretrained encoder ({config.method}); the decode head is untrained: "
                          "fine-tune the model (finetune --base-model) before segmenting with it."}
    return {**header, "pretraining": block, "provenance": provenance, "metrics": {}}
