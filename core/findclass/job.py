"""Cold-start class discovery: "I have a new class and a few example polygons — where else is it?"

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
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
import numpy as np
import torch
import torch.nn.functional as F
from core.errors import InputError
from core.findclass.candidates import PatchScorer, _write_candidates, order_candidates
from core.findclass.params import CANDIDATES_NAME
from core.findclass.cells import CellGrid, FeatureRunner, sample_cell_features, stream_cell_maps
from core.findclass.params import CELL, FEATURE_SPACES
from core.findclass.examples import read_examples
from core.findclass.prototypes import _cluster_sums, calibrate_threshold, relevance, spherical_kmeans
from core.findclass.params import MODES
from core.findclass.params import DEFAULTS, NODATA, RELEVANCE_NAME
from core.files import check_writable_folder, partial_path
# clusters: 1 (one mean prototype) won the leave-one-class-out evaluation (README, bench/coldstart.py)


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
               reporter=None, prefetch: bool = True) -> dict:
    """Find where a new class occurs from a few example polygons (CAT, arXiv 2308.02844 Sec. 3).

    Args:
        raster: any raster GDAL reads. examples: a polygon layer (any OGR format; ``layer``, or QGIS's
            ``path|layername=NAME`` form, picks one of several) with the example polygons, in any CRS. output_dir: folder for ``relevance.tif`` and
            ``candidates.gpkg`` (created when missing).
        model: ``.srmf`` path or :class:`~core.model.modelfile.LoadedModel` (default: the embedded model).
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

    from core.protocol import Reporter
    from core.geo.raster import StripReader, compute_scaling, crs_label, open_raster, select_bands
    from core.device import DEFAULT_BATCH, resolve_device
    from core.windows import SlidePlan, load_job_model, validate_window

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
        rel_tmp = str(partial_path(out_dir / RELEVANCE_NAME))
        tmp_paths.append(rel_tmp)
        from core.geo.raster import GTIFF_OPTIONS

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
        gpkg_tmp = str(partial_path(out_dir / CANDIDATES_NAME))
        os.unlink(gpkg_tmp)  # the GeoPackage driver creates the file itself
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
