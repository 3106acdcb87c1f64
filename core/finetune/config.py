"""The fine-tuning recipe (:class:`TrainConfig`, defaults = the paper's: AdamW 6e-5, head x10, warm-up then
poly decay) and the learning-rate schedule, by iteration and by wall-clock budget. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple
from core.errors import InputError
from core.finetune.augment import AUGMENTS

VAL_SHARE = 0.2  # default share of the labelled pixels held out for validation (finetune(), --val-share)


@dataclass
class TrainConfig:
    """Hyper-parameters of a fine-tuning run (defaults: the paper's, except the warm-up cap)."""

    iterations: int = 2000
    batch_size: int = 8
    lr: float = 6e-5
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0
    warmup_iterations: Optional[int] = None  # None: min(1500, iterations // 10)
    poly_power: float = 1.0
    accumulate: int = 1
    crop: int = 512
    eval_interval: int = 200
    checkpoint_interval: int = 200
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (core.execution; autocast, the weights stay float32)
    augment: str = "flip"  # flip | d4 | photometric (core.finetune.augment)
    freeze_encoder: bool = False  # train the head only (the encoder's weights and statistics kept)
    mars: bool = True
    srr: bool = True
    srr_k: int = 4
    val_window: Optional[int] = None  # default: crop
    val_stride: Optional[int] = None  # default: 2/3 of the window (341 for 512)
    log_interval: int = 10
    max_seconds: Optional[float] = None  # wall-clock budget: stop (validate, checkpoint) when spent
    # Opt-in class-balanced contrastive regularisation of the fused features (core.finetune.contrastive; BCL of
    # arXiv 2308.02844): 0 = off (the loop is then exactly the plain SRMF loop).
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_anchors: int = 64  # anchors drawn per class present in a batch
    contrastive_queue: int = 0  # per-class memory queue of earlier anchors (0: none; checkpointed)

    def validate(self) -> None:
        """Refuse a recipe that cannot train, before anything is read or written: the one check of the
        command line (``python -m core finetune``) and of :func:`core.finetune.job.finetune`.

        Raises:
            InputError: crop not a multiple of 32 px or under 64; iterations, batch size, accumulation or
                an interval under 1; a batch size that is not a multiple of the accumulation steps; a
                learning rate not positive; a negative contrastive weight, a temperature not positive,
                fewer than 2 contrastive anchors or a negative queue. Messages name the CLI parameter.
        """
        if self.crop < 64 or self.crop % 32:
            raise InputError(f"--crop must be a multiple of 32 pixels, at least 64 (got {self.crop})")
        for name in ("iterations", "batch_size", "accumulate", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.batch_size % self.accumulate:
            raise InputError(f"--batch-size ({self.batch_size}) must be a multiple of --accumulate ({self.accumulate})")
        if str(self.precision).strip().lower() not in ("auto", "fp32", "bf16"):
            raise InputError(f"--precision must be one of auto, fp32, bf16 (got {self.precision!r})")
        if self.augment not in AUGMENTS:
            raise InputError(f"--augment must be one of {', '.join(AUGMENTS)} (got {self.augment!r})")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive (got {self.lr})")
        if not self.contrastive_weight >= 0:
            raise InputError(f"--contrastive-weight must be 0 (off) or positive (got {self.contrastive_weight})")
        if not self.contrastive_temperature > 0:
            raise InputError(f"--contrastive-temperature must be positive (got {self.contrastive_temperature})")
        if self.contrastive_anchors < 2:
            raise InputError(f"--contrastive-anchors must be at least 2 (got {self.contrastive_anchors})")
        if self.contrastive_queue < 0:
            raise InputError(f"--contrastive-queue must be 0 (none) or positive (got {self.contrastive_queue})")

    def inference_window(self) -> Tuple[int, int]:
        """(window, stride) for validation and for the written model: the paper's 512/341 unless set;
        the network is fully convolutional, so a small training crop need not shrink the window."""
        window = int(self.val_window or max(512, self.crop))
        return window, int(self.val_stride or max(1, int(round(window * 2 / 3))))

    def warmup(self) -> int:
        if self.warmup_iterations is not None:
            return int(self.warmup_iterations)
        return int(min(1500, self.iterations // 10))


def lr_factor(iteration: int, total: int, warmup: int, power: float = 1.0, warmup_ratio: float = 1e-6) -> float:
    """Learning-rate multiplier at ``iteration`` (0-based): linear warm-up from ``warmup_ratio`` to 1
    over ``warmup`` iterations (mmengine ``LinearLR``), then ``(1 - t)^power`` poly decay to 0 over the
    rest (mmengine ``PolyLR``, eta_min 0)."""
    if warmup > 0 and iteration < warmup:
        return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup
    span = max(1, total - warmup)
    t = min(1.0, (iteration - warmup) / span)
    return (1.0 - t) ** power


def time_budget_factor(elapsed_s: float, max_seconds: float, warmup_end_s: float, power: float = 1.0) -> float:
    """The poly decay over a wall-clock budget: ``(1 - t)^power`` with ``t`` the share of the budget
    after warm-up that has elapsed (``(elapsed_s - warmup_end_s) / (max_seconds - warmup_end_s)``).

    The training loop uses ``min(iteration factor, this)`` when ``max_seconds`` is set, so a budget that
    ends before the planned iterations still brings the rate to ~0 at its end (without it training
    would stop at a high rate), and the rate never rises: a pace that changes (another job on the
    CPU, validation) only moves the decay, never reverses it. Our addition for CPU users with
    ``--minutes``; the paper trains a fixed 80k iterations. Units: seconds; returns a factor in [0, 1].
    """
    span = max(1e-9, max_seconds - warmup_end_s)
    t = min(1.0, max(0.0, (elapsed_s - warmup_end_s) / span))
    return (1.0 - t) ** power
