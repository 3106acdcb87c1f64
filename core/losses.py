"""Contrastive losses shared by fine-tuning (the class-balanced regulariser, :mod:`core.finetune.contrastive`)
and self-supervised pretraining (NT-Xent, :mod:`core.pretrain`)."""
from __future__ import annotations

from typing import Optional, Tuple
import torch
import torch.nn.functional as F


def supcon_loss(anchors: torch.Tensor, anchor_cls: torch.Tensor, temperature: float,
                bank: Optional[torch.Tensor] = None, bank_cls: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int]:
    """Multi-positive InfoNCE (SupCon L_out), averaged per class then over classes.

    Args:
        anchors: float (N, C) unit norm (gradients flow through them). anchor_cls: int64 (N,).
        temperature: τ > 0. bank, bank_cls: optional extra contrast entries (M, C) / (M,) (detached).

    Returns:
        ``(loss scalar, anchors used)``; the loss is 0 (with a graph) when no anchor has a positive.
    """
    contrast, ccls = anchors, anchor_cls
    if bank is not None and len(bank):
        contrast = torch.cat([anchors, bank.to(anchors.dtype)])
        ccls = torch.cat([anchor_cls, bank_cls])
    logits = anchors @ contrast.T / temperature
    n = anchors.shape[0]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(n), torch.arange(n)] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (anchor_cls[:, None] == ccls[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return anchors.sum() * 0.0, 0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has])
    cls_used = anchor_cls[has]
    classes, inv = torch.unique(cls_used, return_inverse=True)
    per_class = torch.zeros(len(classes), dtype=per_anchor.dtype, device=per_anchor.device)
    per_class = per_class.index_add(0, inv, per_anchor)
    counts = torch.bincount(inv, minlength=len(classes)).to(per_anchor.dtype)
    return (per_class / counts).mean(), int(has.sum())


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy (Chen et al., ICML 2020, Eq. 1), averaged over
    the 2N views: view i's positive is the other view of its image, its negatives the other 2N-2 views.

    Args:
        z1, z2: float (N, C) projections of the two views of N images (normalised here), N >= 2.
        temperature: tau > 0 (0.5 in GraSS's reference configuration).

    Returns:
        The loss, a scalar tensor. Equal to :func:`supcon_loss` with the image index as the class (each
        class then holds exactly one positive pair).

    Raises:
        ValueError: fewer than 2 images or shapes that differ.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"nt_xent needs two (N, C) batches with N >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1, eps=1e-6)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)
