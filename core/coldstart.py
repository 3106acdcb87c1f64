"""Cold-start class discovery: "I have a new class and a few example polygons — where else is it?"

Transfer of the clustering-based targeting (CAT) of the music cold-start matcher (WWW'23 companion,
arXiv 2308.02844, Sec. 3, "cold-start item targeting by clustering"): the representations of the
known members of a new item are clustered into a few centroids, and every candidate is scored by its
relevance to the nearest centroid. Here the "members" are the support pixels sampled inside an
analyst's example polygons, the representations are the SRMF network's per-pixel features at stride 4
(the fused 256-channel map G before the classifier, :meth:`core.network.SRMFHead.forward_features`,
or the text-aligned projection P), and the candidates are all the cells of the raster.

Pipeline of :func:`find_class` (``python -m core findclass``):

1. **Support.** Each example polygon (reprojected to the raster's CRS when its layer's CRS differs) is
   rasterised on the stride-4 cell grid (a cell is inside when its centre is), eroded by one cell so
   mixed edge cells do not pollute the support (polygons too small to erode keep their cells), and
   capped at ``max_per_polygon`` random cells so one large polygon cannot dominate. Polygons whose
   ``negative_field`` is true are negative examples.
2. **Features.** The network runs on the same sliding windows as segmentation
   (:class:`core.segment.SlidePlan`, strips read by :class:`core.raster.StripReader`); each window's
   stride-4 feature map is resampled bilinearly at the centres of the cells whose centre lies in the
   window (window offsets need not be multiples of 4), and cells covered by several windows average
   their values, as segmentation averages logits. Features are centred by a background mean (the
   mean feature of the processed windows' cells) and L2-normalised before any cosine.
3. **Centroids.** Spherical k-means (:func:`spherical_kmeans`: k-means++ seeding, several restarts,
   the best by mean cosine kept), K reduced when there are few support cells, tiny clusters dropped
   and reported.
4. **Relevance.** Max cosine to the centroids (``mode="max"``, CAT) or the mean cosine
   (``mode="mean"``); with negative examples, a cell nearer to a negative centroid than to every
   positive one is penalised by the margin: ``r = s_pos - max(0, s_neg - s_pos)``. Written as a
   float32 raster at stride 4 (the input's CRS, geotransform scaled by 4, nodata -9999).
5. **Candidates.** Patches of ``patch`` px are scored by the mean relevance of their best quarter of
   cells; patches mostly covered by the examples are left out; the review list takes the clusters in
   turn among the patches above the threshold (each patch belongs to the cluster most of its best cells
   are nearest to), so every mode of the class is shown early, then the rest by score. Written as polygons with ``rank``, ``score``, ``cluster`` and
   ``status = 'pending'`` (the analyst sets accepted/rejected).
6. **Threshold without ground truth.** Leave-one-polygon-out: the centroids are refitted without one
   polygon and that polygon's support is scored; the threshold is the score above which
   ``recall_target`` of the held-out support cells lie. With one polygon the folds are
   random cell subsets (optimistic; reported).
7. **Resembles.** The existing classes whose prototypes — classifier rows, and the mean fused feature
   of the cells the model predicts as each class — are closest to the new class, in the log.

The hand-off (:func:`handoff`, :func:`write_handoff`): examples plus *accepted* candidates become a
polygon label source for ``finetune`` (rejected and pending candidates are left out) and the
centroids, in the fused space, start the new class's classifier row
(:func:`core.classes.adapt_classes` ``init_features``: their mean, L2-normalised, at the existing
rows' norm).

Baselines on the same features (:func:`fit_prototypes`): one mean prototype, nearest neighbour (every
support cell is a prototype), random order.

All errors on bad input are :class:`core.errors.InputError` naming the file, layer, field or
parameter; outputs are written under temporary names and renamed only when complete.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

CELL = 4
"""Pixels per feature cell: the SRMF head's maps are at stride 4."""
NODATA = -9999.0
RELEVANCE_NAME = "relevance.tif"
CANDIDATES_NAME = "candidates.gpkg"
CANDIDATES_LAYER = "candidates"
META_LAYER = "srmf_findclass"
STATUSES = ("pending", "accepted", "rejected")
FEATURE_SPACES = ("fused", "embedding", "both")
MODES = ("max", "mean")
METHODS = ("cat", "prototype", "nn", "random")
# clusters: 1 (one mean prototype) won the leave-one-class-out evaluation (README, bench/coldstart.py)
DEFAULTS = {"clusters": 1, "top_n": 100, "patch": 64, "mode": "max", "features": "fused",
            "max_per_polygon": 400, "recall_target": 0.9, "min_points_per_cluster": 10,
            "min_cluster_share": 0.02, "n_init": 8, "center_windows": 8, "exclude_share": 0.5}
_NEGATIVE_TRUE = {"1", "true", "t", "yes", "y", "negative", "neg"}


# -- spherical k-means ---------------------------------------------------------------------------------
@dataclass
class Clusters:
    """Result of :func:`spherical_kmeans`.

    Attributes:
        centroids: float32 (K', C), unit L2 norm.
        labels: int64 (N,) cluster of each point (0..K'-1).
        sizes: points per cluster (K' ints).
        k_requested: the K asked for; k_used: K after the reduction for few points (before drops).
        dropped: sizes of the tiny clusters that were dropped (their points reassigned).
        objective: mean cosine of the points to their centroid (higher is better).
        notes: what was reduced or dropped, in words.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    sizes: List[int]
    k_requested: int
    k_used: int
    dropped: List[int] = field(default_factory=list)
    objective: float = 0.0
    notes: List[str] = field(default_factory=list)


@contextlib.contextmanager
def _one_thread():
    """Small matrix products (k-means on a few thousand points) run faster on one thread: with several,
    OpenMP's start-up and spin-waits dominate, and badly so on a loaded machine. Restored afterwards."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the sphere (Arthur & Vassilvitskii 2007) with the cosine distance 1 - cos."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [first]
    best = x @ x[first]
    for _ in range(1, k):
        d2 = (1.0 - best).clamp_min(0.0) ** 2
        if float(d2.sum()) <= 1e-12:  # every point sits on a centre already (duplicates)
            j = int(torch.randint(n, (1,), generator=gen))
        else:
            j = int(torch.multinomial(d2, 1, generator=gen))
        centres.append(j)
        best = torch.maximum(best, x @ x[j])
    return x[centres].clone()


def _cluster_sums(labels: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of x (N, C) → (k, C), as a one-hot matrix product (CPU
    ``index_add_`` is slow for few rows)."""
    return F.one_hot(labels, k).to(x.dtype).T @ x


def _lloyd(x: torch.Tensor, c: torch.Tensor, max_iter: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    k = c.shape[0]
    labels = None
    for _ in range(max_iter):
        sim = x @ c.T
        new = sim.argmax(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = _cluster_sums(labels, x, k)
        counts = torch.bincount(labels, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # an empty cluster: re-seed at the worst point
            worst = int(sim.max(1).values.argmin())
            sums[j] = x[worst]
        c = F.normalize(sums, dim=1, eps=1e-12)
    sim = x @ c.T
    best, labels = sim.max(1)
    return c, labels, float(best.mean())


def spherical_kmeans(x: torch.Tensor, k: int, *, n_init: int = 8, max_iter: int = 100, seed: int = 0,
                     min_points_per_cluster: int = 10, min_cluster_share: float = 0.02,
                     min_cluster_size: int = 3) -> Clusters:
    """Spherical k-means (Dhillon & Modha 2001) of unit vectors — CAT's clustering step.

    Args:
        x: float (N, C) points; they are L2-normalised here. N >= 1.
        k: the upper bound on the number of centroids (>= 1).
        n_init: restarts, each seeded by k-means++ on the cosine distance; the one with the highest mean
            cosine of points to their centroid is kept.
        seed: seeds a private torch generator (the result does not depend on the global RNG).
        min_points_per_cluster: K is reduced to ``max(1, N // min_points_per_cluster)`` when there are
            few points.
        min_cluster_share, min_cluster_size: clusters with fewer than ``max(min_cluster_size,
            min_cluster_share * N)`` points are tiny: dropped, their points reassigned to the nearest
            remaining centroid (the centroids are then recomputed once). One cluster always remains.

    Returns:
        :class:`Clusters` (centroids float32 (K', C) unit norm, labels int64 (N,)).

    Raises:
        InputError: ``k < 1`` or no points.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"--clusters must be at least 1 (got {k})")
    with _one_thread():
        return _spherical_kmeans(x, k, n_init, max_iter, seed, min_points_per_cluster, min_cluster_share,
                                 min_cluster_size)


def _spherical_kmeans(x, k, n_init, max_iter, seed, min_points_per_cluster, min_cluster_share,
                      min_cluster_size) -> Clusters:
    x = F.normalize(torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1), dim=1, eps=1e-12)
    n = x.shape[0]
    if n == 0:
        raise InputError("no support points to cluster")
    notes = []
    k_used = int(min(k, max(1, n // max(1, min_points_per_cluster))))
    if k_used < k:
        notes.append(f"K reduced from {k} to {k_used}: {n} support cells (at least {min_points_per_cluster} "
                     "per cluster)")
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(max(1, n_init) if k_used > 1 else 1):
        c0 = _kmeanspp(x, k_used, gen)
        c, labels, obj = _lloyd(x, c0, max_iter)
        if best is None or obj > best[2] + 1e-9:
            best = (c, labels, obj)
    c, labels, obj = best
    sizes = torch.bincount(labels, minlength=c.shape[0])
    floor = max(min_cluster_size, min_cluster_share * n)
    keep = sizes >= floor
    if not bool(keep.any()):
        keep = sizes == sizes.max()
        keep &= torch.cumsum(keep.int(), 0) == 1
    dropped = [int(s) for s in sizes[~keep].tolist()]
    if dropped:
        c = c[keep]
        labels = (x @ c.T).argmax(1)
        sums = _cluster_sums(labels, x, c.shape[0])
        c = F.normalize(sums, dim=1, eps=1e-12)
        best_sim, labels = (x @ c.T).max(1)
        obj = float(best_sim.mean())
        notes.append(f"dropped {len(dropped)} tiny cluster(s) of {', '.join(map(str, dropped))} cell(s) "
                     f"(under {floor:.0f} = max({min_cluster_size}, {min_cluster_share:.0%} of {n}))")
    sizes = torch.bincount(labels, minlength=c.shape[0]).tolist()
    return Clusters(c.contiguous(), labels, [int(s) for s in sizes], int(k), k_used, dropped, obj, notes)


# -- relevance and baselines -----------------------------------------------------------------------------
def relevance(z: torch.Tensor, centroids: torch.Tensor, mode: str = "max",
              negatives: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevance of unit vectors to the centroids of the new class (CAT's targeting score).

    Args:
        z: float (N, C), unit norm. centroids: float (K, C) unit norm. mode: ``"max"`` — max cosine
            (CAT); ``"mean"`` — mean cosine over the centroids.
        negatives: optional (Kn, C) unit-norm centroids of negative examples; where the best negative
            cosine ``s_neg`` exceeds the positive score ``s_pos`` the relevance is ``s_pos - (s_neg - s_pos)``.

    Returns:
        ``(score float32 (N,) in [-3, 1], cluster int64 (N,) = the nearest centroid)``.
    """
    sim = z @ centroids.T.to(z.dtype)
    best, cluster = sim.max(1)
    score = best if mode == "max" else sim.mean(1)
    if negatives is not None and len(negatives):
        s_neg = (z @ negatives.T.to(z.dtype)).max(1).values
        score = score - (s_neg - score).clamp_min(0.0)
    return score.float(), cluster


def fit_prototypes(support: torch.Tensor, method: str = "cat", k: int = 3, seed: int = 0,
                   max_nn: int = 4096, **kmeans_args) -> torch.Tensor:
    """Prototypes of the new class from its support features, for CAT and its baselines.

    Args:
        support: float (N, C) support features (normalised here).
        method: ``"cat"`` — spherical k-means centroids (K <= k); ``"prototype"`` — one mean prototype;
            ``"nn"`` — nearest neighbour: every support point is a prototype (a seeded random subset of
            ``max_nn`` when there are more); ``"random"`` — one random unit vector (random order; its
            scores carry no information).

    Returns:
        float32 (M, C), unit norm.

    Raises:
        InputError: an unknown method; see :func:`spherical_kmeans`.
    """
    x = F.normalize(torch.as_tensor(support, dtype=torch.float32), dim=1, eps=1e-12)
    if method == "cat":
        return spherical_kmeans(x, k, seed=seed, **kmeans_args).centroids
    if method == "prototype":
        return F.normalize(x.mean(0, keepdim=True), dim=1, eps=1e-12)
    if method == "nn":
        if len(x) > max_nn:
            g = torch.Generator().manual_seed(int(seed))
            x = x[torch.randperm(len(x), generator=g)[:max_nn]]
        return x
    if method == "random":
        g = torch.Generator().manual_seed(int(seed))
        return F.normalize(torch.randn(1, x.shape[1], generator=g), dim=1)
    raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def calibrate_threshold(support_groups: Sequence[torch.Tensor], fit: Callable[[torch.Tensor], torch.Tensor],
                        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], recall_target: float = 0.9,
                        max_folds: int = 10, seed: int = 0) -> dict:
    """A relevance threshold without ground truth: leave-one-polygon-out recall of the support.

    For each fold (one polygon, or a group of polygons when there are more than ``max_folds``) the
    prototypes are refitted on the other polygons' support (``fit``) and the held-out support is scored
    (``score(z, prototypes)``); the threshold is the largest ``t`` at which the held-out support cells
    above ``t`` reach ``recall_target`` (an area recall: every support cell weighs the same; the support
    is capped per polygon, so one large polygon cannot dominate). With a single polygon its cells are
    split into 5 random folds (optimistic: neighbouring cells are alike; the method says so).

    Args:
        support_groups: per polygon, float (n_p, C) unit-norm support features (n_p >= 1).
        recall_target: in (0, 1].

    Returns:
        ``{"threshold", "recall_target", "method", "folds", "held_out_cells",
        "held_out_median"}`` (scores are relevance units, cosine-like).

    Raises:
        InputError: a recall target outside (0, 1]; no support.
    """
    if not 0.0 < recall_target <= 1.0:
        raise InputError(f"recall target must be in (0, 1] (got {recall_target})")
    groups = [g for g in support_groups if len(g)]
    if not groups:
        raise InputError("no support cells to calibrate the threshold on")
    rng = np.random.default_rng(seed)
    if len(groups) >= 2:
        order = rng.permutation(len(groups))
        n_folds = min(max_folds, len(groups))
        folds = [[int(i) for i in order[f::n_folds]] for f in range(n_folds)]
        method = "leave-one-polygon-out" if n_folds == len(groups) else f"{n_folds}-fold by polygon"
        parts = groups
    else:
        g = groups[0]
        n_folds = min(5, len(g))
        perm = rng.permutation(len(g))
        parts = [g[torch.from_numpy(perm[f::n_folds].copy())] for f in range(n_folds)]
        folds = [[f] for f in range(n_folds)]
        method = f"one polygon: {n_folds} random folds of its cells (optimistic)"
    scores = []
    for fold in folds:
        held = set(fold)
        rest = [p for i, p in enumerate(parts) if i not in held and len(p)]
        if not rest:
            continue
        protos = fit(torch.cat(rest))
        for i in fold:
            scores.append(score(parts[i], protos).numpy())
    if not scores:  # a single support cell: nothing to hold out
        scores = [score(torch.cat(groups), fit(torch.cat(groups))).numpy()]
        method = "in-sample (a single support cell: nothing to hold out)"
    s = np.sort(np.concatenate(scores))[::-1]
    j = min(len(s) - 1, max(0, int(math.ceil(recall_target * len(s))) - 1))
    return {"threshold": float(s[j]), "recall_target": float(recall_target), "method": method,
            "folds": len(folds), "held_out_cells": int(len(s)), "held_out_median": float(np.median(s))}


# -- the cell grid ---------------------------------------------------------------------------------------
class CellGrid:
    """The stride-4 grid of a raster: ``rows = ceil(H / 4)``, ``cols = ceil(W / 4)``; cell (r, c) covers
    pixels [4r, 4r+4) x [4c, 4c+4), clipped to the raster; its centre is the centre of its pixels inside
    the raster (pixel units, pixel (0, 0)'s centre at 0.0)."""

    def __init__(self, height: int, width: int, cell: int = CELL):
        self.height, self.width, self.cell = int(height), int(width), int(cell)
        self.rows = -(-self.height // cell)
        self.cols = -(-self.width // cell)
        self.cy = self._centres(self.rows, self.height)
        self.cx = self._centres(self.cols, self.width)

    def _centres(self, n: int, size: int) -> np.ndarray:
        start = np.arange(n, dtype=np.float64) * self.cell
        end = np.minimum(start + self.cell, size)
        return (start + end) / 2.0 - 0.5

    def geotransform(self, gt: Sequence[float]) -> Tuple[float, ...]:
        """The raster's geotransform scaled to the cell grid (same origin, pixel size × 4)."""
        c = self.cell
        return (gt[0], gt[1] * c, gt[2] * c, gt[3], gt[4] * c, gt[5] * c)

    def block(self, x0: int, y0: int, w: int, h: int) -> Tuple[int, int, int, int]:
        """Cells whose centre lies in pixels [x0, x0+w) x [y0, y0+h): ``(r0, r1, c0, c1)``, half-open."""
        r0 = int(np.searchsorted(self.cy, y0, "left"))
        r1 = int(np.searchsorted(self.cy, y0 + h, "left"))
        c0 = int(np.searchsorted(self.cx, x0, "left"))
        c1 = int(np.searchsorted(self.cx, x0 + w, "left"))
        return r0, r1, c0, c1


# -- features from the streamed windows ------------------------------------------------------------------
class FeatureRunner:
    """The network's stride-4 feature maps of a batch of windows.

    Call: float32 (B, 3, window, window), normalised → ``{"fused": (B, 256, window/4, window/4),
    "z": (B, C', window/4, window/4)}`` float32 on the device, where ``z`` is the clustering space:
    ``"fused"`` (G, C' = 256), ``"embedding"`` (P, C' = D; text fusion only) or ``"both"`` (each
    L2-normalised, concatenated and divided by √2). CUDA: bf16 (or fp16) autocast.

    Raises:
        InputError: ``features`` unknown, or ``"embedding"``/``"both"`` on a model without text fusion.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, features: str = "fused", amp: bool = True):
        if features not in FEATURE_SPACES:
            raise InputError(f"--features must be one of {', '.join(FEATURE_SPACES)} (got {features!r})")
        if features != "fused" and getattr(model.head, "text_bank", None) is None:
            raise InputError(f"--features {features}: the model has no text fusion (no text-aligned projection); "
                             "use --features fused")
        self.model = model.eval().to(device)
        self.device = device
        self.features = features
        self.amp_dtype = None
        if device.type == "cuda" and amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            out = self.model.forward_features(batch)
        fused = out["fused"].float()
        if self.features == "fused":
            z = fused
        elif self.features == "embedding":
            z = out["embedding"].float()
        else:
            z = torch.cat([F.normalize(fused, dim=1, eps=1e-6), F.normalize(out["embedding"].float(), dim=1)],
                          dim=1) / math.sqrt(2.0)
        return {"fused": fused, "z": z}


def _iter_windows(read_strip, plan, runner: FeatureRunner, mean, std, batch_size: int,
                  want: Optional[Callable] = None, prefetch: bool = True, progress=None) -> Iterator[tuple]:
    """Windows of ``plan`` strip by strip, as :func:`core.segment.stream_segmentation` reads them.

    Yields ``("window", y, valid_strip, windows, feats)`` per batch (``feats`` from ``runner``) and
    ``("row_done", y, next_y)`` after each row of windows. ``want(window) -> bool`` skips windows.
    Entirely-nodata windows are skipped.
    """
    from .segment import _active, _batched, _window_tensor

    ys = plan.ys
    total = max(1, plan.n_windows)
    done = 0
    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    try:
        rows_needed = [y for y in ys if want is None or any(want(w) for w in plan.row(y))]
        needed = set(rows_needed)
        pending = pool.submit(read_strip, rows_needed[0], plan.win_h) if pool and rows_needed else None
        k = 0
        for r, y in enumerate(ys):
            next_y = ys[r + 1] if r + 1 < len(ys) else plan.height
            row = plan.row(y)
            if y not in needed:
                done += len(row)
                if progress:
                    progress(done / total)
                yield ("row_done", y, next_y)
                continue
            if pool:
                data, valid = pending.result()
                k += 1
                if k < len(rows_needed):
                    pending = pool.submit(read_strip, rows_needed[k], plan.win_h)
            else:
                data, valid = read_strip(y, plan.win_h)
            active = _active(row, valid, y)
            if want is not None:
                active = [w for w in active if want(w)]
            for chunk in _batched(active, batch_size):
                feats = runner(_window_tensor(data, valid, chunk, y, plan.window, mean, std))
                yield ("window", y, valid, chunk, feats)
            done += len(row)
            if progress:
                progress(done / total)
            yield ("row_done", y, next_y)
            del data, valid
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def _sample(feat: torch.Tensor, w, cy: np.ndarray, cx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """grid_sample coordinates (align_corners=False) in a window's feature map (C, hf, wf) of pixel
    centres ``cx`` (columns) and ``cy`` (rows) of the raster; feature i's centre is window pixel 4i + 1.5."""
    hf, wf = feat.shape[-2:]
    u = (np.asarray(cx, dtype=np.float64) - w.x - 1.5) / CELL
    v = (np.asarray(cy, dtype=np.float64) - w.y - 1.5) / CELL
    gx = torch.as_tensor((2.0 * u + 1.0) / wf - 1.0, dtype=torch.float32, device=feat.device)
    gy = torch.as_tensor((2.0 * v + 1.0) / hf - 1.0, dtype=torch.float32, device=feat.device)
    return gx, gy


def _grid_block(feat: torch.Tensor, w, cy: np.ndarray, cx: np.ndarray) -> torch.Tensor:
    """(C, hf, wf) sampled at the block of cell centres cy (n,) × cx (m,) → (C, n, m)."""
    gx, gy = _sample(feat, w, cy, cx)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # (1, n, m, 2) as (x, y)
    return F.grid_sample(feat[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _grid_points(feat: torch.Tensor, w, cy: np.ndarray, cx: np.ndarray) -> torch.Tensor:
    """(C, hf, wf) sampled at points (cy[i], cx[i]) → (n, C)."""
    gx, gy = _sample(feat, w, cy, cx)
    grid = torch.stack([gx, gy], dim=-1)[None, None]  # (1, 1, n, 2)
    return F.grid_sample(feat[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def _valid_cells(valid: Optional[np.ndarray], y0: int, cy: np.ndarray, cx: np.ndarray) -> Optional[np.ndarray]:
    """A cell is valid when its centre pixel is: bool (n, m) for the block cy × cx, or None (no nodata)."""
    if valid is None:
        return None
    rows = np.clip(np.floor(cy).astype(np.int64) - y0, 0, valid.shape[0] - 1)
    cols = np.clip(np.floor(cx).astype(np.int64), 0, valid.shape[1] - 1)
    return valid[np.ix_(rows, cols)]


def sample_cell_features(read_strip, plan, grid: CellGrid, runner: FeatureRunner, mean, std, batch_size: int,
                         cells: np.ndarray, extra_windows: Sequence[Tuple[int, int]] = (), prefetch: bool = True,
                         progress=None) -> dict:
    """Features of the given cells, averaged over the windows whose area holds each cell's centre.

    Args:
        read_strip: ``(y0, rows) -> (data (n, rows, W), valid (rows, W) or None)`` (a
            :class:`core.raster.StripReader`'s ``read``, or an in-memory slice).
        plan: :class:`core.segment.SlidePlan`; grid: the raster's :class:`CellGrid`.
        cells: int (M, 2) cell (row, col) indices.
        extra_windows: ``(x, y)`` offsets of further windows of ``plan`` to run for the background mean.

    Returns:
        ``{"z": float32 (M, C') mean features (not normalised), "fused": float32 (M, 256),
        "count": int (M,) windows that saw each cell (0: none, e.g. nodata), "background_z": float32
        (C',) mean of z over every valid cell of the windows run, "windows": n}``.
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    M = len(cells)
    pcy, pcx = grid.cy[cells[:, 0]], grid.cx[cells[:, 1]]
    extra = {(int(x), int(y)) for x, y in extra_windows}

    def inside(w):
        return (pcy >= w.y) & (pcy < w.y + w.h) & (pcx >= w.x) & (pcx < w.x + w.w)

    def want(w):
        return (w.x, w.y) in extra or (M > 0 and bool(inside(w).any()))

    sums = {}
    count = np.zeros(M, dtype=np.int64)
    bg_sum, bg_n, n_windows = None, 0, 0
    for ev in _iter_windows(read_strip, plan, runner, mean, std, batch_size, want, prefetch, progress):
        if ev[0] != "window":
            continue
        _, y0, valid, chunk, feats = ev
        for i, w in enumerate(chunk):
            n_windows += 1
            r0, r1, c0, c1 = grid.block(w.x, w.y, w.w, w.h)
            zb = _grid_block(feats["z"][i], w, grid.cy[r0:r1], grid.cx[c0:c1])
            vb = _valid_cells(valid, y0, grid.cy[r0:r1], grid.cx[c0:c1])
            flat = zb.flatten(1)
            if vb is not None:
                flat = flat[:, torch.from_numpy(vb.ravel()).to(flat.device)]
            s = flat.sum(1).cpu()
            bg_sum = s if bg_sum is None else bg_sum + s
            bg_n += flat.shape[1]
            sel = np.nonzero(inside(w))[0] if M else np.zeros(0, np.int64)
            if len(sel):
                if valid is not None:
                    ok = valid[np.floor(pcy[sel]).astype(np.int64) - y0, np.floor(pcx[sel]).astype(np.int64)]
                    sel = sel[ok]
                if not len(sel):
                    continue
                for key in ("z", "fused"):
                    v = _grid_points(feats[key][i], w, pcy[sel], pcx[sel]).cpu()
                    if key not in sums:
                        sums[key] = torch.zeros((M, v.shape[1]), dtype=torch.float32)
                    sums[key][torch.from_numpy(sel)] += v  # sel holds distinct cells
                count[sel] += 1
    out = {"count": count, "windows": n_windows}
    for key in ("z", "fused"):
        s = sums.get(key)
        if s is None:
            out[key] = torch.zeros((M, 0))
        else:
            out[key] = s / torch.from_numpy(np.maximum(count, 1)).float()[:, None]
    out["background_z"] = None if bg_sum is None else bg_sum / max(1, bg_n)
    return out


def stream_cell_maps(read_strip, plan, grid: CellGrid, runner: FeatureRunner, mean, std, batch_size: int,
                     cell_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], channels: int,
                     on_rows: Callable[[int, np.ndarray], None], prefetch: bool = True, progress=None) -> dict:
    """Per-cell maps of every window, averaged over overlapping windows, handed over row by row.

    For each window, its features are resampled at the centres of the cells its area holds and mapped
    by ``cell_fn({"z": (C', n, m), "fused": (256, n, m)}) -> (channels, n, m)``; values of cells seen by
    several windows are averaged (as segmentation averages logits). Rows of cells that no later window
    covers go to ``on_rows(r0, maps float32 (channels, rows, cols))``, NaN where no window saw a valid
    centre pixel. Memory: ``channels`` × (window/4 + 3) × cols floats.

    Returns:
        ``{"windows": n run, "seconds": forward-and-map time}``.
    """
    nb = plan.win_h // CELL + 3
    acc = np.zeros((channels, nb, grid.cols), dtype=np.float64)
    cnt = np.zeros((nb, grid.cols), dtype=np.float64)
    r_first = 0
    n_windows = 0
    t0 = time.perf_counter()
    for ev in _iter_windows(read_strip, plan, runner, mean, std, batch_size, None, prefetch, progress):
        if ev[0] == "window":
            _, y0, valid, chunk, feats = ev
            for i, w in enumerate(chunk):
                n_windows += 1
                r0, r1, c0, c1 = grid.block(w.x, w.y, w.w, w.h)
                if r1 <= r0 or c1 <= c0:
                    continue
                block = {k: _grid_block(v[i], w, grid.cy[r0:r1], grid.cx[c0:c1]) for k, v in feats.items()}
                vals = cell_fn(block).float().cpu().numpy()
                vb = _valid_cells(valid, y0, grid.cy[r0:r1], grid.cx[c0:c1])
                a, b = r0 - r_first, r1 - r_first
                if a < 0 or b > nb:  # cannot happen with plan's windows; guard against misuse
                    raise RuntimeError(f"window at y={w.y} covers cell rows {r0}..{r1} outside the buffer")
                if vb is None:
                    acc[:, a:b, c0:c1] += vals
                    cnt[a:b, c0:c1] += 1.0
                else:
                    acc[:, a:b, c0:c1] += np.where(vb[None], vals, 0.0)
                    cnt[a:b, c0:c1] += vb
            continue
        _, y, next_y = ev
        r_done = grid.rows if next_y >= plan.height else int(np.searchsorted(grid.cy, next_y, "left"))
        n = r_done - r_first
        if n <= 0:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            maps = (acc[:, :n] / cnt[:n]).astype(np.float32)
        maps[:, cnt[:n] == 0] = np.nan
        on_rows(r_first, maps)
        acc[:, :nb - n] = acc[:, n:].copy()
        cnt[:nb - n] = cnt[n:].copy()
        acc[:, nb - n:] = 0.0
        cnt[nb - n:] = 0.0
        r_first = r_done
    return {"windows": n_windows, "seconds": time.perf_counter() - t0}


def image_cell_features(image: np.ndarray, model: torch.nn.Module, mean, std, *, window: int = 512,
                        stride: int = 341, batch_size: int = 2, device: str = "cpu", features: str = "fused",
                        valid: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
    """Every cell's features of an in-memory image (for the benchmark and tests; memory grows with it).

    Args:
        image: (3, H, W) in the model's value range (uint8 or float32), not normalised.

    Returns:
        ``{"z": float32 (C', rows, cols), "fused": float32 (256, rows, cols)}`` averaged over windows
        (not normalised; NaN where no window saw a valid centre pixel).
    """
    from .segment import SlidePlan, resolve_device, validate_window

    validate_window(window, stride)
    H, W = image.shape[-2:]
    plan = SlidePlan(H, W, window, stride)
    grid = CellGrid(H, W)
    runner = FeatureRunner(model, resolve_device(device), features)

    def read_strip(y0, rows):
        return image[:, y0:y0 + rows], None if valid is None else valid[y0:y0 + rows]

    def cell_fn(block):
        return torch.cat([block["z"], block["fused"]], 0)

    cz = {"fused": model.head.channels, "embedding": None, "both": None}[features]
    if cz is None:
        d = model.head.text_bank.shape[1]
        cz = d if features == "embedding" else model.head.channels + d
    C = cz + model.head.channels
    out = np.full((C, grid.rows, grid.cols), np.nan, dtype=np.float32)

    def on_rows(r0, maps):
        out[:, r0:r0 + maps.shape[1]] = maps

    stream_cell_maps(read_strip, plan, grid, runner, mean, std, batch_size, cell_fn, C, on_rows, prefetch=False)
    t = torch.from_numpy(out)
    return {"z": t[:cz], "fused": t[cz:]}


# -- example polygons ------------------------------------------------------------------------------------
@dataclass
class ExamplePolygon:
    """One example feature on the cell grid.

    Attributes:
        fid: the feature id in the layer. negative: a negative example.
        cells: int64 (n, 2) support cells (row, col): eroded by one cell, capped, at least one.
        covered: int64 (m, 2) every cell whose centre is inside the polygon (for excluding known patches).
        note: what happened (too small to erode, capped...), or "".
    """

    fid: int
    negative: bool
    cells: np.ndarray
    covered: np.ndarray
    note: str = ""


def _is_negative(value) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) != 0.0
    return str(value).strip().lower() in _NEGATIVE_TRUE


def read_examples(vector, ds, grid: CellGrid, *, layer=None, negative_field: Optional[str] = None,
                  max_per_polygon: int = 400, seed: int = 0, raster_name: str = "raster",
                  reporter=None) -> Tuple[List[ExamplePolygon], dict]:
    """Rasterise example polygons on the cell grid of ``ds`` (GDAL dataset) and sample their support.

    Each feature is reprojected to the raster's CRS when the layer's CRS differs (a layer without CRS is
    taken to be in the raster's CRS), rasterised on the stride-4 grid over its own bounding box (a cell
    is in when its centre is; ALL_TOUCHED for polygons smaller than a cell), eroded by one cell (3 × 3;
    kept as is when erosion would empty it) and capped at ``max_per_polygon`` cells (seeded random
    subset). Features outside the raster are skipped with a warning.

    Returns:
        ``(polygons, info)`` with info ``{"features", "positive", "negative", "outside", "reprojected",
        "layer", "support_cells", "capped"}``.

    Raises:
        InputError: missing file/layer; an empty layer; ``negative_field`` not a field (the message lists
            the fields); no positive example; every polygon outside the raster.
    """
    from osgeo import gdal, ogr, osr
    from scipy import ndimage

    from .data import _open_layer, _traditional, reprojected

    if max_per_polygon < 1:
        raise InputError(f"--max-per-polygon must be at least 1 (got {max_per_polygon})")
    vds, lyr = _open_layer(vector, layer)
    n_features = lyr.GetFeatureCount()
    if n_features == 0:
        raise InputError(f"{vector}: layer {lyr.GetName()!r} has no example polygons (it is empty)")
    defn = lyr.GetLayerDefn()
    fields = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    if negative_field:
        if negative_field not in fields:
            ci = [f for f in fields if f.lower() == negative_field.lower()]
            if len(ci) != 1:
                raise InputError(f"{vector}: layer {lyr.GetName()!r} has no field {negative_field!r} "
                                 f"(--negative-field); its fields are: {', '.join(fields) if fields else '(none)'}")
            negative_field = ci[0]
    dst = _traditional(ds.GetSpatialRef())
    src = _traditional(lyr.GetSpatialRef())
    ct = None
    info = {"layer": lyr.GetName(), "features": n_features, "positive": 0, "negative": 0, "outside": [],
            "reprojected": False, "support_cells": 0, "capped": 0, "no_geometry": 0}
    if src is not None and dst is not None and not src.IsSame(dst):
        ct = osr.CoordinateTransformation(src, dst)
        info["reprojected"] = True
    gt = ds.GetGeoTransform(can_return_null=True) or (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    cgt = grid.geotransform(gt)
    inv = gdal.InvGeoTransform(cgt)
    rng = np.random.default_rng(seed)
    mem_drv = gdal.GetDriverByName("MEM")
    ogr_drv = ogr.GetDriverByName("Memory")
    polygons: List[ExamplePolygon] = []
    lyr.ResetReading()
    for feat in lyr:
        geom = feat.GetGeometryRef()
        if geom is None or geom.IsEmpty():
            info["no_geometry"] += 1
            continue
        g = reprojected(geom, ct, vector, feat.GetFID(), f"the CRS of {raster_name}")
        negative = False
        if negative_field:
            idx = feat.GetFieldIndex(negative_field)
            negative = feat.IsFieldSetAndNotNull(idx) and _is_negative(feat.GetField(idx))
        minx, maxx, miny, maxy = g.GetEnvelope()
        corners = [gdal.ApplyGeoTransform(inv, x, y) for x in (minx, maxx) for y in (miny, maxy)]
        cs = [p[0] for p in corners]
        rs = [p[1] for p in corners]
        c0, c1 = max(0, int(math.floor(min(cs))) - 1), min(grid.cols, int(math.ceil(max(cs))) + 1)
        r0, r1 = max(0, int(math.floor(min(rs))) - 1), min(grid.rows, int(math.ceil(max(rs))) + 1)
        mask = None
        if c1 > c0 and r1 > r0:
            for all_touched in (False, True):
                mds = mem_drv.Create("", c1 - c0, r1 - r0, 1, gdal.GDT_Byte)
                ox, oy = gdal.ApplyGeoTransform(cgt, c0, r0)
                mds.SetGeoTransform((ox, cgt[1], cgt[2], oy, cgt[4], cgt[5]))
                if dst is not None:
                    mds.SetSpatialRef(dst)
                vsrc = ogr_drv.CreateDataSource("srmf_example")
                vl = vsrc.CreateLayer("example", srs=dst, geom_type=ogr.wkbUnknown)
                of = ogr.Feature(vl.GetLayerDefn())
                of.SetGeometry(g)
                vl.CreateFeature(of)
                gdal.RasterizeLayer(mds, [1], vl, burn_values=[1],
                                    options=["ALL_TOUCHED=TRUE"] if all_touched else [])
                band = mds.GetRasterBand(1)
                m = band.ReadAsArray().astype(bool)
                band = None
                mds = None
                vsrc = None
                if m.any():
                    mask = m
                    break
        if mask is None:
            info["outside"].append(int(feat.GetFID()))
            continue
        note = ""
        eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
        if not eroded.any():
            eroded = mask
            note = "too small to erode by one cell: all its cells are used"
        rr, cc = np.nonzero(eroded)
        cells = np.stack([rr + r0, cc + c0], 1).astype(np.int64)
        if len(cells) > max_per_polygon:
            pick = np.sort(rng.choice(len(cells), max_per_polygon, replace=False))
            cells = cells[pick]
            info["capped"] += 1
            note = (note + "; " if note else "") + f"capped at {max_per_polygon} of {len(rr)} cells"
        ar, ac = np.nonzero(mask)
        covered = np.stack([ar + r0, ac + c0], 1).astype(np.int64)
        polygons.append(ExamplePolygon(int(feat.GetFID()), bool(negative), cells, covered, note))
        info["negative" if negative else "positive"] += 1
        info["support_cells"] += len(cells)
    vds = None
    rep = reporter
    if info["outside"] and rep is not None:
        rep.warning(f"{vector}: {len(info['outside'])} example polygon(s) fall outside {raster_name} and are "
                    f"skipped (feature ids {', '.join(map(str, info['outside'][:20]))})")
    if not polygons:
        W, H = ds.RasterXSize, ds.RasterYSize
        rext = (gt[0], gt[0] + gt[1] * W, gt[3] + gt[5] * H, gt[3])
        raise InputError(f"{vector}: none of the {n_features} example polygon(s) falls on {raster_name} "
                         f"(raster extent {tuple(round(v, 6) for v in rext)} in its CRS"
                         f"{', polygons reprojected to it' if ct is not None else ''}); check the layer's CRS")
    if not any(not p.negative for p in polygons):
        raise InputError(f"{vector}: every example polygon on {raster_name} is a negative example "
                         f"(--negative-field {negative_field}); give at least one positive example")
    return polygons, info


# -- candidates ------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """A square of ``patch`` px (``pc`` cells) of the raster: ``row``, ``col`` in patches; ``score`` the
    mean relevance of its best quarter of valid cells; ``cluster`` 0-based; ``valid`` share of valid
    cells; ``known`` share of its cells inside example polygons."""

    row: int
    col: int
    score: float
    cluster: int
    valid: float
    known: float = 0.0


class PatchScorer:
    """Collects finished rows of relevance and nearest-cluster cells into patch scores.

    ``add(r0, rel float32 (n, cols) NaN = nodata, cluster int (n, cols))``; patches are scored when
    their last cell row arrives. Memory: one row of patches of cells.
    """

    def __init__(self, grid: CellGrid, patch_cells: int, top_share: float = 0.25):
        self.grid, self.pc, self.top_share = grid, int(patch_cells), top_share
        self.rel = np.zeros((0, grid.cols), np.float32)
        self.clu = np.zeros((0, grid.cols), np.int64)
        self.r_next = 0
        self.patches: List[Patch] = []

    def add(self, r0: int, rel: np.ndarray, cluster: np.ndarray) -> None:
        if r0 != self.r_next + len(self.rel):
            raise RuntimeError(f"cell rows must come in order: got row {r0}, expected {self.r_next + len(self.rel)}")
        self.rel = np.concatenate([self.rel, rel])
        self.clu = np.concatenate([self.clu, cluster])
        while self.r_next < self.grid.rows:
            end = min(self.r_next + self.pc, self.grid.rows)
            n = end - self.r_next
            if len(self.rel) < n:
                break
            self._score_row(self.r_next // self.pc, self.rel[:n], self.clu[:n])
            self.rel, self.clu = self.rel[n:], self.clu[n:]
            self.r_next = end

    def _score_row(self, prow: int, rel: np.ndarray, clu: np.ndarray) -> None:
        for pcol, c0 in enumerate(range(0, self.grid.cols, self.pc)):
            r = rel[:, c0:c0 + self.pc].ravel()
            k = clu[:, c0:c0 + self.pc].ravel()
            ok = np.isfinite(r)
            if not ok.any():
                continue
            r, k = r[ok], k[ok]
            n_top = max(1, int(math.ceil(self.top_share * len(r))))
            top = np.argpartition(-r, n_top - 1)[:n_top]
            score = float(r[top].mean())
            cluster = int(np.bincount(k[top]).argmax())
            self.patches.append(Patch(prow, pcol, score, cluster, float(ok.mean())))


def order_candidates(patches: Sequence[Patch], top_n: int, threshold: Optional[float] = None) -> List[Patch]:
    """The review list, ``top_n`` long.

    First the patches scoring at or above ``threshold`` (all of them when it is None), the clusters taken
    in turn — each cluster's patches by descending score, the clusters ordered by their best patch — so
    that every mode of the class is shown early; a cluster leaves the rotation when its patches above
    the threshold are used up (a weak cluster does not push patches below the threshold up the list).
    Then the remaining patches by descending score.
    """
    ranked = sorted(patches, key=lambda p: (-p.score, p.row, p.col))
    above = [p for p in ranked if threshold is None or p.score >= threshold]
    rest = [p for p in ranked if not (threshold is None or p.score >= threshold)]
    queues: Dict[int, List[Patch]] = {}
    for p in above:
        queues.setdefault(p.cluster, []).append(p)
    order = sorted(queues, key=lambda c: -queues[c][0].score)
    out: List[Patch] = []
    pos = {c: 0 for c in order}
    while len(out) < top_n and any(pos[c] < len(queues[c]) for c in order):
        for c in order:
            if pos[c] < len(queues[c]) and len(out) < top_n:
                out.append(queues[c][pos[c]])
                pos[c] += 1
    out.extend(rest[:max(0, top_n - len(out))])
    return out


# -- the find-class job ----------------------------------------------------------------------------------
def _check_params(clusters, top_n, patch, mode, features, recall_target, max_per_polygon):
    if not isinstance(clusters, (int, np.integer)) or clusters < 1:
        raise InputError(f"--clusters must be at least 1 (got {clusters})")
    if not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise InputError(f"--top-n must be at least 1 (got {top_n})")
    if not isinstance(patch, (int, np.integer)) or patch < 8 or patch % CELL or patch > 4096:
        raise InputError(f"--patch must be a multiple of {CELL} pixels between 8 and 4096 (got {patch})")
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if features not in FEATURE_SPACES:
        raise InputError(f"--features must be one of {', '.join(FEATURE_SPACES)} (got {features!r})")
    if not 0.0 < recall_target <= 1.0:
        raise InputError(f"--recall-target must be in (0, 1] (got {recall_target})")
    if max_per_polygon < 1:
        raise InputError(f"--max-per-polygon must be at least 1 (got {max_per_polygon})")


def _prepare_output_dir(output_dir, overwrite: bool) -> Tuple[Path, bool]:
    """The output folder (created when missing; its parent must exist). Returns (path, created)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"The output folder {out} is a file; give a folder for relevance.tif and candidates.gpkg")
    created = False
    if not out.exists():
        if not out.parent.is_dir():
            raise InputError(f"The output folder's parent {out.parent} does not exist")
        try:
            out.mkdir()
        except OSError as exc:
            raise InputError(f"Cannot create the output folder {out} ({exc.strerror})") from exc
        created = True
    try:
        fd, probe = tempfile.mkstemp(dir=str(out), prefix=".srmf-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise InputError(f"The output folder {out} is not writable ({exc.strerror})") from exc
    for name in (RELEVANCE_NAME, CANDIDATES_NAME):
        if (out / name).exists() and not overwrite:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise InputError(f"The output file {out / name} exists; pass --overwrite to replace it")
    return out, created


def _normalise_z(z: torch.Tensor, background: Optional[torch.Tensor]) -> torch.Tensor:
    """(M, C) features → unit vectors, after subtracting the background mean (C,) when given."""
    if background is not None:
        z = z - background.to(z.dtype)
    return F.normalize(z, dim=1, eps=1e-6)


def resembles(init_centroids: torch.Tensor, model, classes: Sequence[dict],
              predicted_means: Optional[torch.Tensor] = None, top: int = 3) -> List[dict]:
    """The existing classes closest to the new class (its centroids' normalised mean in the fused space).

    Args:
        init_centroids: float (K, 256) fused-space centroids. classes: the model's class table.
        predicted_means: optional float (num_classes, 256) mean fused feature of the cells the model
            predicts as each class (rows of NaN for classes never predicted).

    Returns:
        Up to ``top`` dicts ``{"name", "classifier_cosine", "predicted_cosine"}`` ranked by the
        predicted-cell prototype when there is one, else by the classifier row.
    """
    q = F.normalize(init_centroids.float().mean(0), dim=0)
    rows = F.normalize(model.head.classifier.weight.detach().float().flatten(1).cpu(), dim=1)
    cls_cos = (rows @ q).tolist()
    pred_cos = [None] * len(cls_cos)
    if predicted_means is not None:
        ok = torch.isfinite(predicted_means).all(1)
        pm = F.normalize(torch.nan_to_num(predicted_means.float()), dim=1)
        pred_cos = [float(v) if bool(o) else None for v, o in zip((pm @ q).tolist(), ok.tolist())]
    names = [str(c["name"]) for c in sorted(classes, key=lambda c: int(c["id"]))]
    items = [{"name": n, "classifier_cosine": round(float(a), 4),
              "predicted_cosine": None if b is None else round(float(b), 4)}
             for n, a, b in zip(names, cls_cos, pred_cos)]
    key = (lambda d: -(d["predicted_cosine"] if d["predicted_cosine"] is not None else -2.0)) \
        if predicted_means is not None else (lambda d: -d["classifier_cosine"])
    return sorted(items, key=key)[:top]


def find_class(raster, examples, output_dir, model=None, *, layer=None, clusters: int = DEFAULTS["clusters"],
               top_n: int = DEFAULTS["top_n"], negative_field: Optional[str] = None,
               patch: int = DEFAULTS["patch"], mode: str = DEFAULTS["mode"], features: str = DEFAULTS["features"],
               center: bool = True, max_per_polygon: int = DEFAULTS["max_per_polygon"],
               recall_target: float = DEFAULTS["recall_target"], window: Optional[int] = None,
               stride: Optional[int] = None, batch_size: Optional[int] = None, device: str = "auto",
               bands: Optional[Sequence[int]] = None, seed: int = 0, overwrite: bool = False,
               reporter=None, prefetch: bool = True) -> dict:
    """Find where a new class occurs from a few example polygons (CAT, arXiv 2308.02844 Sec. 3).

    Args:
        raster: any raster GDAL reads. examples: a polygon layer (any OGR format; ``layer``, or QGIS's
            ``path|layername=NAME`` form, picks one of several) with the example polygons, in any CRS. output_dir: folder for ``relevance.tif`` and
            ``candidates.gpkg`` (created when missing).
        model: ``.srmf`` path or :class:`~core.modelfile.LoadedModel` (default: the embedded model).
        clusters: K, the upper bound on centroids (>= 1). top_n: candidates written. negative_field: a
            boolean field marking negative examples. patch: candidate patch size in pixels (multiple of
            4). mode: ``"max"`` (CAT) or ``"mean"`` cosine to the centroids. features: clustering space,
            ``"fused"`` (G, 256), ``"embedding"`` (P, text-aligned) or ``"both"``. center: subtract the
            background mean feature before the cosine. max_per_polygon: support cells per polygon.
            recall_target: of the leave-one-polygon-out threshold.
        window, stride, batch_size, device, bands: as ``segment``. seed: k-means and sampling seed.

    Returns:
        A JSON-able dict: output paths, size and CRS of the relevance raster, support and cluster
        statistics, the threshold, the cells above it, "resembles", the candidates (rank, score,
        cluster, bounds), timings.

    Raises:
        InputError / ModelFileError: bad input, named; nothing is left in the output folder.
    """
    from osgeo import gdal

    from .protocol import Reporter
    from .raster import StripReader, compute_scaling, crs_label, open_raster, select_bands
    from .segment import DEFAULT_BATCH, SlidePlan, load_job_model, resolve_device, validate_window

    rep = reporter or Reporter(json_mode=False)
    t_start = time.perf_counter()
    _check_params(clusters, top_n, patch, mode, features, recall_target, max_per_polygon)
    if layer is None and "|layername=" in str(examples):  # QGIS's "path|layername=NAME" source form
        examples, rest = str(examples).split("|layername=", 1)
        layer = rest.split("|")[0]
    if window is not None or stride is not None:
        validate_window(window if window is not None else 512, stride if stride is not None else min(341, window or 341))
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    ds = open_raster(raster)
    if not Path(str(examples)).exists() and not str(examples).startswith("/vsi"):
        raise InputError(f"Example polygon layer not found: {examples}")
    dev = resolve_device(device)
    lm, window, stride = load_job_model(model, window, stride, rep,
                                        "its features are ImageNet backbone features through a random head, "
                                        "and 'resembles' is not meaningful")
    header = lm.header
    inp = header["input"]
    band_list = select_bands(ds, raster, bands, inp["bands"])
    H, W = ds.RasterYSize, ds.RasterXSize
    grid = CellGrid(H, W)
    plan = SlidePlan(H, W, window, stride)
    runner = FeatureRunner(lm.model, dev, features)
    polygons, ex_info = read_examples(examples, ds, grid, layer=layer, negative_field=negative_field,
                                      max_per_polygon=max_per_polygon, seed=seed, raster_name=str(raster),
                                      reporter=rep)
    out_dir, created = _prepare_output_dir(output_dir, overwrite)
    scaling = compute_scaling(ds, band_list, inp["scaling"], inp["value_range"])
    for note in scaling.notes:
        rep.log("scaling: " + note)
    reader = StripReader(ds, band_list, scaling)
    batch = int(DEFAULT_BATCH.get(dev.type, 4) if batch_size is None else batch_size)
    mean, std = inp["mean"], inp["std"]
    rep.log(f"{raster}: {W} x {H} px, cell grid {grid.cols} x {grid.rows} (stride {CELL}); "
            f"{ex_info['positive']} positive and {ex_info['negative']} negative example polygon(s), "
            f"{ex_info['support_cells']} support cells sampled"
            + ("; polygons reprojected to the raster's CRS" if ex_info["reprojected"] else ""))
    for p in polygons:
        if p.note:
            rep.log(f"example {p.fid}: {p.note}")
    tmp_paths: List[str] = []
    try:
        # 1. support features (+ a few evenly spread windows for the background mean)
        all_cells = np.concatenate([p.cells for p in polygons])
        windows = [(x, y) for y in plan.ys for x in plan.xs]
        extra = []
        if center:
            n_extra = min(len(windows), DEFAULTS["center_windows"])
            extra = [windows[int(i)] for i in np.linspace(0, len(windows) - 1, n_extra).round().astype(int)]
        sup = sample_cell_features(reader.read, plan, grid, runner, mean, std, batch, all_cells, extra,
                                   prefetch=prefetch, progress=lambda f: rep.progress(0.3 * f, "support features"))
        background = sup["background_z"] if center else None
        ok = sup["count"] > 0
        z_all = _normalise_z(sup["z"], background)
        groups_pos, groups_neg, fused_pos = [], [], []
        start = 0
        for p in polygons:
            n = len(p.cells)
            sel = slice(start, start + n)
            start += n
            keep = torch.from_numpy(ok[sel])
            zg = z_all[sel][keep]
            if not len(zg):
                continue
            (groups_neg if p.negative else groups_pos).append(zg)
            if not p.negative:
                fused_pos.append((sup["fused"][sel][keep], zg))
        if not groups_pos:
            raise InputError(f"{examples}: the positive example polygons fall only on nodata pixels of {raster}")
        z_pos = torch.cat(groups_pos)
        km_args = dict(n_init=DEFAULTS["n_init"], min_points_per_cluster=DEFAULTS["min_points_per_cluster"],
                       min_cluster_share=DEFAULTS["min_cluster_share"])
        cl = spherical_kmeans(z_pos, clusters, seed=seed, **km_args)
        for note in cl.notes:
            rep.log("clusters: " + note)
        neg = None
        if groups_neg:
            z_neg = torch.cat(groups_neg)
            neg = spherical_kmeans(z_neg, clusters, seed=seed, **km_args).centroids
        fused_p = torch.cat([f for f, _ in fused_pos])
        # the fused-space centroid of each cluster: what initialises the classifier row in the hand-off
        init = F.normalize(_cluster_sums(cl.labels, fused_p, cl.centroids.shape[0]), dim=1)

        def fit(x):
            return spherical_kmeans(x, clusters, seed=seed, **km_args).centroids

        def score(z, protos):
            return relevance(z, protos, mode, neg)[0]

        thr = calibrate_threshold(groups_pos, fit, score, recall_target, seed=seed)
        rep.log(f"threshold {thr['threshold']:.4f}: {thr['recall_target']:.0%} of the held-out support scores above "
                f"it ({thr['method']}, {thr['folds']} folds)")

        # 2. relevance of every cell, patch scores, class prototypes
        Kp = cl.centroids.shape[0]
        Kn = 0 if neg is None else neg.shape[0]
        nc = lm.num_classes
        cen = cl.centroids.to(dev)
        negc = None if neg is None else neg.to(dev)
        clf_w = lm.model.head.classifier.weight.detach().float().flatten(1).to(dev)
        clf_b = lm.model.head.classifier.bias.detach().float().to(dev)
        proto_sum = torch.zeros((nc, clf_w.shape[1]), dtype=torch.float64)
        proto_n = torch.zeros(nc, dtype=torch.float64)
        bg = None if background is None else background.to(dev)

        def cell_fn(block):
            z = block["z"]
            if bg is not None:
                z = z - bg.view(-1, 1, 1)
            z = F.normalize(z, dim=0, eps=1e-6)
            sims = [torch.einsum("chw,kc->khw", z, cen)]
            if negc is not None:
                sims.append(torch.einsum("chw,kc->khw", z, negc))
            fused = block["fused"]
            logits = torch.einsum("chw,kc->khw", fused, clf_w) + clf_b.view(-1, 1, 1)
            pred = logits.argmax(0).flatten()
            fn = F.normalize(fused, dim=0, eps=1e-6).flatten(1).T.double().cpu()
            proto_sum.add_(_cluster_sums(pred.cpu(), fn, nc))
            proto_n.add_(torch.bincount(pred.cpu(), minlength=nc).double())
            return torch.cat(sims + [logits], 0)

        gt = ds.GetGeoTransform(can_return_null=True)
        srs = ds.GetSpatialRef()
        cgt = grid.geotransform(gt or (0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        fd, rel_tmp = tempfile.mkstemp(dir=str(out_dir), prefix=".relevance.", suffix=".partial.tif")
        os.close(fd)
        tmp_paths.append(rel_tmp)
        from .fileutil import default_file_mode
        from .raster import GTIFF_OPTIONS

        os.chmod(rel_tmp, default_file_mode())
        rel_ds = gdal.GetDriverByName("GTiff").Create(rel_tmp, grid.cols, grid.rows, 1, gdal.GDT_Float32,
                                                      list(GTIFF_OPTIONS) + ["PREDICTOR=3"])
        if gt is not None:
            rel_ds.SetGeoTransform(cgt)
        if srs is not None:
            rel_ds.SetSpatialRef(srs)
        rel_band = rel_ds.GetRasterBand(1)
        rel_band.SetNoDataValue(NODATA)
        rel_band.SetDescription(f"relevance ({mode} cosine to {Kp} centroid(s)); threshold {thr['threshold']:.4f}")
        scorer = PatchScorer(grid, patch // CELL)
        stats = {"cells": 0, "above": 0}

        def on_rows(r0, maps):
            sims = maps[:Kp]
            nan = ~np.isfinite(sims[0])
            s = np.nan_to_num(sims, nan=-2.0)
            cluster = s.argmax(0)
            r = s.max(0) if mode == "max" else s.mean(0)
            if Kn:
                s_neg = np.nan_to_num(maps[Kp:Kp + Kn], nan=-2.0).max(0)
                r = r - np.clip(s_neg - r, 0.0, None)
            r = r.astype(np.float32)
            r[nan] = np.nan
            rel_band.WriteArray(np.where(nan, NODATA, r).astype(np.float32), 0, r0)
            stats["cells"] += int((~nan).sum())
            stats["above"] += int((r[~nan] >= thr["threshold"]).sum())
            scorer.add(r0, r, cluster)

        sm = stream_cell_maps(reader.read, plan, grid, runner, mean, std, batch, cell_fn, Kp + Kn + nc, on_rows,
                              prefetch=prefetch, progress=lambda f: rep.progress(0.3 + 0.65 * f, "relevance"))
        rel_band = None
        rel_ds.FlushCache()
        rel_ds = None

        # 3. candidates: leave out patches that the examples mostly cover; alternate between clusters
        pc = patch // CELL
        known = {}
        for p in polygons:
            pr, pcl = p.covered[:, 0] // pc, p.covered[:, 1] // pc
            for key, n in zip(*np.unique(pr * 1_000_000 + pcl, return_counts=True)):
                known[int(key)] = known.get(int(key), 0) + int(n)
        patches = []
        for pt in scorer.patches:
            cells_in = min(pc, grid.rows - pt.row * pc) * min(pc, grid.cols - pt.col * pc)
            pt.known = known.get(pt.row * 1_000_000 + pt.col, 0) / max(1, cells_in)
            if pt.known < DEFAULTS["exclude_share"] and pt.valid >= 0.25:
                patches.append(pt)
        ranked = order_candidates(patches, top_n, thr["threshold"])
        fd, gpkg_tmp = tempfile.mkstemp(dir=str(out_dir), prefix=".candidates.", suffix=".partial.gpkg")
        os.close(fd)
        os.unlink(gpkg_tmp)
        tmp_paths.append(gpkg_tmp)
        meta = {
            "format": "srmf-findclass", "version": 1,
            "raster": str(Path(str(raster)).resolve()), "examples": str(Path(str(examples)).resolve()),
            "layer": ex_info["layer"], "negative_field": negative_field, "model": str(lm.path),
            "features": features, "mode": mode, "center": center, "cell": CELL, "patch": patch,
            "threshold": thr, "clusters": [{"cluster": i + 1, "size": s} for i, s in enumerate(cl.sizes)],
            "centroids": cl.centroids.tolist(), "init_centroids": init.tolist(),
            "negative_centroids": None if neg is None else neg.tolist(),
            "background": None if background is None else background.tolist(),
            "seed": seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        cand_rows = _write_candidates(gpkg_tmp, ranked, grid, pc, gt, srs, meta)
        pred_means = None
        if float(proto_n.sum()) > 0:
            pred_means = (proto_sum / proto_n.clamp_min(1.0)[:, None]).float()
            pred_means[proto_n == 0] = float("nan")
        res_cls = resembles(init, lm.model, lm.classes, pred_means)
        rep.log("resembles: " + ", ".join(
            f"{d['name']} (cosine {d['predicted_cosine'] if d['predicted_cosine'] is not None else 'n/a'} to its "
            f"predicted-cell prototype, {d['classifier_cosine']} to its classifier row)" for d in res_cls))
        os.replace(rel_tmp, out_dir / RELEVANCE_NAME)
        aux = out_dir / (RELEVANCE_NAME + ".aux.xml")
        if os.path.exists(rel_tmp + ".aux.xml"):
            os.replace(rel_tmp + ".aux.xml", aux)
        elif aux.exists():
            aux.unlink()
        if (out_dir / CANDIDATES_NAME).exists():
            (out_dir / CANDIDATES_NAME).unlink()
        os.replace(gpkg_tmp, out_dir / CANDIDATES_NAME)
    except BaseException:
        for t in tmp_paths:
            for f in (t, t + ".aux.xml", t + "-wal", t + "-shm", t + "-journal"):
                if os.path.exists(f):
                    os.unlink(f)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    rep.progress(1.0, "done")
    pix_area = None
    if gt is not None and srs is not None and not srs.IsGeographic():
        pix_area = abs(gt[1] * gt[5] - gt[2] * gt[4]) * srs.GetLinearUnits() ** 2
    above_share = stats["above"] / max(1, stats["cells"])
    rep.log(f"{stats['above']} of {stats['cells']} cells ({above_share:.1%}) score at or above the threshold")
    seconds = time.perf_counter() - t_start
    return {
        "output_dir": str(out_dir), "relevance": str(out_dir / RELEVANCE_NAME),
        "candidates": str(out_dir / CANDIDATES_NAME), "model": str(lm.path), "untrained_model": lm.untrained,
        "raster": str(raster), "width": W, "height": H, "relevance_width": grid.cols, "relevance_height": grid.rows,
        "crs": crs_label(srs), "cell": CELL, "patch": patch, "mode": mode, "features": features, "center": center,
        "examples": {k: v for k, v in ex_info.items()},
        "support_cells": int(len(z_pos)), "negative_cells": int(sum(len(g) for g in groups_neg)),
        "clusters": {"requested": cl.k_requested, "used": cl.k_used, "kept": len(cl.sizes), "sizes": cl.sizes,
                     "dropped": cl.dropped, "objective": round(cl.objective, 4), "notes": cl.notes},
        "negative_clusters": Kn,
        "threshold": thr,
        "cells_above_threshold": stats["above"], "cells_scored": stats["cells"],
        "share_above_threshold": round(above_share, 6),
        "area_above_threshold_m2": None if pix_area is None else stats["above"] * pix_area * CELL * CELL,
        "resembles": res_cls,
        "patches_scored": len(scorer.patches), "patches_excluded_as_examples": len(scorer.patches) - len(patches),
        "candidates_written": len(cand_rows), "candidate_patches": cand_rows,
        "device": str(dev), "windows": sm["windows"] + sup["windows"], "seconds": round(seconds, 3),
    }


def _patch_ring(pt: Patch, grid: CellGrid, pc: int, gt) -> List[Tuple[float, float]]:
    from osgeo import gdal

    x0 = pt.col * pc * CELL
    y0 = pt.row * pc * CELL
    x1 = min(x0 + pc * CELL, grid.width)
    y1 = min(y0 + pc * CELL, grid.height)
    g = gt or (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return [tuple(gdal.ApplyGeoTransform(g, x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]


def _write_candidates(path: str, ranked: Sequence[Patch], grid: CellGrid, pc: int, gt, srs, meta: dict) -> List[dict]:
    """The candidate polygons (GeoPackage layer ``candidates``) plus a one-row table ``srmf_findclass``
    holding the run's parameters, threshold and centroids (JSON) for the hand-off."""
    from osgeo import ogr

    drv = ogr.GetDriverByName("GPKG")
    ds = drv.CreateDataSource(path)
    lyr = ds.CreateLayer(CANDIDATES_LAYER, srs=srs, geom_type=ogr.wkbPolygon)
    for name, typ in (("rank", ogr.OFTInteger), ("score", ogr.OFTReal), ("cluster", ogr.OFTInteger),
                      ("status", ogr.OFTString)):
        lyr.CreateField(ogr.FieldDefn(name, typ))
    rows = []
    lyr.StartTransaction()
    for rank, pt in enumerate(ranked, 1):
        ring = ogr.Geometry(ogr.wkbLinearRing)
        pts = _patch_ring(pt, grid, pc, gt)
        for x, y in pts:
            ring.AddPoint_2D(x, y)
        poly = ogr.Geometry(ogr.wkbPolygon)
        poly.AddGeometry(ring)
        f = ogr.Feature(lyr.GetLayerDefn())
        f.SetField("rank", rank)
        f.SetField("score", round(float(pt.score), 6))
        f.SetField("cluster", int(pt.cluster) + 1)
        f.SetField("status", "pending")
        f.SetGeometry(poly)
        lyr.CreateFeature(f)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        rows.append({"rank": rank, "score": round(float(pt.score), 6), "cluster": int(pt.cluster) + 1,
                     "patch_row": pt.row, "patch_col": pt.col, "pixel_x": pt.col * pc * CELL,
                     "pixel_y": pt.row * pc * CELL, "bounds": [min(xs), min(ys), max(xs), max(ys)]})
    lyr.CommitTransaction()
    mlyr = ds.CreateLayer(META_LAYER, geom_type=ogr.wkbNone)
    mlyr.CreateField(ogr.FieldDefn("meta", ogr.OFTString))
    f = ogr.Feature(mlyr.GetLayerDefn())
    f.SetField("meta", json.dumps(meta))
    mlyr.CreateFeature(f)
    lyr = mlyr = None
    ds = None
    return rows


# -- hand-off to fine-tuning -----------------------------------------------------------------------------
def read_candidates(path) -> Tuple[dict, List[dict]]:
    """The run's metadata and the candidate rows ``{"fid", "rank", "score", "cluster", "status", "wkt"}``
    of a ``candidates.gpkg``.

    Raises:
        InputError: the file is missing, not a findclass GeoPackage, or a status is not
            pending/accepted/rejected (the message lists the offending ranks).
    """
    from osgeo import gdal

    p = Path(path)
    if not p.is_file():
        raise InputError(f"Candidate layer not found: {p}")
    try:
        ds = gdal.OpenEx(str(p), gdal.OF_VECTOR | gdal.OF_READONLY)
    except RuntimeError as exc:
        raise InputError(f"{p} is not a GeoPackage OGR can read ({exc})") from exc
    lyr = ds.GetLayerByName(CANDIDATES_LAYER)
    mlyr = ds.GetLayerByName(META_LAYER)
    if lyr is None or mlyr is None:
        raise InputError(f"{p} is not a findclass output (no '{CANDIDATES_LAYER}' and '{META_LAYER}' layers)")
    mf = mlyr.GetNextFeature()
    meta = json.loads(mf.GetField("meta"))
    rows, bad = [], []
    for f in lyr:
        status = (f.GetField("status") or "").strip().lower()
        if status not in STATUSES:
            bad.append((f.GetField("rank"), f.GetField("status")))
        g = f.GetGeometryRef()
        rows.append({"fid": f.GetFID(), "rank": f.GetField("rank"), "score": f.GetField("score"),
                     "cluster": f.GetField("cluster"), "status": status,
                     "wkt": None if g is None else g.ExportToWkt()})
    srs = lyr.GetSpatialRef()
    meta["_srs_wkt"] = None if srs is None else srs.ExportToWkt()
    lyr = mlyr = None
    ds = None
    if bad:
        raise InputError(f"{p}: status must be pending, accepted or rejected; ranks "
                         + ", ".join(f"{r} ({s!r})" for r, s in bad[:20]))
    return meta, rows


@dataclass
class HandOff:
    """What :func:`handoff` gives fine-tuning.

    Attributes:
        class_name: the new class. raster: the raster the candidates are on.
        polygons: ``[(wkt, source)]`` in the candidates' CRS — the positive examples (source
            ``"example"``) and the accepted candidates (``"candidate"``).
        srs_wkt: their CRS (WKT) or None.
        init_features: ``{class_name: float32 (K, 256)}`` — the fused-space centroids, for
            :func:`core.classes.adapt_classes` (the row starts at their normalised mean).
        counts: accepted / rejected / pending candidates, examples used.
    """

    class_name: str
    raster: str
    polygons: List[Tuple[str, str]]
    srs_wkt: Optional[str]
    init_features: Dict[str, torch.Tensor]
    counts: Dict[str, int]


def handoff(candidates, class_name: str) -> HandOff:
    """Accepted candidates plus the positive example polygons → the new class's training labels, and the
    centroids → its classifier row (CAT → fine-tuning hand-off). Rejected and pending candidates are left
    out; negative examples are left out.

    Raises:
        InputError: see :func:`read_candidates`; an empty class name; the example layer is gone.
    """
    from osgeo import osr

    from .data import _open_layer, _traditional

    name = str(class_name or "").strip()
    if not name:
        raise InputError("the new class needs a name")
    meta, rows = read_candidates(candidates)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    polys = [(r["wkt"], "candidate") for r in rows if r["status"] == "accepted" and r["wkt"]]
    dst = None
    if meta.get("_srs_wkt"):
        dst = osr.SpatialReference()
        dst.ImportFromWkt(meta["_srs_wkt"])
        dst = _traditional(dst)
    vds, lyr = _open_layer(meta["examples"], meta.get("layer"))
    src = _traditional(lyr.GetSpatialRef())
    ct = osr.CoordinateTransformation(src, dst) if src is not None and dst is not None and not src.IsSame(dst) else None
    nf = meta.get("negative_field")
    n_ex = 0
    for f in lyr:
        g = f.GetGeometryRef()
        if g is None or g.IsEmpty():
            continue
        if nf:
            idx = f.GetFieldIndex(nf)
            if idx >= 0 and f.IsFieldSetAndNotNull(idx) and _is_negative(f.GetField(idx)):
                continue
        g = g.Clone()
        if ct is not None:
            g.Transform(ct)
        polys.append((g.ExportToWkt(), "example"))
        n_ex += 1
    vds = None
    counts["examples"] = n_ex
    init = torch.tensor(meta["init_centroids"], dtype=torch.float32)
    return HandOff(name, meta["raster"], polys, meta.get("_srs_wkt"), {name: init}, counts)


def write_handoff(candidates, out_dir, class_name: str, base_model=None, text_encoder=None,
                  colour: Optional[str] = None) -> dict:
    """Write the files ``python -m core finetune`` takes for the new class.

    Writes into ``out_dir``: ``labels.gpkg`` (examples + accepted candidates, field ``class`` = the class
    name), ``sources.json`` (``[{"raster", "polygons", "field": "class"}]``), ``classes.json`` (the base
    model's classes, then the new one with value = its name) and ``base_with_class.srmf``: the base model
    with the class added by :func:`core.classes.adapt_classes` with ``init_features`` = the centroids, so
    its classifier row starts at their normalised mean (fine-tuning keeps rows of classes it finds in the
    base model). Then::

        python -m core finetune OUT.srmf --base-model base_with_class.srmf --sources sources.json \\
            --classes classes.json

    The labels hold only the new class: add labels of the other classes to ``sources.json`` (or the
    model learns to see the new class everywhere).

    Returns:
        ``{"labels", "sources", "classes", "base_model", "counts"}`` paths and counts.

    Raises:
        InputError: see :func:`handoff`; a base model that already has the class.
    """
    from osgeo import ogr, osr

    from .classes import adapt_classes
    from .modelfile import DEFAULT_MODEL_PATH, LoadedModel, load_model, save_model

    h = handoff(candidates, class_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = base_model if isinstance(base_model, LoadedModel) else load_model(base_model or DEFAULT_MODEL_PATH)
    if any(str(c["name"]).lower() == h.class_name.lower() for c in lm.classes):
        raise InputError(f"the base model already has a class {h.class_name!r}; choose another name")
    labels = out / "labels.gpkg"
    tmp = out / ".labels.partial.gpkg"
    if tmp.exists():
        tmp.unlink()
    srs = None
    if h.srs_wkt:
        srs = osr.SpatialReference()
        srs.ImportFromWkt(h.srs_wkt)
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp))
    lyr = ds.CreateLayer("labels", srs=srs, geom_type=ogr.wkbUnknown)
    lyr.CreateField(ogr.FieldDefn("class", ogr.OFTString))
    lyr.CreateField(ogr.FieldDefn("source", ogr.OFTString))
    for wkt, source in h.polygons:
        f = ogr.Feature(lyr.GetLayerDefn())
        f.SetField("class", h.class_name)
        f.SetField("source", source)
        f.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        lyr.CreateFeature(f)
    lyr = None
    ds = None
    os.replace(tmp, labels)
    classes = [{"name": c["name"], "colour": c.get("colour"), "prompt": c.get("prompt"), "value": int(c["id"])}
               for c in lm.classes]
    new = {"name": h.class_name, "value": h.class_name}
    if colour:
        new["colour"] = colour
    model, header, report = adapt_classes(lm.model, lm.header, [dict(c) for c in lm.classes] + [dict(new)],
                                          text_encoder=text_encoder, init_features=h.init_features)
    new_entry = header["classes"][-1]
    classes.append({"name": new_entry["name"], "colour": new_entry["colour"], "prompt": new_entry["prompt"],
                    "value": h.class_name})
    header.setdefault("provenance", {})
    header["provenance"] = {**header["provenance"], "coldstart": {
        "class": h.class_name, "candidates": str(Path(str(candidates)).resolve()), "counts": h.counts,
        "init": "classifier row from the normalised mean of the findclass centroids"}}
    base_path = save_model(out / "base_with_class.srmf", model, header)
    (out / "classes.json").write_text(json.dumps({"classes": classes}, indent=2), encoding="utf-8")
    sources = [{"raster": h.raster, "polygons": str(labels.resolve()), "field": "class"}]
    (out / "sources.json").write_text(json.dumps(sources, indent=2), encoding="utf-8")
    return {"labels": str(labels), "sources": str(out / "sources.json"), "classes": str(out / "classes.json"),
            "base_model": str(base_path), "counts": h.counts, "class_changes": report}


# -- command line ----------------------------------------------------------------------------------------
def add_findclass_arguments(p) -> None:
    """Arguments of ``python -m core findclass``."""
    p.add_argument("raster", help="raster to search (any format GDAL reads)")
    p.add_argument("examples", help="polygon layer with example polygons of the new class (any CRS)")
    p.add_argument("output_dir", help="folder for relevance.tif and candidates.gpkg (created when missing)")
    p.add_argument("--model", default=None, help="model file (default: the embedded default model)")
    p.add_argument("--layer", default=None, help="layer of the example file (default: its first)")
    p.add_argument("--clusters", type=int, default=DEFAULTS["clusters"], help="K, upper bound on centroids (default 1: one mean prototype; more for a class with distinct looks)")
    p.add_argument("--top-n", type=int, default=DEFAULTS["top_n"], help="candidate patches to write")
    p.add_argument("--negative-field", default=None, help="boolean field marking negative examples")
    p.add_argument("--patch", type=int, default=DEFAULTS["patch"], help="candidate patch size in pixels (multiple of 4)")
    p.add_argument("--mode", choices=MODES, default=DEFAULTS["mode"],
                   help="relevance: max (CAT) or mean cosine to the centroids")
    p.add_argument("--features", choices=FEATURE_SPACES, default=DEFAULTS["features"],
                   help="feature space: fused (256-ch map before the classifier), embedding (text-aligned), both")
    p.add_argument("--no-center", action="store_true", help="do not subtract the background mean feature")
    p.add_argument("--max-per-polygon", type=int, default=DEFAULTS["max_per_polygon"],
                   help="support cells sampled per polygon at most")
    p.add_argument("--recall-target", type=float, default=DEFAULTS["recall_target"],
                   help="recall of the held-out support at the calibrated threshold")
    p.add_argument("--window", type=int, default=None, help="window size in pixels (default: the model's)")
    p.add_argument("--stride", type=int, default=None, help="stride in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--bands", default=None, help="1-based input bands in the model's order, e.g. 3,2,1")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and of the support sampling")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, log, result, error)")


def run_findclass_command(args, rep) -> dict:
    """``python -m core findclass``: run :func:`find_class` and report."""
    from .raster import parse_bands

    res = find_class(args.raster, args.examples, args.output_dir, args.model, layer=args.layer,
                     clusters=args.clusters, top_n=args.top_n, negative_field=args.negative_field,
                     patch=args.patch, mode=args.mode, features=args.features, center=not args.no_center,
                     max_per_polygon=args.max_per_polygon, recall_target=args.recall_target,
                     window=args.window, stride=args.stride, batch_size=args.batch_size, device=args.device,
                     bands=parse_bands(args.bands), seed=args.seed, overwrite=args.overwrite, reporter=rep)
    c = res["clusters"]
    lines = [f"Wrote {res['relevance']} ({res['relevance_width']} x {res['relevance_height']} cells of {CELL} px, "
             f"{res['crs'] or 'no CRS'}) and {res['candidates']} ({res['candidates_written']} candidates) "
             f"in {res['seconds']:.1f} s on {res['device']}",
             f"support: {res['support_cells']} cells from {res['examples']['positive']} example polygon(s); "
             f"clusters: {c['kept']} of K={c['requested']} (sizes {', '.join(map(str, c['sizes']))})"
             + (f", dropped {c['dropped']}" if c["dropped"] else ""),
             f"threshold {res['threshold']['threshold']:.4f} ({res['threshold']['method']}, recall target "
             f"{res['threshold']['recall_target']:.0%}): {res['share_above_threshold']:.1%} of the cells above",
             "resembles: " + ", ".join(d["name"] for d in res["resembles"])]
    if res["untrained_model"]:
        lines.append("WARNING: the model is an UNTRAINED PLACEHOLDER.")
    rep.result(res, text="\n".join(lines))
    return res


def add_handoff_arguments(p) -> None:
    """Arguments of ``python -m core findclass-handoff``."""
    p.add_argument("candidates", help="a reviewed candidates.gpkg of findclass (status accepted/rejected/pending)")
    p.add_argument("output_dir", help="folder for labels.gpkg, sources.json, classes.json, base_with_class.srmf")
    p.add_argument("--class-name", required=True, help="name of the new class")
    p.add_argument("--base-model", default=None, help="model to add the class to (default: the embedded one)")
    p.add_argument("--colour", default=None, help="colour of the new class, #RRGGBB")
    p.add_argument("--json", action="store_true", help="print JSON lines (log, result, error)")


def run_handoff_command(args, rep) -> dict:
    """Write the fine-tuning inputs of a reviewed findclass run (:func:`write_handoff`) and report them."""
    res = write_handoff(args.candidates, args.output_dir, args.class_name, base_model=args.base_model,
                        colour=args.colour)
    c = res["counts"]
    cmd = (f"python -m core finetune OUT.srmf --base-model {res['base_model']} --sources {res['sources']} "
           f"--classes {res['classes']}")
    rep.log(f"{c['examples']} example polygon(s) and {c['accepted']} accepted candidate(s) label the class "
            f"{args.class_name!r}; {c['rejected']} rejected and {c['pending']} pending candidate(s) left out")
    rep.result({**res, "finetune_command": cmd},
               text=f"Wrote {res['labels']}, {res['sources']}, {res['classes']} and {res['base_model']}\n"
                    f"Next (add labels of the other classes to sources.json first): {cmd}")
    return res
