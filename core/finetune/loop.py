"""The SRMF training loop (fine-tuning issue, item 4) and its checkpoints.

Recipe (SRMF, arXiv 2504.19839, Sec. IV-A, following SegFormer's mmsegmentation schedule):
AdamW, lr 6e-5, weight decay 0.01, the head's learning rate × 10, no weight decay on normalisation
layers (and MiT's positional ``pos_block``), a linear warm-up (1500 iterations in the paper; capped at
a tenth of the run for short fine-tunes) then polynomial decay (power 1) to 0; cross-entropy with
ignore index 255 on logits upsampled to the crop; batches from the MARS + SRR-TA sampler
(:mod:`core.finetune.sampler`). Mixed precision (bf16, else fp16 with a gradient scaler) on CUDA, gradient
accumulation, validation by whole held-out images (split by tile or region, never by pixels) every
``eval_interval`` iterations, the best model by validation mIoU kept; checkpoints every
``checkpoint_interval`` iterations (safetensors + JSON: never a pickle) and exact ``resume``.

Determinism: every iteration draws its samples from a generator seeded by (seed, iteration, rank) and
seeds torch the same way, so a run is reproducible on the CPU and a resumed run continues exactly
where the killed one would have gone.

Several processes: under ``torchrun`` (RANK/WORLD_SIZE set) the model is wrapped in
DistributedDataParallel (NCCL + SyncBatchNorm on CUDA; gloo on the CPU, where SyncBatchNorm is not
available and each process keeps its own batch statistics); rank 0 validates and writes files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from core.execution import channels_last, precision_scope, prepare_model, resolve_precision
from core.errors import Cancelled, InputError
from core.checkpoint import load_checkpoint, load_checkpoint_extra, save_checkpoint
from core.finetune.config import TrainConfig, lr_factor, time_budget_factor
from core.finetune.distributed import DistInfo, _barrier
from core.metrics import confusion, iou_from_confusion
from core.classtable import IGNORE

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every iteration.

    PyTorch's CPU tensors above glibc's mmap threshold are mmap'ed and unmapped on each step, so every
    training iteration pays page faults for its activations (on the 2-core test machine: 87 s → 50 s for
    16 iterations of the default recipe with its validation, system time 65 s → 12 s). ``mallopt`` raises the mmap threshold
    to its 32 MiB maximum and stops heap trimming; RSS then stays at its peak between iterations.
    Returns False (and does nothing) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        ok &= libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
        ok &= libc.mallopt(m_top_pad, 1024 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> List[dict]:
    """AdamW parameter groups: head lr × ``head_lr_mult``; no weight decay on normalisation layers'
    parameters and on MiT's ``pos_block`` (SegFormer's ``paramwise_cfg``)."""
    no_decay = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _NORM_TYPES) or "pos_block" in mod_name:
            for p_name, _ in mod.named_parameters(recurse=False):
                no_decay.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.split(".", 1)[0] == "head" or ".head." in name, name in no_decay)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, nd), params in sorted(groups.items()):
        out.append({"params": params, "lr": lr * (head_lr_mult if is_head else 1.0),
                    "weight_decay": 0.0 if nd else weight_decay,
                    "name": f"{'head' if is_head else 'backbone'}{'-no_decay' if nd else ''}"})
    for g in out:
        g["initial_lr"] = g["lr"]
    return out


def freeze_encoder(model: nn.Module) -> None:
    """Keep ``model.encoder`` as it is while the rest trains (``--freeze-encoder``, the frozen-backbone
    protocol of self-supervised evaluation): no gradient for its parameters (so the optimiser leaves them
    out) and evaluation mode for good, its batch-norm statistics included — ``model.train()`` leaves it in
    evaluation mode."""
    enc = model.encoder
    for p in enc.parameters():
        p.requires_grad_(False)

    def stay_in_eval(mode: bool = True, _enc=enc):
        return nn.Module.train(_enc, False)

    enc.train = stay_in_eval
    enc.eval()


@torch.no_grad()
def validate(model: nn.Module, images: Sequence, num_classes: int, mean, std, device: torch.device,
             window: int, stride: int, batch_size: int = 4, precision="fp32") -> np.ndarray:
    """Slide inference (as :mod:`core.windows`) on whole validation images → confusion matrix (K, K).

    ``images``: objects with ``image`` float32 (3, H, W) in the model's value range and ``label``
    uint8 (H, W) (255 = ignore). ``precision``: as :class:`core.windows.WindowPredictor`'s.
    """
    from core.windows import SlidePlan, WindowPredictor, slide_inference_in_memory

    was_training = model.training
    model.eval()
    predictor = WindowPredictor(model, device, precision)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for item in images:
        img = np.asarray(item.image)
        plan = SlidePlan(img.shape[1], img.shape[2], window, min(stride, window))
        _, cls = slide_inference_in_memory(img, None, plan, predictor, num_classes, mean, std, batch_size)
        cm += confusion(cls.cpu().numpy(), np.asarray(item.label), num_classes)
    model.train(was_training)
    return cm


class SampleBatcher:
    """Batches of ``n`` samples from a :class:`core.finetune.sampler.TrainingSampler`, drawn with the
    generator it is given (seeded per iteration by the loop, so a resumed run draws the same batches).

    Each call draws images (uniformly) and takes all their MARS/SRR-TA samples until there are ``n``,
    then keeps a random ``n`` of them: batches mix the scales of one or a few images, as the paper's.
    """

    def __init__(self, sampler, max_empty_draws: int = 200):
        self.sampler = sampler
        self.max_empty_draws = max_empty_draws
        if not sampler.images:
            raise InputError("No training image has a labelled pixel: nothing to learn from")

    def batch(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """float32 (n, 3, crop, crop) images in the model's value range, uint8 (n, crop, crop) labels."""
        samples, empty = [], 0
        while len(samples) < n:
            got = self.sampler.draw(int(rng.integers(len(self.sampler.images))), int(rng.integers(1 << 31)))
            empty = 0 if got else empty + 1
            if empty >= self.max_empty_draws:
                raise InputError("The sampler gives no training crop from these labels")
            samples.extend(got)
        pick = rng.permutation(len(samples))[:n]
        images = np.stack([np.asarray(samples[i].image, dtype=np.float32) for i in pick])
        labels = np.stack([np.asarray(samples[i].label, dtype=np.uint8) for i in pick])
        return images, labels


# -- the loop ------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    iterations: int
    best_iteration: Optional[int]
    best_miou: Optional[float]
    per_class_iou: Dict[str, Optional[float]]
    history: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None


def train_loop(model: nn.Module, class_names: Sequence[str], sampler, val_images: Sequence, config: TrainConfig,
               mean, std, device: torch.device, work_dir: Path, on_best: Callable[[nn.Module, dict], None],
               reporter=None, resume: bool = False, dist_info: Optional[DistInfo] = None,
               stop_after: Optional[int] = None) -> TrainResult:
    """Train ``model`` in place.

    Args:
        model: the network (train mode is set here). class_names: K names, for the metrics.
        sampler: ``sampler.batch(rng, n) -> (images float32 (n, 3, crop, crop) in the model's value
            range, labels uint8 (n, crop, crop))`` (:class:`core.finetune.sampler.TrainingSampler`).
        val_images: held-out images (``image`` (3, H, W), ``label`` (H, W)); may be empty.
        mean, std: the model's normalisation. device: where to train.
        work_dir: checkpoints go to ``work_dir / "checkpoint.safetensors"``.
        on_best: called on rank 0 with (model, metrics) when validation mIoU improves (and at the end
            when there is no validation data).
        resume: continue from the checkpoint in ``work_dir``.
        stop_after: stop (as if killed) after this many iterations — for tests of ``resume``.

    Returns:
        :class:`TrainResult`.

    Raises:
        Cancelled: ``stop_after`` reached. InputError: the sampler gives no training crop.
    """
    trainer = Trainer(model, class_names, sampler, val_images, config, mean, std, device, work_dir, on_best,
                      reporter=reporter, resume=resume, dist_info=dist_info)
    return trainer.run(stop_after)


class Trainer:
    """One fine-tuning run (see :func:`train_loop`, its entry): the set-up in the constructor (network,
    optimiser, mixed precision, state or checkpoint, contrastive option), then :meth:`run` repeats
    :meth:`step` (one optimiser step) with :meth:`validate` and :meth:`checkpoint` at their intervals.
    ``state`` is what a checkpoint keeps (iteration, best mIoU, history, seconds)."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], sampler, val_images: Sequence,
                 config: TrainConfig, mean, std, device: torch.device, work_dir: Path,
                 on_best: Callable[[nn.Module, dict], None], reporter=None, resume: bool = False,
                 dist_info: Optional[DistInfo] = None):
        from core.protocol import Reporter

        self.rep = reporter or Reporter()
        self.dist_info = dist_info or DistInfo()
        self.model, self.class_names, self.sampler, self.val_images = model, class_names, sampler, val_images
        self.config, self.mean, self.std, self.device, self.on_best = config, mean, std, device, on_best
        self.K = len(class_names)
        prepare_model(model, device).train()  # channels_last weights (core.execution)
        if config.freeze_encoder:
            freeze_encoder(model)
            self.rep.log("the encoder is frozen (its weights and batch-norm statistics): only the head trains")
        self.net = self._parallel(model)
        self.optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay, config.head_lr_mult),
                                           lr=config.lr, weight_decay=config.weight_decay)
        self.amp_dtype, self.scaler = self._precision()
        self.mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = work_dir / "checkpoint.safetensors"
        self.state = {"iteration": 0, "best_miou": None, "best_iteration": None, "best_per_class": {},
                      "history": [], "first_loss": None, "seconds": 0.0}
        if resume:
            self.state = load_checkpoint(self.ckpt, model, self.optimizer, self.scaler)
            self.rep.log(f"resumed from {self.ckpt} at iteration {self.state['iteration']}")
        self.warmup = config.warmup()
        self.window, self.stride = config.inference_window()
        self.t0 = time.perf_counter() - self.state.get("seconds", 0.0)
        self.losses: List[float] = []
        self.contrast = self.capture = None
        self.contrast_values: List[float] = []
        if config.contrastive_weight > 0:
            self._contrastive(resume)
        self.micro = max(1, config.batch_size // max(1, config.accumulate))
        self.it = self.state["iteration"]
        if device.type == "cpu":
            tune_cpu_allocator()

    # -- set-up ------------------------------------------------------------------------------------
    def _parallel(self, model: nn.Module) -> nn.Module:
        """The module to run forward: ``model``, or its DistributedDataParallel wrapper under torchrun."""
        if not self.dist_info.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DDP(net, device_ids=[self.device.index])
        return DDP(model)

    def _precision(self):
        """``(autocast dtype or None, GradScaler or None)`` of ``config.precision`` (:mod:`core.execution`): bf16
        where native (CPU or GPU), fp16 with a loss scaler on a GPU without bf16, else float32."""
        self.precision = resolve_precision(self.config.precision, self.device)
        amp_dtype = self.precision.dtype
        self.rep.log(f"training precision: {self.precision.reason}; channels_last memory")
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return amp_dtype, scaler

    def _contrastive(self, resume: bool) -> None:
        """The opt-in contrastive regulariser and the hook that captures the fused features."""
        from core.finetune.contrastive import ContrastiveRegulariser, FeatureCapture

        config = self.config
        self.contrast = ContrastiveRegulariser(self.K, config.contrastive_weight, config.contrastive_temperature,
                                               config.contrastive_anchors, config.contrastive_queue)
        self.capture = FeatureCapture(self.model.head.fusion)  # its output is the fused map G (B, 256, h, w)
        self.rep.log(f"contrastive regularisation on: weight {config.contrastive_weight}, temperature "
                     f"{config.contrastive_temperature}, {config.contrastive_anchors} anchors per class"
                     + (f", queue {config.contrastive_queue} per class" if config.contrastive_queue else ""))
        if resume:  # the queue is part of the checkpoint, so a resumed run continues exactly
            self.contrast.load_queue_state(load_checkpoint_extra(self.ckpt, "contrastive."), self.device)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, stop_after: Optional[int] = None) -> TrainResult:
        """Train to ``config.iterations`` (or the time budget); see :func:`train_loop`."""
        config = self.config
        while self.it < config.iterations:
            loss_sum, contrast_sum = self.step()
            self._record(loss_sum, contrast_sum)
            out_of_time = config.max_seconds is not None and time.perf_counter() - self.t0 >= config.max_seconds
            if out_of_time:
                self.rep.log(f"the time budget of {config.max_seconds:.0f} s is spent: stopping at iteration {self.it}")
            last = self.it == config.iterations or out_of_time
            if self.val_images and (self.it % config.eval_interval == 0 or last):
                self.validate()
            if self.it % config.checkpoint_interval == 0 or last:
                self.checkpoint()
            if stop_after is not None and self.it >= stop_after:
                raise Cancelled(f"stopped after iteration {self.it} (stop_after)")
            if out_of_time:
                break
        if not self.val_images and self.dist_info.is_main:
            self.on_best(self.model, {"iteration": self.it, "note": "no validation data: the last iteration's model"})
        return TrainResult(iterations=self.it, best_iteration=self.state["best_iteration"],
                           best_miou=self.state["best_miou"], per_class_iou=self.state["best_per_class"],
                           history=self.state["history"], seconds=time.perf_counter() - self.t0,
                           first_loss=self.state["first_loss"],
                           last_loss=self.losses[-1] if self.losses else None)

    def _lr_factor(self) -> float:
        """The schedule's multiplier at this iteration (and the time budget's, when one is set)."""
        config, it = self.config, self.it
        factor = lr_factor(it, config.iterations, self.warmup, config.poly_power)
        if config.max_seconds is not None and it >= self.warmup:
            elapsed = time.perf_counter() - self.t0
            if self.state.get("warmup_end_seconds") is None:
                self.state["warmup_end_seconds"] = elapsed
                self.rep.log(f"time budget {config.max_seconds:.0f} s: the learning rate decays to 0 by the end of "
                             f"the budget or at iteration {config.iterations}, whichever comes first")
            factor = min(factor, time_budget_factor(elapsed, config.max_seconds, self.state["warmup_end_seconds"],
                                                    config.poly_power))
        return factor

    def step(self) -> Tuple[float, float]:
        """One optimiser step over ``accumulate`` micro-batches; ``(loss, contrastive term)`` summed over them."""
        config, optimizer = self.config, self.optimizer
        factor = self._lr_factor()
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        rng = np.random.default_rng([config.seed, self.it, self.dist_info.rank])
        torch.manual_seed(int(rng.integers(2 ** 62)))
        loss_sum = 0.0
        contrast_sum = 0.0
        for micro_step in range(config.accumulate):
            loss, contrast_part = self._micro_batch(rng, micro_step)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += float(loss.detach())
            contrast_sum += contrast_part
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return loss_sum, contrast_sum

    def _micro_batch(self, rng: np.random.Generator, micro_step: int):
        """Forward one micro-batch of ``micro`` crops → ``(loss tensor / accumulate, contrastive term)``."""
        config, capture, device = self.config, self.capture, self.device
        imgs, labels = self.sampler.batch(rng, self.micro)
        x = torch.from_numpy(np.ascontiguousarray(imgs)).to(device, non_blocking=True)
        y = torch.from_numpy(np.ascontiguousarray(labels)).to(device, non_blocking=True).long()
        x = channels_last((x - self.mean_t) / self.std_t)
        with precision_scope(self.model, device, self.precision), (capture if capture is not None else _null()):
            logits = self.net(x)
            fused = capture.output.float() if capture is not None else None  # the contrastive term in float32
        logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
        if (y != IGNORE).any():
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE) / config.accumulate
        else:  # an all-ignore batch: keep the graph (DDP needs every rank to backward) with zero loss
            loss = logits.sum() * 0.0
        contrast_part = 0.0
        if self.contrast is not None:
            # anchors from their own generator: the sampler's stream is the plain loop's
            gen = torch.Generator().manual_seed(int(np.random.default_rng(
                [config.seed, self.it, self.dist_info.rank, micro_step, 2308]).integers(2 ** 62)))
            loss = loss + self.contrast(fused, y, gen) / config.accumulate
            contrast_part = self.contrast.last["loss"] / config.accumulate
        return loss, contrast_part

    def _record(self, loss_sum: float, contrast_sum: float) -> None:
        """Count the step; report progress, and the mean loss every ``log_interval`` iterations."""
        config = self.config
        self.it += 1
        it = self.it
        self.losses.append(loss_sum)
        if self.contrast is not None:
            self.contrast_values.append(contrast_sum)
        if self.state["first_loss"] is None:
            self.state["first_loss"] = loss_sum
        done = it / config.iterations
        if config.max_seconds is not None:
            done = max(done, (time.perf_counter() - self.t0) / config.max_seconds)
        self.rep.progress(min(1.0, done), "fine-tuning")
        if it % config.log_interval == 0 or it == config.iterations:
            recent = float(np.mean(self.losses[-config.log_interval:]))
            payload = {"iteration": it, "loss": recent, "lr": self.optimizer.param_groups[0]["lr"]}
            text = f"iteration {it}/{config.iterations}: loss {recent:.4f}"
            if self.contrast is not None:  # the unweighted InfoNCE term (the loss above includes weight x it)
                payload["contrastive"] = float(np.mean(self.contrast_values[-config.log_interval:]))
                text += f" (contrastive {payload['contrastive']:.4f})"
            self.rep.metrics(payload, text=text)
            self.state["history"].append({k: v for k, v in payload.items() if k != "lr"})

    def validate(self) -> None:
        """On rank 0: validation mIoU on the held-out images, reported; ``on_best`` when it improves."""
        it, state = self.it, self.state
        if self.dist_info.is_main:
            cm = validate(self.model, self.val_images, self.K, self.mean, self.std, self.device, self.window,
                          self.stride, precision=self.precision)
            iou = iou_from_confusion(cm)
            miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
            per_class = {n: (None if np.isnan(v) else round(float(v), 4)) for n, v in zip(self.class_names, iou)}
            oa = float(np.trace(cm) / max(1, cm.sum()))
            self.rep.metrics({"iteration": it, "miou": round(miou, 4), "overall_accuracy": round(oa, 4),
                              "per_class_iou": per_class},
                             text=f"validation at {it}: mIoU {miou:.4f}, OA {oa:.4f}; "
                                  + ", ".join(f"{n} {v if v is not None else 'n/a'}" for n, v in per_class.items()))
            state["history"].append({"iteration": it, "miou": miou, "per_class_iou": per_class})
            if state["best_miou"] is None or miou > state["best_miou"]:
                state.update(best_miou=miou, best_iteration=it, best_per_class=per_class)
                self.on_best(self.model, {"miou": round(miou, 4), "overall_accuracy": round(oa, 4),
                                          "per_class_iou": per_class, "iteration": it,
                                          "confusion_matrix": cm.tolist()})
        _barrier(self.dist_info)

    def checkpoint(self) -> None:
        """Save the model, optimiser, state (and the contrastive queue) on rank 0, atomically."""
        self.state["iteration"] = self.it
        self.state["seconds"] = time.perf_counter() - self.t0
        if self.dist_info.is_main:
            contrast = self.contrast
            extra = {f"contrastive.{k}": v for k, v in contrast.queue_state().items()} if contrast else None
            save_checkpoint(self.ckpt, self.model, self.optimizer, self.state, self.scaler, extra)
        _barrier(self.dist_info)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
