"""Custom classes on a base model: keep, rename, drop or add classes (fine-tuning issue, item 3).

A new class table is matched against the base model's classes by ``from`` (the base class it
continues, for a rename) or by name. For the result:

* kept/renamed classes keep their classifier row (weight and bias);
* dropped classes lose theirs;
* an added class's prompt ("A satellite image of {concept}") is encoded with the base model's text
  encoder and appended to the text bank when it is not already in it; the fusion conv grows by one
  input channel per appended prompt, **zero-initialised**, so the existing classes' logits are
  unchanged before training; its classifier row starts from the mean fused feature of its labelled
  pixels (or the cluster centroids of the cold-start workflow), scaled to the existing rows' norm,
  or — with no feature given — from the mean of the existing rows.

SRMF (arXiv 2504.19839), "general representation knowledge injection": custom classes add their
own prompts to the bank T; nothing on the text side is trained.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple
import torch
from torch import nn
from core.errors import InputError
from core.model.network import SRMFNet
from core.classtable import normalise_class_table


def match_classes(base_classes: Sequence[dict], new_classes: Sequence[dict]) -> List[Optional[int]]:
    """For each new class, the id of the base class it continues (by ``from`` or by name), or None."""
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in base_classes}
    out = []
    for c in new_classes:
        src = c.get("from")
        if src is not None:
            key = str(src).lower()
            if key not in by_name:
                raise InputError(f"Class {c['name']!r}: 'from' names {src!r}, which the base model does not have "
                                 f"(it has {', '.join(str(b['name']) for b in base_classes)})")
            out.append(by_name[key])
        else:
            out.append(by_name.get(str(c["name"]).lower()))
    return out


def adapt_classes(model: SRMFNet, header: dict, new_classes: Sequence[dict], text_encoder=None,
                  init_features: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[SRMFNet, dict, dict]:
    """A copy of ``model`` whose head predicts ``new_classes``.

    Args:
        model: the base network; header: its model-file header.
        new_classes: the new class table (see :func:`normalise_class_table`; ``from`` = base class name
            for a rename).
        text_encoder: encoder for the prompts of added classes (default: the one named in the header).
        init_features: optional ``{class name: float tensor (256,) or (M, 256)}`` — mean fused features
            (or centroids, averaged then L2-normalised) that start the added classes' classifier rows.

    Returns:
        ``(new_model, new_header, report)`` with ``report = {"kept": [...], "renamed": [...],
        "dropped": [...], "added": [...], "appended_prompts": [...]}``.

    Raises:
        InputError: a bad class table; the text encoder cannot be loaded for a new prompt.
    """
    new_classes = normalise_class_table(new_classes)
    base_classes = sorted(header["classes"], key=lambda c: int(c["id"]))
    sources = match_classes(base_classes, new_classes)
    model = copy.deepcopy(model).cpu()
    head = model.head
    new_header = copy.deepcopy(header)
    report = _class_changes(base_classes, new_classes, sources)
    # 1. the text bank grows by the prompts of added classes not already in it
    if head.text_bank is not None:
        report["appended_prompts"] = _grow_text_bank(head, new_header, new_classes, sources, text_encoder)
    # 2. the classifier: kept rows copied, new rows initialised
    head.classifier = _adapted_classifier(head.classifier, new_classes, sources, init_features)
    new_header["classes"] = [{k: v for k, v in c.items() if k in ("id", "name", "colour", "prompt")}
                             for c in new_classes]
    return model, new_header, report


def _class_changes(base_classes: Sequence[dict], new_classes: Sequence[dict], sources) -> dict:
    """``{"kept", "renamed", "dropped", "added": [names], "appended_prompts": []}`` of a class mapping
    (``sources[i]``: the base class index new class ``i`` continues, or None)."""
    report = {"kept": [], "renamed": [], "dropped": [], "added": [], "appended_prompts": []}
    used = {s for s in sources if s is not None}
    report["dropped"] = [c["name"] for c in base_classes if int(c["id"]) not in used]
    for c, s in zip(new_classes, sources):
        if s is None:
            report["added"].append(c["name"])
        elif base_classes[s]["name"] != c["name"]:
            report["renamed"].append(f"{base_classes[s]['name']} -> {c['name']}")
        else:
            report["kept"].append(c["name"])
    return report


def _grow_text_bank(head, new_header: dict, new_classes: Sequence[dict], sources, text_encoder) -> List[str]:
    """Append the prompts of added classes not yet in the bank (to the head and to ``new_header``);
    returns them. Raises InputError: the encoder's dimension differs from the bank's."""
    from core.model.text.bank import build_text_bank
    from core.model.text.encoders import get_text_encoder

    bank_info = new_header.setdefault("text_bank", {})
    prompts = list(bank_info.get("prompts") or [])
    missing = [c["prompt"] for c, s in zip(new_classes, sources) if s is None and c["prompt"] not in prompts]
    missing = list(dict.fromkeys(missing))
    if not missing:
        return []
    enc = text_encoder or get_text_encoder((new_header.get("text_encoder") or {}).get("id"))
    rows = build_text_bank(missing, enc).to(head.text_bank.dtype)
    if rows.shape[1] != head.text_bank.shape[1]:
        raise InputError(f"The text encoder {getattr(enc, 'encoder_id', enc)} gives D={rows.shape[1]}, "
                         f"the model's bank has D={head.text_bank.shape[1]}")
    _grow_fusion(head, rows)
    bank_info["prompts"] = prompts + missing
    if "concepts" in bank_info:
        bank_info["concepts"] = list(bank_info["concepts"]) + [None] * len(missing)
    return missing


def _adapted_classifier(old: nn.Conv2d, new_classes: Sequence[dict], sources,
                        init_features: Optional[Dict[str, torch.Tensor]]) -> nn.Conv2d:
    """A 1x1 classifier conv for ``new_classes``: continued classes copy their row of ``old``; added
    classes start from their (normalised) mean feature when given, else the mean row; bias: the mean."""
    new = nn.Conv2d(old.in_channels, len(new_classes), 1)
    with torch.no_grad():
        w_old, b_old = old.weight.detach(), old.bias.detach()
        mean_norm = w_old.flatten(1).norm(dim=1).mean()
        for i, (c, s) in enumerate(zip(new_classes, sources)):
            if s is not None:
                new.weight[i] = w_old[s]
                new.bias[i] = b_old[s]
                continue
            feat = None if init_features is None else init_features.get(c["name"])
            if feat is not None:
                f = feat.detach().float().reshape(-1, old.in_channels).mean(0)
                f = f / f.norm().clamp_min(1e-6) * mean_norm
                new.weight[i] = f.view(-1, 1, 1)
            else:
                new.weight[i] = w_old.mean(0)
            new.bias[i] = b_old.mean()
    return new


def _grow_fusion(head, rows: torch.Tensor) -> None:
    """Append rows (M, D) to the head's text bank; the fusion conv gets M zero-initialised inputs."""
    import torch.nn.functional as F

    from core.model.network import NORM_EPS

    bank = torch.cat([head.text_bank, F.normalize(rows, dim=1, eps=NORM_EPS)], dim=0)
    head.text_bank = bank  # re-registers the buffer with the new shape
    conv = head.fusion[0]
    grown = nn.Conv2d(conv.in_channels + rows.shape[0], conv.out_channels, conv.kernel_size,
                      padding=conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            grown.bias.copy_(conv.bias)
    head.fusion[0] = grown
