"""Training checkpoints (safetensors + JSON state, never a pickle): written atomically every N iterations,
read back by ``--resume`` so that a killed run continues exactly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional
import torch
from torch import nn
from core.errors import InputError
from core.files import atomic_output


# -- checkpoints (safetensors + JSON, never pickle) -------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    scaler: Optional["torch.amp.GradScaler"] = None,
                    extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Model weights, AdamW moments, the loop state and ``extra`` tensors (e.g. the contrastive memory
    queue, read back by :func:`load_checkpoint_extra`) in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    opt_state = optimizer.state_dict()
    scalars = {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
              for g in opt_state["param_groups"]]
    meta = {"state": state, "optimizer_groups": groups, "optimizer_scalars": scalars,
            "scaler": scaler.state_dict() if scaler is not None else None}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"srmf-checkpoint": json.dumps(meta)})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Optional["torch.amp.GradScaler"] = None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; return the loop state.

    Raises:
        InputError: the checkpoint is missing, corrupt or belongs to another model/class table.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"--resume: no checkpoint at {path}")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["srmf-checkpoint"])
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"--resume: the checkpoint {path} is unreadable ({exc})") from exc
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as exc:
        raise InputError(f"--resume: the checkpoint {path} does not fit this model/class table") from exc
    opt_state = {"state": {}, "param_groups": meta["optimizer_groups"]}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = v
    for k, v in meta["optimizer_scalars"].items():
        idx, name = k.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict(opt_state)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta["state"]


def load_checkpoint_extra(path: Path, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The ``extra`` tensors :func:`save_checkpoint` stored whose names start with ``prefix`` (the prefix
    removed); an empty dict for a checkpoint written without them."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as fh:
        for k in fh.keys():
            if k.startswith("extra." + prefix):
                out[k[len("extra." + prefix):]] = fh.get_tensor(k)
    return out
