"""The compute device: ``auto``/``cpu``/``cuda``/``cuda:N`` resolved with clear errors, and the default batch of
windows per device."""
from __future__ import annotations

import torch
from core.errors import InputError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU; ``cpu``; ``cuda``; ``cuda:N``.

    Raises:
        InputError: an unknown spec, or CUDA asked for where none is available.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is available to torch {torch.__version__} "
                             f"(built for CUDA {torch.version.cuda}); use --device cpu")
        idx = 0 if spec == "cuda" else spec.split(":", 1)[1]
        try:
            idx = int(idx)
        except ValueError as exc:
            raise InputError(f"--device {spec}: the GPU index must be a number") from exc
        if idx >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device(f"cuda:{idx}")
    raise InputError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})")


# windows per forward pass by device type, when a sliding-window job (segment, findclass) is given none
DEFAULT_BATCH = {"cpu": 2, "cuda": 16}  # a CPU job picks its own from the free memory (core.execution.cpu_batch_size)
