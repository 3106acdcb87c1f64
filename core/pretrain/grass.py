"""GraSS's gradient-guided sampling (Zhang et al., "Contrastive Learning with Gradient Guided Sampling
Strategy for Remote Sensing Image Semantic Segmentation", IEEE TGRS 2023, arXiv 2306.15868; as read in
the reference code GeoX-Lab/GraSS — the paper body was not available).

A GS step: the views' last feature map F (B, C, h, w) is computed without a graph; the NT-Xent loss of
their projections is differentiated with respect to F alone (``torch.autograd.grad`` through the
projection head: no parameter gradient, cheaper than the reference's full backward); per view a
Grad-CAM-style map ``cam = sum_c alpha_c F_c`` with ``alpha_c`` = the spatial mean of dL/dF_c
(Selvaraju et al. 2017, Eq. 1-2 without the ReLU, as the reference); the map is resized to the view,
thresholded at ``min + t (max - min)``, the connected region that holds its peak is kept, and its
bounding box is cropped from the view and resized back to the view's size (nearest, as the reference).
Only the crops are trained on.

Where we differ from the reference, and why: it divides the map by its maximum, which turns a map whose
maximum is <= 0 upside down (its "peak" becomes the minimum); here the map is never rescaled (the
threshold is relative to its range, so scaling changes nothing else) and the peak is the maximum whatever
its sign. ``sign="negative"`` uses -dL/dF instead (the regions whose features lower the loss). A map
without range (constant, or not finite) keeps the whole view. A box is at least ``min_side`` pixels a
side (one feature cell: 32 px), grown around its centre inside the view.
"""
from __future__ import annotations

from typing import List, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """SimCLR's projection g(.): global average pooling of the last feature map, Linear-ReLU-Linear.

    ``forward(features)``: float (B, C, h, w) → float (B, out_dim). Discarded after pretraining.
    """

    def __init__(self, in_channels: int, hidden: int = 512, out_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.mlp(features.mean(dim=(2, 3)))


def gradient_cam(features: torch.Tensor, grad: torch.Tensor, sign: str = "loss") -> torch.Tensor:
    """The Grad-CAM-style map of each view: ``sum_c alpha_c F_c``, ``alpha_c`` = mean over (h, w) of the
    gradient (of the loss, or of its negative with ``sign="negative"``). No ReLU, no rescaling.

    Args:
        features, grad: float (B, C, h, w) — the last feature map and dL/dF.

    Returns:
        float32 (B, h, w).
    """
    g = grad if sign == "loss" else -grad
    alpha = g.float().mean(dim=(2, 3), keepdim=True)
    return (alpha * features.float()).sum(dim=1)


def peak_region_box(cam: np.ndarray, threshold: float = 0.5, min_side: int = 32) -> Tuple[int, int, int, int]:
    """The bounding box of the connected region around the map's peak (see the module docstring).

    Args:
        cam: float (v, v) — the map already resized to the view. threshold: t in (0, 1).
        min_side: least box side, pixels (a smaller box is grown around its centre, inside the map).

    Returns:
        ``(y0, x0, y1, x1)`` in map pixels, exclusive ends; the whole map when it has no range.
    """
    from scipy import ndimage

    H, W = cam.shape
    if not np.isfinite(cam).all():
        return 0, 0, H, W
    lo, hi = float(cam.min()), float(cam.max())
    if not hi > lo:
        return 0, 0, H, W
    mask = cam >= lo + threshold * (hi - lo)
    regions, _ = ndimage.label(mask)
    py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
    ys, xs = np.nonzero(regions == regions[py, px])
    y0, y1 = _grow(int(ys.min()), int(ys.max()) + 1, min_side, H)
    x0, x1 = _grow(int(xs.min()), int(xs.max()) + 1, min_side, W)
    return y0, x0, y1, x1


def _grow(a: int, b: int, min_side: int, size: int) -> Tuple[int, int]:
    """[a, b) grown to at least ``min(min_side, size)`` around its centre, kept inside [0, size)."""
    side = min(max(b - a, min_side), size)
    c = (a + b) / 2.0
    a = int(round(c - side / 2.0))
    a = min(max(0, a), size - side)
    return a, a + side


def crop_boxes(cams: torch.Tensor, view: int, threshold: float = 0.5, min_side: int = 32) -> List[Tuple[int, int, int, int]]:
    """The box of every view: each map (B, h, w) resized bilinearly to ``view`` x ``view``, then
    :func:`peak_region_box`. Returns B ``(y0, x0, y1, x1)`` tuples in view pixels."""
    up = F.interpolate(cams[:, None].float(), size=(view, view), mode="bilinear", align_corners=False)[:, 0]
    return [peak_region_box(m, threshold, min_side) for m in up.detach().cpu().numpy()]


def crop_and_resize(views: torch.Tensor, boxes, view: int) -> torch.Tensor:
    """Each view's box cut out and resized back to ``view`` x ``view`` (nearest, as the reference).

    ``views`` float (B, C, v, v); ``boxes`` B (y0, x0, y1, x1). Returns float (B, C, view, view)."""
    out = [F.interpolate(v[None, :, y0:y1, x0:x1], size=(view, view), mode="nearest")[0]
           for v, (y0, x0, y1, x1) in zip(views, boxes)]
    return torch.stack(out)


def gradient_guided_boxes(encoder: nn.Module, projector: nn.Module, v1: torch.Tensor, v2: torch.Tensor,
                          loss_fn, threshold: float, sign: str, view: int):
    """The GS boxes of both views of a batch: forward without a graph, dL/dF by ``torch.autograd.grad`` on
    the detached last feature maps through ``projector`` only, :func:`gradient_cam`, :func:`crop_boxes`.

    Args:
        encoder: ``encoder(x)`` → list of maps, the last is F. projector: F → projections.
        v1, v2: float (B, C, v, v) views. loss_fn: ``loss_fn(z1, z2)`` → scalar (NT-Xent).

    Returns:
        ``(boxes 1, boxes 2, cams 1, cams 2, loss)``: B boxes per view, the maps float32 (B, h, w), the
        loss value (float) of the uncropped views.
    """
    with torch.no_grad():
        f1 = encoder(v1)[-1]
        f2 = encoder(v2)[-1]
    f1 = f1.detach().requires_grad_(True)
    f2 = f2.detach().requires_grad_(True)
    loss = loss_fn(projector(f1), projector(f2))
    g1, g2 = torch.autograd.grad(loss, [f1, f2])
    c1, c2 = gradient_cam(f1.detach(), g1, sign), gradient_cam(f2.detach(), g2, sign)
    return crop_boxes(c1, view, threshold), crop_boxes(c2, view, threshold), c1, c2, float(loss.detach())
