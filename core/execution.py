"""How the network runs on its device (issue 11): the numeric precision (float32, or bf16 autocast where the
hardware runs bf16 natively), the memory layout (channels_last), and the CPU batch from the free memory.

Precision (``--precision``):

* ``fp32``: float32 throughout, the exact path (results identical across runs on one machine).
* ``bf16``: bfloat16 autocast (convolutions and matrix products in bf16, reductions and the logits in
  float32) — on a CPU only where it is native (AVX-512 BF16, AMX-BF16 or ARM BF16, read from the CPU's
  flags: detected, not guessed), and there for the decode head only (:attr:`Precision.scope` ``"head"``):
  measured on the trained default model (README "Speed"), the head is most of the time and keeps the
  classes, while the EfficientNet encoder in bf16 costs ~2.7 points of class agreement and saves little
  (and its depthwise backward is slower in bf16). On a CUDA GPU with bf16: the whole network.
* ``auto`` (the default): bf16 where it is native, else float32 (float16 autocast on a CUDA GPU without
  bf16); and guarded — the first batch of every job also runs in float32 and its classes are compared;
  under :data:`MIN_AGREEMENT` (99.5 % of pixels) the whole job runs in float32 instead, and says so.

The model file is never changed: autocast casts on the fly.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, TypeVar
import torch
from core.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16")
MIN_AGREEMENT = 0.995  # auto keeps bf16 only where ≥ 99.5 % of a job's first-batch pixels get fp32's class

T = TypeVar("T")


@lru_cache(maxsize=1)
def cpu_bf16_support() -> Optional[str]:
    """The CPU's native bf16 instructions, read from the operating system: ``"AMX-BF16"``,
    ``"AVX512-BF16"``, ``"ARM-BF16"``, or None (none, or an OS where the flags cannot be read: Windows).

    Linux: the ``flags`` (x86) or ``Features`` (ARM) line of ``/proc/cpuinfo``; macOS: the sysctl
    ``hw.optional.arm.FEAT_BF16``.
    """
    if os.path.exists("/proc/cpuinfo"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return None
        return bf16_from_cpuinfo(text)
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return "ARM-BF16" if out == "1" else None
    return None


def bf16_from_cpuinfo(text: str) -> Optional[str]:
    """The native bf16 instructions named by a Linux ``/proc/cpuinfo`` text (see :func:`cpu_bf16_support`)."""
    words = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    if "amx_bf16" in words:
        return "AMX-BF16"
    if "avx512_bf16" in words:
        return "AVX512-BF16"
    if "bf16" in words:
        return "ARM-BF16"
    return None


@dataclass(frozen=True)
class Precision:
    """A resolved ``--precision``.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (auto on a CUDA GPU without bf16).
        dtype: the autocast dtype, or None for float32.
        scope: what runs in ``dtype``: ``"head"`` (the decode head; the encoder stays float32) or
            ``"network"`` (all of it).
        guarded: True for ``auto`` with a low precision: the first batch is checked against float32.
        reason: one line for the log: what was asked for and why this was chosen.
    """

    name: str
    dtype: Optional[torch.dtype]
    guarded: bool
    reason: str
    scope: str = "network"


FP32 = Precision("fp32", None, False, "float32")


def resolve_precision(spec: Optional[str], device: torch.device) -> Precision:
    """``auto``/``fp32``/``bf16`` on ``device`` → a :class:`Precision`.

    Raises:
        InputError: an unknown spec; ``bf16`` asked for where it is not native (a CPU without AVX-512 BF16,
            AMX or ARM BF16; a GPU without bf16), where it would be emulated, slower than float32.
    """
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)} (got {spec!r})")
    if spec == "fp32":
        return Precision("fp32", None, False, "float32 (asked for)")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, spec == "auto", f"bf16 autocast on the GPU ({spec})")
        if spec == "bf16":
            raise InputError(f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16; "
                             "use --precision auto (float16) or fp32")
        return Precision("fp16", torch.float16, True, "float16 autocast on the GPU (auto: no bf16 on it)")
    native = cpu_bf16_support()
    if native is None:
        if spec == "bf16":
            raise InputError("--precision bf16: this CPU does not run bf16 natively (no AVX-512 BF16, AMX or ARM "
                             "BF16 instructions): it would be emulated, slower than float32; use --precision fp32 or auto")
        return Precision("fp32", None, False, "float32 (auto: this CPU has no native bf16)")
    return Precision("bf16", torch.bfloat16, spec == "auto",
                     f"bf16 autocast of the decode head on the CPU's {native} ({spec})", scope="head")


@contextlib.contextmanager
def precision_scope(model: torch.nn.Module, device: torch.device, precision: Precision):
    """Calls of ``model`` inside run in ``precision``: nothing for float32; ``scope="head"`` sets the
    network's ``head_autocast`` (:class:`core.model.network.SRMFNet`) for the duration, so the head runs
    under autocast through any wrapper (DistributedDataParallel) and in the backward; ``"network"`` (or a
    model without a separate head) wraps everything in autocast."""
    if precision.dtype is None:
        yield
    elif precision.scope == "head" and hasattr(model, "head_autocast"):
        before = model.head_autocast
        model.head_autocast = (device.type, precision.dtype)
        try:
            yield
        finally:
            model.head_autocast = before
    else:
        with torch.autocast(device.type, dtype=precision.dtype):
            yield


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels_last (NHWC) memory, the layout oneDNN and cuDNN convolutions run fastest in
    (same shape and values; no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` with its 4-D weights in channels_last (in place; returned)."""
    return model.to(device).to(memory_format=torch.channels_last)


class GuardedRun:
    """Runs calls of ``model`` under a job's :class:`Precision` (:func:`precision_scope`); for a guarded (auto) precision the first call
    also runs in float32, and unless its classes agree on ≥ :data:`MIN_AGREEMENT` of the pixels every call
    after it runs in float32 (the first call always returns the float32 result).

    Attributes:
        precision: the precision in use now (float32 after a failed check). agreement: the first batch's
            class agreement (fraction of pixels), or None when not checked.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: Precision,
                 log: Optional[Callable[[str, str], None]] = None):
        self.model, self.device, self.precision, self.log = model, device, precision, log
        self.agreement: Optional[float] = None
        self._pending = precision.guarded

    def __call__(self, fn: Callable[[], T], classes: Callable[[T], torch.Tensor]) -> T:
        """``fn()`` (which calls ``model``) in the precision; ``classes(result)`` → int (…) class ids for the check."""
        if not self._pending:
            with precision_scope(self.model, self.device, self.precision):
                return fn()
        self._pending = False
        with precision_scope(self.model, self.device, self.precision):
            low = classes(fn())
        exact = fn()
        self.agreement = float((classes(exact) == low).float().mean())
        if self.agreement < MIN_AGREEMENT:
            if self.log:
                self.log(f"precision: {self.precision.name} gave the float32 class on only {100 * self.agreement:.2f} % "
                         f"of the first batch's pixels (under {100 * MIN_AGREEMENT:.1f} %): running in float32",
                         "warning")
            self.precision = Precision("fp32", None, False, f"float32 (auto: {self.precision.name} disagreed)")
        elif self.log:
            self.log(f"precision: {self.precision.name} agrees with float32 on {100 * self.agreement:.2f} % of the "
                     "first batch's pixels", "info")
        return exact


# -- the CPU batch from the free memory (issue 11, item 4) ---------------------------------------------
# Working memory of one 512² window in a batch (MiB): the slope of the peak RSS over batches 1..8, measured
# with the embedded EfficientNet-Lite0 SRMF model on this project's 2-core AVX-512 CPU (README "Speed");
# it scales with the window's area. Larger encoders (MiT) take more: their figure is used where known.
WINDOW_MIB = {"fp32": 105.0, "bf16": 50.0}
BACKBONE_MEMORY_FACTOR = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.3, "efficientnet_lite2": 1.6}
UNKNOWN_BACKBONE_FACTOR = 3.0  # not measured: assume 3× Lite0 (MiT-b0..b5, ResNets), erring towards less memory
# One window per forward pass is the fastest per window on a CPU, not only the smallest (measured, raw forward
# of the default model on real 512² windows, s/window at batch 1/2/4/8: float32 0.15/0.24-0.33/0.31-0.34/0.37,
# head bf16 0.105/0.11-0.16/0.19-0.25/0.26; the working set of a larger batch leaves the caches): README "Speed".
CPU_BATCH_MAX = 1
MEMORY_SHARE = 0.25  # of the memory available when the job starts


def available_memory_bytes() -> Optional[int]:
    """Memory the system can give a new job now (bytes): psutil's ``available`` where psutil is installed,
    else ``MemAvailable`` of ``/proc/meminfo``; None where neither can be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_batch_size(window: int, backbone: str, precision: Precision,
                   available: Optional[int] = None) -> tuple:
    """Windows per forward pass on a CPU: as many as fit in :data:`MEMORY_SHARE` of the available memory at
    the measured working memory per window (:data:`WINDOW_MIB` × the backbone's factor × (window/512)²),
    at least 1, at most :data:`CPU_BATCH_MAX`.

    Args:
        window: pixels. backbone: the model's encoder name. precision: the job's. available: bytes (default:
            :func:`available_memory_bytes`).

    Returns:
        ``(batch, note)``: the batch and one line saying how it was chosen.
    """
    available = available_memory_bytes() if available is None else available
    per = WINDOW_MIB["bf16" if precision.dtype is not None else "fp32"] * (window / 512.0) ** 2
    per *= BACKBONE_MEMORY_FACTOR.get(backbone, UNKNOWN_BACKBONE_FACTOR)
    if available is None:
        return CPU_BATCH_MAX, f"batch {CPU_BATCH_MAX} (free memory unknown)"
    fit = int(MEMORY_SHARE * available / (per * 2 ** 20))
    batch = max(1, min(CPU_BATCH_MAX, fit))
    return batch, (f"batch {batch}: ~{per:.0f} MiB per window, {available / 2 ** 30:.1f} GiB free"
                   + (" (memory is short: smaller windows or closing programs would help)" if fit < 1 else ""))


class NetworkRunner:
    """What every inference runner shares (:class:`core.windows.WindowPredictor`, the findclass
    ``FeatureRunner``): the model prepared on its device (eval, channels_last), the job's precision resolved
    and guarded (:class:`GuardedRun`), and batches moved in (pinned and non-blocking on CUDA, channels_last).

    Args:
        model: the network. device: the compute device. precision: a :class:`Precision` or a ``--precision``
            spec. log: ``log(text, level)`` for the precision check's line.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision="fp32",
                 log: Optional[Callable[[str, str], None]] = None):
        self.model = prepare_model(model.eval(), device)
        self.device = device
        if not isinstance(precision, Precision):
            precision = resolve_precision(precision, device)
        self.run = GuardedRun(self.model, device, precision, log)

    @property
    def precision(self) -> Precision:
        """The :class:`Precision` in use (float32 after a failed auto check)."""
        return self.run.precision

    def _input(self, batch: torch.Tensor) -> torch.Tensor:
        """A host batch on the device, in channels_last memory."""
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return channels_last(batch)
