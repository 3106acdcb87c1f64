"""Findclass, class discovery from a few examples: "I have a new class and a few example polygons — where else is it?"

Transfer of the clustering-based targeting (CAT) of the music cold-start matcher (WWW'23 companion,
arXiv 2308.02844, Sec. 3, "cold-start item targeting by clustering"): the representations of the
known members of a new item are clustered into a few centroids, and every candidate is scored by its
relevance to the nearest centroid. Here the "members" are the support pixels sampled inside an
analyst's example polygons, the representations are the SRMF network's per-pixel features at stride 4
(the fused 256-channel map G before the classifier, :meth:`core.model.network.SRMFHead.forward_features`,
or the text-aligned projection P), and the candidates are all the cells of the raster.

Pipeline of :func:`find_class` (``python -m core findclass``):

1. **Support.** Each example polygon (reprojected to the raster's CRS when its layer's CRS differs) is
   rasterised on the stride-4 cell grid (a cell is inside when its centre is), eroded by one cell so
   mixed edge cells do not pollute the support (polygons too small to erode keep their cells), and
   capped at ``max_per_polygon`` random cells so one large polygon cannot dominate. Polygons whose
   ``negative_field`` is true are negative examples.
2. **Features.** The network runs on the same sliding windows as segmentation
   (:class:`core.windows.SlidePlan`, strips read by :class:`core.geo.raster.StripReader`); each window's
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
(:func:`core.model.adapt.adapt_classes` ``init_features``: their mean, L2-normalised, at the existing
rows' norm).

Baselines on the same features (:func:`fit_prototypes`): one mean prototype, nearest neighbour (every
support cell is a prototype), random order.

All errors on bad input are :class:`core.errors.InputError` naming the file, layer, field or
parameter; outputs are written under temporary names and renamed only when complete.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from core.errors import InputError
from core.files import check_writable_folder, partial_path
from core.findclass.candidates import PatchScorer, order_candidates, write_candidates
from core.findclass.cells import CellGrid, FeatureRunner, sample_cell_features, stream_cell_maps
from core.findclass.examples import read_examples
from core.findclass.params import CANDIDATES_NAME, CELL, DEFAULTS, FEATURE_SPACES, MODES, NODATA, RELEVANCE_NAME
from core.findclass.prototypes import calibrate_threshold, cluster_sums, relevance, spherical_kmeans
from core.windows import InferenceJob, check_inference_args, open_inference
# clusters: 1 (one mean prototype) won the leave-one-class-out evaluation (README, bench/coldstart.py)
KMEANS_ARGS = {k: DEFAULTS[k] for k in ("n_init", "min_points_per_cluster", "min_cluster_share")}
"""The spherical k-means settings of the centroids and of the threshold's refits."""


# -- the findclass job -------------------------------------------------------------------------------------
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
        check_writable_folder(out)
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
               reporter=None, prefetch: bool = True, precision: str = "auto", extent=None, mask=None) -> dict:
    """Find where a new class occurs from a few example polygons (CAT, arXiv 2308.02844 Sec. 3).

    The steps (module docstring): support → centroids → calibration → scoring → ranking → publishing.

    Args:
        raster: any raster GDAL reads. examples: a polygon layer (any OGR format; ``layer``, or QGIS's
            ``path|layername=NAME`` form, picks one of several) with the example polygons, in any CRS.
            output_dir: folder for ``relevance.tif`` and ``candidates.gpkg`` (created when missing).
        model: ``.srmf`` path or :class:`~core.model.modelfile.LoadedModel` (default: the embedded model).
        clusters: K, the upper bound on centroids (>= 1). top_n: candidates written. negative_field: a
            boolean field marking negative examples. patch: candidate patch size in pixels (multiple of
            4). mode: ``"max"`` (CAT) or ``"mean"`` cosine to the centroids. features: clustering space,
            ``"fused"`` (G, 256), ``"embedding"`` (P, text-aligned) or ``"both"``. center: subtract the
            background mean feature before the cosine. max_per_polygon: support cells per polygon.
            recall_target: of the leave-one-polygon-out threshold.
        window, stride, batch_size, device, bands, precision, extent, mask: as ``segment`` (the area of
            interest: the search and its outputs cover only it; examples outside it are skipped).
            seed: k-means and sampling seed.

    Returns:
        A JSON-able dict: output paths, size and CRS of the relevance raster, support and cluster
        statistics, the threshold, the cells above it, "resembles", the candidates (rank, score,
        cluster, bounds), timings.

    Raises:
        InputError / ModelFileError: bad input, named; nothing is left in the output folder.
    """
    from core.protocol import Reporter

    rep = reporter or Reporter(json_mode=False)
    t_start = time.perf_counter()
    _check_params(clusters, top_n, patch, mode, features, recall_target, max_per_polygon)
    examples, layer = _layer_source(examples, layer)
    check_inference_args(window, stride, batch_size, precision)
    ds, job, grid, runner, aoi = _open_inputs(raster, examples, model, window, stride, batch_size, device, bands,
                                              features, rep, precision, extent, mask)
    polygons, ex_info = read_examples(examples, ds, grid, layer=layer, negative_field=negative_field,
                                      max_per_polygon=max_per_polygon, seed=seed, raster_name=str(raster),
                                      reporter=rep)
    from core.geo.raster import check_not_read

    check_not_read([Path(output_dir) / RELEVANCE_NAME, Path(output_dir) / CANDIDATES_NAME],
                   [(ds, raster), (None, examples)])
    out_dir, created = _prepare_output_dir(output_dir, overwrite)
    run = None
    try:
        reader = job.strip_reader(rep)
        run = _Run(raster, examples, negative_field, clusters, top_n, patch, mode, features, center, recall_target,
                   seed, prefetch, rep, job, grid, runner, reader if aoi is None else aoi.masked(reader, ds),
                   polygons, ex_info, out_dir)
        _log_start(run)
        support = _support(run)
        cen = _centroids(run, support)
        thr = _calibrate(run, support, cen)
        scores = _score(run, support, cen, thr)
        patches, ranked = _rank(run, scores, thr)
        published = _publish(run, support, cen, thr, scores, ranked)
    except BaseException:  # nothing of the run is left, its folder neither when it made it
        _discard(run.tmp_paths if run is not None else [], out_dir, created)
        raise
    return _result(run, support, cen, thr, scores, patches, published, t_start)


def _layer_source(examples, layer):
    """QGIS's ``path|layername=NAME`` source form → ``(path, NAME)``; anything else as it is."""
    if layer is None and "|layername=" in str(examples):
        examples, rest = str(examples).split("|layername=", 1)
        layer = rest.split("|")[0]
    return examples, layer


def _open_inputs(raster, examples, model, window, stride, batch_size, device, bands, features, rep, precision,
                 extent=None, mask=None):
    """The raster (its area of interest's subset when there is one), the example layer's existence, the model
    on its device (:func:`open_inference`), the cell grid and the feature runner: ``(ds, job, grid, runner,
    aoi)``."""
    from core.geo.aoi import area_of_interest
    from core.geo.raster import open_image

    ds = open_image(raster, rep.log)
    aoi = area_of_interest(ds, raster, extent, mask, rep.log)
    if aoi is not None:
        rep.log(aoi.describe(ds.RasterXSize, ds.RasterYSize))
        ds = aoi.subset(ds)
    if not Path(str(examples)).exists() and not str(examples).startswith("/vsi"):
        raise InputError(f"Example polygon layer not found: {examples}")
    job = open_inference(ds, raster, model, window=window, stride=stride, batch_size=batch_size, device=device,
                         bands=bands, rep=rep, precision=precision, untrained_note="its features are ImageNet backbone features through "
                         "a random head, and 'resembles' is not meaningful")
    grid = CellGrid(ds.RasterYSize, ds.RasterXSize)
    runner = FeatureRunner(job.lm.model, job.device, features, job.precision, rep.log)
    return ds, job, grid, runner, aoi


@dataclass
class _Run:
    """One findclass run between its steps: the arguments, the opened raster, model and examples, the
    output folder and the temporary files written so far (removed on failure)."""

    raster: object
    examples: object
    negative_field: Optional[str]
    clusters: int
    top_n: int
    patch: int
    mode: str
    features: str
    center: bool
    recall_target: float
    seed: int
    prefetch: bool
    rep: object
    job: InferenceJob
    grid: CellGrid
    runner: FeatureRunner
    reader: object
    polygons: list
    ex_info: dict
    out_dir: Path
    gt: Optional[Tuple[float, ...]] = field(init=False)
    srs: object = field(init=False)
    tmp_paths: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.gt = self.job.ds.GetGeoTransform(can_return_null=True)
        self.srs = self.job.ds.GetSpatialRef()

    def cell_features(self, cells, extra, progress) -> dict:
        """:func:`sample_cell_features` of this run's raster and model."""
        j = self.job
        return sample_cell_features(self.reader.read, j.plan, self.grid, self.runner, j.input["mean"],
                                    j.input["std"], j.batch, cells, extra, prefetch=self.prefetch, progress=progress)


def _log_start(run: _Run) -> None:
    info, grid, ds = run.ex_info, run.grid, run.job.ds
    run.rep.log(f"{run.raster}: {ds.RasterXSize} x {ds.RasterYSize} px, cell grid {grid.cols} x {grid.rows} "
                f"(stride {CELL}); {info['positive']} positive and {info['negative']} negative example polygon(s), "
                f"{info['support_cells']} support cells sampled; {run.job.batch} windows per batch, "
                f"{run.job.precision.reason}"
                + ("; polygons reprojected to the raster's CRS" if info["reprojected"] else ""))
    for p in run.polygons:
        if p.note:
            run.rep.log(f"example {p.fid}: {p.note}")


# -- 1. support ------------------------------------------------------------------------------------------
@dataclass
class _Support:
    """The support's features: ``groups_pos`` / ``groups_neg`` per polygon unit vectors float32 (n_p, C');
    ``fused_pos`` per positive polygon ``(fused (n_p, 256), z (n_p, C'))``; ``background`` float32 (C',)
    or None (not centred); ``windows`` run."""

    groups_pos: List[torch.Tensor]
    groups_neg: List[torch.Tensor]
    fused_pos: List[Tuple[torch.Tensor, torch.Tensor]]
    background: Optional[torch.Tensor]
    windows: int


def _support(run: _Run) -> _Support:
    """Step 1: the features of the support cells (and of a few evenly spread windows for the background
    mean), centred, normalised and grouped by polygon; cells on nodata are dropped.

    Raises:
        InputError: every positive support cell is on nodata.
    """
    plan = run.job.plan
    all_cells = np.concatenate([p.cells for p in run.polygons])
    windows = [(x, y) for y in plan.ys for x in plan.xs]
    extra = []
    if run.center:
        n_extra = min(len(windows), DEFAULTS["center_windows"])
        extra = [windows[int(i)] for i in np.linspace(0, len(windows) - 1, n_extra).round().astype(int)]
    sup = run.cell_features(all_cells, extra, lambda f: run.rep.progress(0.3 * f, "support features"))
    background = sup["background_z"] if run.center else None
    ok = sup["count"] > 0
    z_all = _normalise_z(sup["z"], background)
    groups_pos, groups_neg, fused_pos = [], [], []
    start = 0
    for p in run.polygons:
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
        raise InputError(f"{run.examples}: the positive example polygons fall only on nodata pixels of {run.raster}")
    return _Support(groups_pos, groups_neg, fused_pos, background, sup["windows"])


# -- 2. centroids ----------------------------------------------------------------------------------------
@dataclass
class _Centroids:
    """``cl``: the positive :class:`~core.findclass.prototypes.Clusters`; ``neg``: negative centroids
    float32 (Kn, C') or None; ``init``: the fused-space centroid of each cluster, float32 (K', 256), unit
    norm (what initialises the classifier row in the hand-off); ``support_cells``: positive cells."""

    cl: object
    neg: Optional[torch.Tensor]
    init: torch.Tensor
    support_cells: int


def _centroids(run: _Run, support: _Support) -> _Centroids:
    """Step 2: spherical k-means of the positive support (and of the negative one), and each cluster's
    centroid in the fused space."""
    z_pos = torch.cat(support.groups_pos)
    cl = spherical_kmeans(z_pos, run.clusters, seed=run.seed, **KMEANS_ARGS)
    for note in cl.notes:
        run.rep.log("clusters: " + note)
    neg = None
    if support.groups_neg:
        z_neg = torch.cat(support.groups_neg)
        neg = spherical_kmeans(z_neg, run.clusters, seed=run.seed, **KMEANS_ARGS).centroids
    fused_p = torch.cat([f for f, _ in support.fused_pos])
    init = F.normalize(cluster_sums(cl.labels, fused_p, cl.centroids.shape[0]), dim=1)
    return _Centroids(cl, neg, init, int(len(z_pos)))


# -- 3. calibration --------------------------------------------------------------------------------------
def _calibrate(run: _Run, support: _Support, cen: _Centroids) -> dict:
    """Step 3: the relevance threshold from the held-out support
    (:func:`~core.findclass.prototypes.calibrate_threshold`), logged."""

    def fit(x):
        return spherical_kmeans(x, run.clusters, seed=run.seed, **KMEANS_ARGS).centroids

    def score(z, protos):
        return relevance(z, protos, run.mode, cen.neg)[0]

    thr = calibrate_threshold(support.groups_pos, fit, score, run.recall_target, seed=run.seed)
    run.rep.log(f"threshold {thr['threshold']:.4f}: {thr['recall_target']:.0%} of the held-out support scores "
                f"above it ({thr['method']}, {thr['folds']} folds)")
    return thr


# -- 4. scoring ------------------------------------------------------------------------------------------
class _CellMaps:
    """The ``cell_fn`` of :func:`stream_cell_maps` for scoring: per cell the cosines to the Kp positive and
    Kn negative centroids and the model's logits (Kp + Kn + num_classes channels); it also sums the
    normalised fused feature of the cells predicted as each class (the classes' predicted prototypes)."""

    def __init__(self, lm, dev: torch.device, cen: _Centroids, background: Optional[torch.Tensor]):
        self.Kp = cen.cl.centroids.shape[0]
        self.Kn = 0 if cen.neg is None else cen.neg.shape[0]
        self.nc = nc = lm.num_classes
        self.cen = cen.cl.centroids.to(dev)
        self.negc = None if cen.neg is None else cen.neg.to(dev)
        self.clf_w = lm.model.head.classifier.weight.detach().float().flatten(1).to(dev)
        self.clf_b = lm.model.head.classifier.bias.detach().float().to(dev)
        self.proto_sum = torch.zeros((nc, self.clf_w.shape[1]), dtype=torch.float64)
        self.proto_n = torch.zeros(nc, dtype=torch.float64)
        self.bg = None if background is None else background.to(dev)

    @property
    def channels(self) -> int:
        """Kp + Kn + num_classes: the maps per cell."""
        return self.Kp + self.Kn + self.nc

    def __call__(self, block):
        z = block["z"]
        if self.bg is not None:
            z = z - self.bg.view(-1, 1, 1)
        z = F.normalize(z, dim=0, eps=1e-6)
        sims = [torch.einsum("chw,kc->khw", z, self.cen)]
        if self.negc is not None:
            sims.append(torch.einsum("chw,kc->khw", z, self.negc))
        fused = block["fused"]
        logits = torch.einsum("chw,kc->khw", fused, self.clf_w) + self.clf_b.view(-1, 1, 1)
        pred = logits.argmax(0).flatten()
        fn = F.normalize(fused, dim=0, eps=1e-6).flatten(1).T.double().cpu()
        self.proto_sum.add_(cluster_sums(pred.cpu(), fn, self.nc))
        self.proto_n.add_(torch.bincount(pred.cpu(), minlength=self.nc).double())
        return torch.cat(sims + [logits], 0)

    def predicted_means(self) -> Optional[torch.Tensor]:
        """float32 (num_classes, 256) mean fused feature per predicted class (NaN rows: never predicted),
        or None when no cell was scored."""
        if float(self.proto_n.sum()) <= 0:
            return None
        pred_means = (self.proto_sum / self.proto_n.clamp_min(1.0)[:, None]).float()
        pred_means[self.proto_n == 0] = float("nan")
        return pred_means


@dataclass
class _Scores:
    """What scoring leaves: the patch ``scorer``, ``stats`` (cells scored / above the threshold), the
    class ``maps`` (predicted prototypes), the relevance raster (closed, not yet published) and the windows run."""

    scorer: PatchScorer
    stats: dict
    maps: _CellMaps
    relevance: object
    windows: int


def _relevance_raster(run: _Run, description: str):
    """The relevance GeoTIFF (float32, one band, the cell grid) under a temporary name (recorded in
    ``run.tmp_paths``): a :class:`~core.geo.raster.AtomicGeoTIFF`."""
    from osgeo import gdal

    from core.geo.raster import GTIFF_OPTIONS, AtomicGeoTIFF

    grid = run.grid
    rel = AtomicGeoTIFF(run.out_dir / RELEVANCE_NAME, None, 1, gdal.GDT_Float32, list(GTIFF_OPTIONS) + ["PREDICTOR=3"],
                        size=(grid.cols, grid.rows),
                        geotransform=None if run.gt is None else grid.geotransform(run.gt), srs=run.srs)
    run.tmp_paths.append(rel.tmp)
    rel_band = rel.band(1)
    rel_band.SetNoDataValue(NODATA)
    rel_band.SetDescription(description)
    return rel


def _score(run: _Run, support: _Support, cen: _Centroids, thr: dict) -> _Scores:
    """Step 4: the relevance of every cell (written to the relevance raster row by row), the patch
    scores and the classes' predicted prototypes, in one pass of the windows."""
    maps = _CellMaps(run.job.lm, run.job.device, cen, support.background)
    Kp, Kn = maps.Kp, maps.Kn
    rel = _relevance_raster(
        run, f"relevance ({run.mode} cosine to {Kp} centroid(s)); threshold {thr['threshold']:.4f}")
    scorer = PatchScorer(run.grid, run.patch // CELL)
    stats = {"cells": 0, "above": 0}

    def on_rows(r0, cell_maps):
        sims = cell_maps[:Kp]
        nan = ~np.isfinite(sims[0])
        s = np.nan_to_num(sims, nan=-2.0)
        cluster = s.argmax(0)
        r = s.max(0) if run.mode == "max" else s.mean(0)
        if Kn:
            s_neg = np.nan_to_num(cell_maps[Kp:Kp + Kn], nan=-2.0).max(0)
            r = r - np.clip(s_neg - r, 0.0, None)
        r = r.astype(np.float32)
        r[nan] = np.nan
        rel.write(1, np.where(nan, NODATA, r).astype(np.float32), 0, r0)
        stats["cells"] += int((~nan).sum())
        stats["above"] += int((r[~nan] >= thr["threshold"]).sum())
        scorer.add(r0, r, cluster)

    j = run.job
    sm = stream_cell_maps(run.reader.read, j.plan, run.grid, run.runner, j.input["mean"], j.input["std"], j.batch,
                          maps, maps.channels, on_rows, prefetch=run.prefetch,
                          progress=lambda f: run.rep.progress(0.3 + 0.65 * f, "relevance"))
    rel.close()  # a full disk fails here, before anything is published
    return _Scores(scorer, stats, maps, rel, sm["windows"])


# -- 5. ranking ------------------------------------------------------------------------------------------
def _rank(run: _Run, scores: _Scores, thr: dict):
    """Step 5: the patches worth reviewing (not mostly covered by the examples, at least a quarter valid)
    and the review list (:func:`~core.findclass.candidates.order_candidates`): ``(patches, ranked)``."""
    grid = run.grid
    pc = run.patch // CELL
    known = {}
    for p in run.polygons:
        pr, pcl = p.covered[:, 0] // pc, p.covered[:, 1] // pc
        for key, n in zip(*np.unique(pr * 1_000_000 + pcl, return_counts=True)):
            known[int(key)] = known.get(int(key), 0) + int(n)
    patches = []
    for pt in scores.scorer.patches:
        cells_in = min(pc, grid.rows - pt.row * pc) * min(pc, grid.cols - pt.col * pc)
        pt.known = known.get(pt.row * 1_000_000 + pt.col, 0) / max(1, cells_in)
        if pt.known < DEFAULTS["exclude_share"] and pt.valid >= 0.25:
            patches.append(pt)
    return patches, order_candidates(patches, run.top_n, thr["threshold"])


# -- 6. publishing ---------------------------------------------------------------------------------------
def _run_meta(run: _Run, support: _Support, cen: _Centroids, thr: dict) -> dict:
    """The run's parameters, threshold and centroids, stored with the candidates for the hand-off."""
    neg, background = cen.neg, support.background
    return {
        "format": "srmf-findclass", "version": 1,
        "raster": str(Path(str(run.raster)).resolve()), "examples": str(Path(str(run.examples)).resolve()),
        "layer": run.ex_info["layer"], "negative_field": run.negative_field, "model": str(run.job.lm.path),
        "features": run.features, "mode": run.mode, "center": run.center, "cell": CELL, "patch": run.patch,
        "threshold": thr, "clusters": [{"cluster": i + 1, "size": s} for i, s in enumerate(cen.cl.sizes)],
        "centroids": cen.cl.centroids.tolist(), "init_centroids": cen.init.tolist(),
        "negative_centroids": None if neg is None else neg.tolist(),
        "background": None if background is None else background.tolist(),
        "seed": run.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _publish(run: _Run, support: _Support, cen: _Centroids, thr: dict, scores: _Scores, ranked) -> dict:
    """Step 6: the candidates GeoPackage, "resembles" (logged), then both outputs moved to their names.
    Returns ``{"candidates": rows written, "resembles": [...]}``."""
    out_dir = run.out_dir
    gpkg_tmp = str(partial_path(out_dir / CANDIDATES_NAME))
    os.unlink(gpkg_tmp)  # the GeoPackage driver creates the file itself
    run.tmp_paths.append(gpkg_tmp)
    cand_rows = write_candidates(gpkg_tmp, ranked, run.grid, run.patch // CELL, run.gt, run.srs,
                                 _run_meta(run, support, cen, thr), name=out_dir / CANDIDATES_NAME)
    lm = run.job.lm
    res_cls = resembles(cen.init, lm.model, lm.classes, scores.maps.predicted_means())
    run.rep.log("resembles: " + ", ".join(
        f"{d['name']} (cosine {d['predicted_cosine'] if d['predicted_cosine'] is not None else 'n/a'} to its "
        f"predicted-cell prototype, {d['classifier_cosine']} to its classifier row)" for d in res_cls))
    scores.relevance.publish()
    if (out_dir / CANDIDATES_NAME).exists():
        (out_dir / CANDIDATES_NAME).unlink()
    os.replace(gpkg_tmp, out_dir / CANDIDATES_NAME)
    return {"candidates": cand_rows, "resembles": res_cls}


def _discard(tmp_paths: Sequence[str], out_dir: Path, created: bool) -> None:
    """Remove the temporary outputs (and their GDAL/SQLite side files), and the folder when created."""
    for t in tmp_paths:
        for f in (t, t + ".aux.xml", t + "-wal", t + "-shm", t + "-journal"):
            if os.path.exists(f):
                os.unlink(f)
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)


def _result(run: _Run, support: _Support, cen: _Centroids, thr: dict, scores: _Scores, patches, published: dict,
            t_start: float) -> dict:
    """The JSON-able result of :func:`find_class` (progress "done"; the share above the threshold logged)."""
    run.rep.progress(1.0, "done")
    gt, srs, stats, grid, cl, ds = run.gt, run.srs, scores.stats, run.grid, cen.cl, run.job.ds
    from core.geo.raster import crs_label

    pix_area = None
    if gt is not None and srs is not None and not srs.IsGeographic():
        pix_area = abs(gt[1] * gt[5] - gt[2] * gt[4]) * srs.GetLinearUnits() ** 2
    above_share = stats["above"] / max(1, stats["cells"])
    run.rep.log(f"{stats['above']} of {stats['cells']} cells ({above_share:.1%}) score at or above the threshold")
    seconds = time.perf_counter() - t_start
    out_dir, lm = run.out_dir, run.job.lm
    return {
        "output_dir": str(out_dir), "relevance": str(out_dir / RELEVANCE_NAME),
        "candidates": str(out_dir / CANDIDATES_NAME), "model": str(lm.path), "untrained_model": lm.untrained,
        "raster": str(run.raster), "width": ds.RasterXSize, "height": ds.RasterYSize,
        "relevance_width": grid.cols, "relevance_height": grid.rows,
        "crs": crs_label(srs), "cell": CELL, "patch": run.patch, "mode": run.mode, "features": run.features,
        "center": run.center, "examples": {k: v for k, v in run.ex_info.items()},
        "support_cells": cen.support_cells, "negative_cells": int(sum(len(g) for g in support.groups_neg)),
        "clusters": {"requested": cl.k_requested, "used": cl.k_used, "kept": len(cl.sizes), "sizes": cl.sizes,
                     "dropped": cl.dropped, "objective": round(cl.objective, 4), "notes": cl.notes},
        "negative_clusters": scores.maps.Kn,
        "threshold": thr,
        "cells_above_threshold": stats["above"], "cells_scored": stats["cells"],
        "share_above_threshold": round(above_share, 6),
        "area_above_threshold_m2": None if pix_area is None else stats["above"] * pix_area * CELL * CELL,
        "resembles": published["resembles"],
        "patches_scored": len(scores.scorer.patches),
        "patches_excluded_as_examples": len(scores.scorer.patches) - len(patches),
        "candidates_written": len(published["candidates"]), "candidate_patches": published["candidates"],
        "device": str(run.job.device), "precision": run.runner.precision.name,
        "precision_agreement": run.runner.run.agreement, "windows": scores.windows + support.windows, "seconds": round(seconds, 3),
    }
