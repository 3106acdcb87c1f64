"""Unlabelled windows from GDAL rasters and SimCLR's two views of each (GraSS's stage-1 augmentations).

The pool: every raster read through the segmentation floor (bands in the model's order, a 1-band raster
replicated, uint16/float scaled by the model file's rule, nodata from nodata values, masks, alpha bands
and NaN). Windows of ``patch`` px are drawn uniformly over the pool's valid area (a raster weighs its
valid pixels), keeping only windows whose valid share is at least ``min_valid`` (on a decimated mask);
nodata pixels inside a window take the model's mean value, as in segmentation.

The views (SimCLR, Chen et al. 2020, Sec. 3 and App. A; GraSS's reference pipeline): RandomResizedCrop
(scale 0.08-1, aspect 3/4-4/3, bilinear), horizontal flip p 0.5, colour jitter (0.8, 0.8, 0.8, 0.2) with
p 0.8, greyscale p 0.2, Gaussian blur p 0.5 (kernel ~ a tenth of the view, sigma 0.1-2). torchvision's
transforms do the work; each view keeps its box in window pixels and its flip, so a crop of the view can
be mapped back onto the window (the mechanism check measures crops against labels there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple
import numpy as np
import torch
from core.errors import InputError


@dataclass
class PoolRaster:
    """One raster of the pool: its reader (which keeps the GDAL dataset referenced), its valid positions
    (decimated) and their count."""

    path: str
    reader: object  # core.geo.raster.StripReader
    positions: np.ndarray  # int64 (M, 2): decimated (row, col) of valid window origins
    factor: float  # raster pixels per decimated pixel
    patch: int  # window side in pixels (the pool's, or the raster's smaller side)


class RasterPool:
    """The pretraining pool: random valid windows of unlabelled rasters, in the model's value range.

    Args:
        paths: raster files (anything GDAL reads). header: the model header (``input``: bands, value
            range, mean, scaling). bands: 1-based bands in the model's order, for every raster (default:
            by colour interpretation). patch / view: window and view sides in pixels. min_valid: least
            valid share of a window. log: ``log(text)`` for the per-raster notes.

    Raises:
        InputError: no raster; a raster that is missing, unreadable, smaller than a view (named with its
            size), or without a window that is valid enough; band errors of :func:`select_bands`.
    """

    def __init__(self, paths: Sequence[str], header: dict, bands: Optional[Sequence[int]], patch: int, view: int,
                 min_valid: float = 0.5, log=None):
        if not paths:
            raise InputError("No rasters to pretrain on: give at least one --raster")
        inp = header["input"]
        self.mean = np.asarray(inp["mean"], dtype=np.float32)
        self.std = np.asarray(inp["std"], dtype=np.float32)
        self.value_range = tuple(float(v) for v in inp["value_range"])
        self.rasters = [self._open(str(p), inp, bands, patch, view, min_valid, log) for p in paths]
        weights = np.array([len(r.positions) * r.factor ** 2 for r in self.rasters], dtype=np.float64)
        self.weights = weights / weights.sum()

    @staticmethod
    def _open(path: str, inp: dict, bands, patch: int, view: int, min_valid: float, log) -> PoolRaster:
        from core.geo.raster import StripReader, compute_scaling, decimated_valid_mask, open_image, select_bands

        ds = open_image(path)
        w, h = ds.RasterXSize, ds.RasterYSize
        if min(w, h) < view:
            raise InputError(f"{path} is {w} x {h} pixels: smaller than a view ({view} px); lower --view or "
                             "leave the raster out")
        sel = select_bands(ds, path, bands, inp["bands"])
        scaling = compute_scaling(ds, sel, inp.get("scaling") or {}, inp["value_range"], name=path)
        p = min(patch, w, h)
        valid, f = decimated_valid_mask(ds, sel, name=path)
        positions = _valid_origins(valid, f, p, min_valid)
        if not len(positions):
            share = float(valid.mean())
            raise InputError(f"{path}: no window of {p} px is at least {min_valid:.0%} valid data "
                             f"({share:.0%} of the raster is valid): it is all or mostly nodata")
        if log:
            log(f"{path}: {w} x {h} px, bands {','.join(map(str, sel))}, windows of {p} px over "
                f"{float(valid.mean()):.0%} valid data" + ("; " + "; ".join(scaling.notes) if scaling.notes else ""))
        return PoolRaster(path, StripReader(ds, sel, scaling, name=path), positions, f, p)

    def sample(self, rng: np.random.Generator) -> Tuple[np.ndarray, int, Tuple[int, int]]:
        """One window: ``(float32 (bands, p, p) in the value range with nodata at the model mean, raster
        index, (x0, y0) in raster pixels)``."""
        i = int(rng.choice(len(self.rasters), p=self.weights))
        r = self.rasters[i]
        row, col = r.positions[int(rng.integers(len(r.positions)))]
        w, h = r.reader.width, r.reader.height
        # a uniform origin inside the decimated cell, clipped so the window stays inside the raster
        x0 = int(min(w - r.patch, max(0, (col + rng.random()) * r.factor)))
        y0 = int(min(h - r.patch, max(0, (row + rng.random()) * r.factor)))
        data, valid = r.reader.read_window(x0, y0, r.patch, r.patch)
        data = data.astype(np.float32)
        if valid is not None and not valid.all():
            data[:, ~valid] = self.mean[:, None]
        return data, i, (x0, y0)


def _valid_origins(valid: np.ndarray, factor: float, patch: int, min_valid: float) -> np.ndarray:
    """Decimated (row, col) origins whose ``patch`` px window (``patch / factor`` cells) is at least
    ``min_valid`` valid, int64 (M, 2)."""
    from scipy.ndimage import uniform_filter

    k = max(1, int(round(patch / factor)))
    bh, bw = valid.shape
    if k > min(bh, bw):
        k = min(bh, bw)
    share = uniform_filter(valid.astype(np.float32), size=k, mode="constant", origin=-(k // 2))
    rows, cols = np.nonzero(share[: bh - k + 1, : bw - k + 1] >= min_valid - 1e-6)
    return np.stack([rows, cols], axis=1).astype(np.int64)


@dataclass
class Views:
    """A batch of views of N windows: ``images`` float32 (N, C, v, v) normalised by the model's mean/std;
    ``boxes`` int64 (N, 4): each view's (top, left, height, width) in its window's pixels; ``flipped`` bool (N,)."""

    images: torch.Tensor
    boxes: torch.Tensor
    flipped: torch.Tensor


def simclr_views(windows: Sequence[np.ndarray], view: int, mean, std, value_range=(0.0, 255.0)) -> Views:
    """One SimCLR view of every window (see the module docstring); torch's global generator draws the
    parameters (the loop seeds it per step, so a resumed run draws the same views).

    Args:
        windows: float32 (C, p, p) arrays in ``value_range``. view: output side, pixels.
        mean, std: the model's normalisation, per band, in ``value_range`` units.
    """
    from torchvision import transforms
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    lo, hi = value_range
    k = max(3, int(0.1 * view) // 2 * 2 + 1)
    photometric = v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
    ])
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32)).view(-1, 1, 1)
    s = torch.as_tensor(np.asarray(std, dtype=np.float32)).view(-1, 1, 1)
    images, boxes, flips = [], [], []
    for win in windows:
        x = (torch.from_numpy(np.ascontiguousarray(win)) - lo) / (hi - lo)
        top, left, h, w = transforms.RandomResizedCrop.get_params(x, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        y = TF.resized_crop(x, top, left, h, w, [view, view], antialias=True)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            y = TF.horizontal_flip(y)
        y = torch.cat([photometric(y[:3]), y[3:]])  # colour transforms are RGB's: further bands pass
        images.append(((y.clamp(0, 1) * (hi - lo) + lo) - m) / s)
        boxes.append((top, left, h, w))
        flips.append(flip)
    return Views(torch.stack(images), torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips))


def box_in_window(view_box: Sequence[int], flipped: bool, crop_box: Sequence[int], view: int) -> Tuple[float, ...]:
    """Where a crop of a view lies in the view's window: ``crop_box`` (y0, x0, y1, x1) in view pixels
    (exclusive ends) → (y0, x0, y1, x1) in window pixels (floats), undoing the view's flip and resize.

    ``view_box``: the view's (top, left, height, width) in the window; ``view``: its side in pixels.
    """
    top, left, h, w = view_box
    y0, x0, y1, x1 = crop_box
    if flipped:
        x0, x1 = view - x1, view - x0
    sy, sx = h / view, w / view
    return top + y0 * sy, left + x0 * sx, top + y1 * sy, left + x1 * sx


def purity(labels: np.ndarray, box: Sequence[float], ignore: int = 255) -> Optional[float]:
    """Majority-class share of the labelled pixels of ``labels`` (H, W) inside ``box`` (y0, x0, y1, x1);
    None when it holds no labelled pixel."""
    y0, x0, y1, x1 = (int(round(v)) for v in box)
    sub = labels[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
    sub = sub[sub != ignore]
    if not sub.size:
        return None
    return float(np.bincount(sub.ravel()).max() / sub.size)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (y0, x0, y1, x1) boxes."""
    iy = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def views_of(pool: RasterPool, rng: np.random.Generator, n: int, view: int) -> Tuple[Views, Views, List[tuple]]:
    """``n`` windows of the pool and two views of each: ``(views 1, views 2, [(raster index, (x0, y0))])``."""
    drawn = [pool.sample(rng) for _ in range(n)]
    windows = [d[0] for d in drawn]
    v1 = simclr_views(windows, view, pool.mean, pool.std, pool.value_range)
    v2 = simclr_views(windows, view, pool.mean, pool.std, pool.value_range)
    return v1, v2, [(d[1], d[2]) for d in drawn]
