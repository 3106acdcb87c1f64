"""The pretraining recipe (:class:`PretrainConfig`) and its checks. Torch-free (the command line reads it).

Defaults follow GraSS's reference configuration where it publishes one (Zhang et al., TGRS 2023,
arXiv 2306.15868; code GeoX-Lab/GraSS): NT-Xent with temperature 0.5, 224 px views, SimCLR's
augmentations, the Grad-CAM map thresholded at half its range. What it does not publish is ours and
named so: the default method (SimCLR: GraSS did not beat it at equal budget in ``make eval-pretrain``, and costs
5 % more), the warm-up length (half the budget), the optimiser (AdamW, lr 1e-4 from ImageNet weights with
a cosine decay: the reference's LARS at batch 256+ is not what a CPU runs) and the batch (16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from core.errors import InputError

METHODS = ("grass", "simclr")
CAM_SIGNS = ("loss", "negative")


@dataclass
class PretrainConfig:
    """Hyper-parameters of a pretraining run (see the module docstring for where each comes from)."""

    method: str = "simclr"  # the evidence: GraSS did not beat it (README, make eval-pretrain)
    iterations: Optional[int] = None  # optimiser steps; None with minutes = as many as the time allows
    minutes: Optional[float] = None  # wall-clock budget
    warmup_iterations: Optional[int] = None  # GraSS's ID warm-up (plain SimCLR steps); None = half the budget
    batch_size: int = 16  # images per step (2 views each)
    view: int = 224  # view side, pixels
    patch: Optional[int] = None  # side of the raster window the views are cut from; None = 2 x view
    temperature: float = 0.5
    cam_threshold: float = 0.5  # share of the map's range above its minimum
    cam_sign: str = "loss"  # "loss": the map of dL/dF as the reference; "negative": of -dL/dF
    lr: float = 1e-4
    weight_decay: float = 1e-4
    min_valid: float = 0.5  # least share of valid (not nodata) pixels in a window
    checkpoint_interval: int = 50
    log_interval: int = 5
    seed: int = 0

    def validate(self) -> None:
        """Refuse a recipe that cannot run, before anything is read or written.

        Raises:
            InputError: an unknown method or CAM sign; no budget (neither iterations nor minutes), a budget
                not positive; batch size under 2 (NT-Xent needs a negative); a view that is not a multiple
                of 32 px or under 64; a patch smaller than the view; a warm-up not below the iterations;
                a temperature not positive; a CAM threshold outside (0, 1); a min-valid share outside (0, 1].
                Messages name the command-line parameter.
        """
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.cam_sign not in CAM_SIGNS:
            raise InputError(f"--cam-sign must be one of {', '.join(CAM_SIGNS)} (got {self.cam_sign!r})")
        if self.iterations is None and self.minutes is None:
            raise InputError("give a budget: --iterations N or --minutes M")
        if self.iterations is not None and self.iterations < 1:
            raise InputError(f"--iterations must be at least 1 (got {self.iterations})")
        if self.minutes is not None and not self.minutes > 0:
            raise InputError(f"--minutes must be positive (got {self.minutes})")
        if self.batch_size < 2:
            raise InputError(f"--batch-size must be at least 2: NT-Xent contrasts each image with the others of "
                             f"its batch (got {self.batch_size})")
        if self.view < 64 or self.view % 32:
            raise InputError(f"--view must be a multiple of 32 pixels, at least 64 (got {self.view})")
        if self.patch is not None and self.patch < self.view:
            raise InputError(f"--patch ({self.patch}) must be at least the view ({self.view} px)")
        if self.warmup_iterations is not None:
            if self.warmup_iterations < 0:
                raise InputError(f"--warmup-iterations must be 0 or more (got {self.warmup_iterations})")
            if self.iterations is not None and self.method == "grass" and self.warmup_iterations >= self.iterations:
                raise InputError(f"--warmup-iterations ({self.warmup_iterations}) must be below --iterations "
                                 f"({self.iterations}): GraSS's sampling runs after the warm-up")
        if not self.temperature > 0:
            raise InputError(f"--temperature must be positive (got {self.temperature})")
        if not 0 < self.cam_threshold < 1:
            raise InputError(f"--cam-threshold must be between 0 and 1 (got {self.cam_threshold})")
        if not 0 < self.min_valid <= 1:
            raise InputError(f"--min-valid must be in (0, 1] (got {self.min_valid})")
        for name in ("checkpoint_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")

    @property
    def patch_size(self) -> int:
        return int(self.patch or 2 * self.view)

    def progress(self, step: int, seconds: float) -> float:
        """Share of the budget spent after ``step`` steps and ``seconds`` of training, in [0, 1]: the larger of
        the two when both budgets are given."""
        p = 0.0
        if self.iterations:
            p = max(p, step / self.iterations)
        if self.minutes:
            p = max(p, seconds / (60.0 * self.minutes))
        return min(1.0, p)

    def in_warmup(self, step: int, seconds: float) -> bool:
        """True while GraSS is in its instance-discrimination warm-up (always for ``simclr``): the first
        ``warmup_iterations`` steps, or the first half of the budget when that is not given."""
        if self.method == "simclr":
            return True
        if self.warmup_iterations is not None:
            return step < self.warmup_iterations
        return self.progress(step, seconds) < 0.5
