"""Prototypes of a new class (the CAT transfer, arXiv 2308.02844): spherical k-means centroids, one mean
prototype or nearest neighbour as baselines, relevance by cosine, and the threshold calibrated on held-out support."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from core.errors import InputError
from core.findclass.params import METHODS


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


def cluster_sums(labels: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of x (N, C) float → (k, C) of x's dtype, for int64 labels (N,) in
    0..k-1, as a one-hot matrix product (CPU ``index_add_`` is slow for few rows)."""
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
        sums = cluster_sums(labels, x, k)
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
        sums = cluster_sums(labels, x, c.shape[0])
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
