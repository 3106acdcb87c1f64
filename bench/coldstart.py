"""Evaluation of cold-start class discovery (CAT) and of the contrastive option on the real Dubai tiles.

Usage (from the repository root)::

    python -m bench.coldstart [--classes building,road,vegetation,water] [--ks 1,3,5,10] [--draws 3]
        [--cat-k 1,3,5] [--budgets 50,100,200] [--patch 64]
        [--loco-iterations 0 | N] [--model CLASS=PATH ...] [--base-model PATH]
        [--contrastive-iterations N] [--contrastive-weight 0.1] [--contrastive-temperature 0.1]
        [--train-tiles ...] [--val-tile tile_3] [--val-parts ...] [--crop 256] [--batch-size 8]
        [--device auto] [--out-dir bench-output] [--quick]

Issue 5, item 3. Data: the Dubai aerial set (``../shared/data/dubai_hitl_aerial``), training tiles 1, 2, 5,
6, 7, 8 and the validation tile 3 (as :mod:`core.recipes`); ``tile_7/image_part_008`` (incomplete
label) is left out of training.

1. **Leave-one-class-out** (per class in ``--classes``): a model that has never been taught the class —
   fine-tuned for ``--loco-iterations`` on the training tiles with the class merged into "ignore"
   (255), or given with ``--model CLASS=PATH``; with ``--loco-iterations 0`` the base model is used as
   is (the embedded placeholder: ImageNet backbone + random head, which has never seen any label).
   Then k ∈ ``--ks`` example components of the class are drawn from the training tiles (connected
   components of its mask of at least ``--min-component`` px, ``--draws`` seeded draws per k); each
   component is an "example polygon": its cells on the stride-4 grid, eroded by one cell, capped at
   400 (as :func:`core.findclass.examples.read_examples`). Every method scores every cell of the validation
   tile on the same features (fused map, centred by the validation tile's mean feature, as findclass
   centres by the searched raster's):

   - ``CAT-K``: spherical k-means centroids (K in ``--cat-k``), max cosine;
   - ``prototype``: one mean prototype; ``NN``: nearest neighbour (max cosine to any support cell);
   - ``random``: random order.

   Patches of ``--patch`` px are scored as findclass scores them (mean relevance of the best quarter
   of their cells) and pooled over the validation images. A patch is positive when the class covers at
   least ``--positive-share`` (default a quarter) of its labelled pixels: at 0.8 m a 64 px patch is 51 m
   wide, and a road rarely fills half of one. Figures: **AUPRC** (average precision) over the patches,
   **recall at review budgets** (share of the positive patches among the top B), and **IoU** of the
   cells at or above the leave-one-polygon-out threshold (:func:`core.findclass.prototypes.calibrate_threshold`,
   recall target 0.9) against the cells of the class (cell = its centre pixel's label; 255 ignored).
   Mean ± standard deviation over the draws.

2. **Contrastive option vs plain SRMF** at the same budget: two models trained from the same
   ImageNet initialisation (EfficientNet-Lite0 + MiniLM text bank, :func:`core.recipes.default_config`
   recipe), one with ``contrastive_weight`` > 0; per-class IoU, mIoU and tail-class mIoU
   (:func:`core.metrics.metrics_from_confusion`: classes below the median frequency) on the
   validation tile.

Results: Markdown tables on standard output and ``<out-dir>/coldstart-bench.{md,json}`` (written after
each part). ``--quick``: a smoke run (training tile 2 for the examples and the fine-tunes, validation
parts 1-3 of tile 3, 2 draws, k ∈ {1, 3}, 8-iteration fine-tunes at 128 px): its figures only show
that the harness runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
METHOD_NAMES = ("prototype", "NN", "random")


def _csv(text: Optional[str]) -> List[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


# -- data --------------------------------------------------------------------------------------------------
def load_data(train_tiles: Sequence[str], val_tile: str, val_parts: Optional[Sequence[int]]):
    from core.finetune.sources import load_dubai

    train = load_dubai(list(train_tiles), exclude_bad=True)
    val = load_dubai([val_tile], parts=val_parts)
    return train, val


def components(train, class_id: int, min_px: int) -> List[dict]:
    """Connected components (8-connected) of a class in the training images, at least ``min_px`` px."""
    from scipy import ndimage

    out = []
    for i, im in enumerate(train):
        lab, n = ndimage.label(im.label == class_id, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        for j in np.nonzero(sizes >= min_px)[0]:
            if j == 0:
                continue
            out.append({"image": i, "label": int(j), "px": int(sizes[j])})
    return out


def component_cells(mask: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """The cells of a pixel mask on the stride-4 grid (centre pixel inside), eroded by one cell (kept
    as is when that empties it), capped at ``cap`` (random subset) — as findclass samples a polygon."""
    from scipy import ndimage

    from core.findclass.cells import CellGrid

    g = CellGrid(*mask.shape)
    m = mask[np.floor(g.cy).astype(int)][:, np.floor(g.cx).astype(int)]
    e = ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), border_value=0)
    if not e.any():
        e = m
    cells = np.argwhere(e)
    if len(cells) > cap:
        cells = cells[np.sort(rng.choice(len(cells), cap, replace=False))]
    return cells


class FeatureCache:
    """Every cell's fused features of whole images, computed once per (model, image)."""

    def __init__(self, model, mean, std, device: str, window: int = 512, stride: int = 341):
        self.model, self.mean, self.std, self.device = model, mean, std, device
        self.window, self.stride = window, stride
        self.cache: Dict[str, "torch.Tensor"] = {}
        self.seconds = 0.0

    def __call__(self, im):
        from core.findclass.cells import image_cell_features

        if im.name not in self.cache:
            t = time.perf_counter()
            f = image_cell_features(im.image, self.model, self.mean, self.std, window=self.window,
                                    stride=self.stride, device=self.device)
            self.cache[im.name] = f["fused"]
            self.seconds += time.perf_counter() - t
        return self.cache[im.name]


# -- metrics -----------------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the precision-recall curve as average precision (Σ ΔR · P at each positive)."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / n_pos)


def recall_at(scores: np.ndarray, positive: np.ndarray, budget: int) -> Optional[float]:
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")[:budget]
    return float(positive[order].sum() / n_pos)


def patch_table(val, class_id: int, patch: int, share: float = 0.25):
    """Per validation patch: (image index, row, col) and whether the class covers at least ``share`` of its
    labelled pixels."""
    keys, pos = [], []
    for i, im in enumerate(val):
        H, W = im.label.shape
        for r, y in enumerate(range(0, H, patch)):
            for c, x in enumerate(range(0, W, patch)):
                lab = im.label[y:y + patch, x:x + patch]
                lab = lab[lab != 255]
                if lab.size == 0:
                    continue
                keys.append((i, r, c))
                pos.append(float((lab == class_id).mean()) >= share)
    return keys, np.array(pos, dtype=bool)


def patch_scores(rel_maps: Sequence[np.ndarray], keys, pc: int) -> np.ndarray:
    """Mean of the best quarter of each patch's cells (as findclass's PatchScorer)."""
    out = np.empty(len(keys), dtype=np.float64)
    for n, (i, r, c) in enumerate(keys):
        v = rel_maps[i][r * pc:(r + 1) * pc, c * pc:(c + 1) * pc].ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[n] = -np.inf
            continue
        k = max(1, int(np.ceil(0.25 * v.size)))
        out[n] = np.partition(v, v.size - k)[v.size - k:].mean()
    return out


def cell_truth(val, class_id: int):
    from core.findclass.cells import CellGrid

    out = []
    for im in val:
        g = CellGrid(*im.label.shape)
        out.append(im.label[np.floor(g.cy).astype(int)][:, np.floor(g.cx).astype(int)])
    return out


# -- leave-one-class-out -----------------------------------------------------------------------------------
def evaluate_class(class_id: int, class_name: str, train, val, feats: FeatureCache, args, rep) -> List[dict]:
    """All methods, ks and draws for one held-out class on one model's features."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    from core.findclass.prototypes import calibrate_threshold, fit_prototypes, relevance

    comps = components(train, class_id, args.min_component)
    if not comps:
        rep(f"{class_name}: no component of at least {args.min_component} px in the training tiles; skipped")
        return []
    val_feats = [feats(im) for im in val]
    C = val_feats[0].shape[0]
    flat = torch.cat([f.reshape(C, -1) for f in val_feats], 1)
    background = torch.nanmean(flat, dim=1)
    val_z = [F.normalize(f.reshape(C, -1).T - background, dim=1) for f in val_feats]
    shapes = [f.shape[1:] for f in val_feats]
    keys, positive = patch_table(val, class_id, args.patch, args.positive_share)
    truth = cell_truth(val, class_id)
    pc = args.patch // 4
    rows = []
    methods = [f"CAT-{k}" for k in args.cat_k] + list(METHOD_NAMES)
    for k in args.ks:
        if k > len(comps):
            rep(f"{class_name}: only {len(comps)} components, k={k} skipped")
            continue
        for d in range(args.draws):
            rng = np.random.default_rng([args.seed, class_id, k, d])
            pick = rng.choice(len(comps), k, replace=False)
            groups = []
            for j in pick:
                comp = comps[int(j)]
                im = train[comp["image"]]
                lab, _ = ndimage.label(im.label == class_id, structure=np.ones((3, 3), bool))
                cells = component_cells(lab == comp["label"], 400, rng)
                f = feats(im)
                z = f[:, torch.from_numpy(cells[:, 0]), torch.from_numpy(cells[:, 1])].T
                z = z[torch.isfinite(z).all(1)]
                if len(z):
                    groups.append(F.normalize(z - background, dim=1))
            if not groups:
                continue
            support = torch.cat(groups)
            for m in methods:
                t0 = time.perf_counter()
                if m.startswith("CAT-"):
                    K = int(m.split("-")[1])
                    fit = lambda s, K=K: fit_prototypes(s, "cat", k=K, seed=d)  # noqa: E731
                elif m == "prototype":
                    fit = lambda s: fit_prototypes(s, "prototype")  # noqa: E731
                elif m == "NN":
                    fit = lambda s: fit_prototypes(s, "nn", seed=d)  # noqa: E731
                else:
                    fit = None
                if fit is None:
                    srng = np.random.default_rng([args.seed, class_id, k, d, 99])
                    scores = srng.random(len(keys))
                    iou, thr = None, None
                    n_protos = 0
                else:
                    protos = fit(support)
                    n_protos = int(protos.shape[0])
                    rel = [relevance(z, protos)[0].numpy().reshape(tuple(s)) for z, s in zip(val_z, shapes)]
                    scores = patch_scores(rel, keys, pc)
                    thr = calibrate_threshold(groups, fit, lambda z, p: relevance(z, p)[0], 0.9, seed=d)["threshold"]
                    inter = union = 0
                    for r, tr in zip(rel, truth):
                        ok = tr != 255
                        pred = (r >= thr) & ok
                        gt = (tr == class_id) & ok
                        inter += int((pred & gt).sum())
                        union += int((pred | gt).sum())
                    iou = inter / union if union else None
                row = {"class": class_name, "k": int(k), "draw": d, "method": m, "prototypes": n_protos,
                       "support_cells": int(len(support)), "auprc": average_precision(scores, positive),
                       "positive_patches": int(positive.sum()), "patches": int(len(keys)),
                       "iou_at_threshold": iou, "threshold": thr, "seconds": round(time.perf_counter() - t0, 3)}
                for b in args.budgets:
                    row[f"recall@{b}"] = recall_at(scores, positive, b)
                rows.append(row)
    return rows


def summarise(rows: List[dict], budgets: Sequence[int]) -> List[dict]:
    """Mean ± std over draws per (class, k, method)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["class"], r["k"], r["method"]), []).append(r)
    out = []
    for (cls, k, m), rs in groups.items():
        s = {"class": cls, "k": k, "method": m, "draws": len(rs)}
        for key in ["auprc"] + [f"recall@{b}" for b in budgets] + ["iou_at_threshold"]:
            v = [r[key] for r in rs if r[key] is not None]
            s[key] = None if not v else float(np.mean(v))
            s[key + "_std"] = None if len(v) < 2 else float(np.std(v))
        out.append(s)
    return out


def loco_markdown(summary: List[dict], budgets: Sequence[int]) -> str:
    def f(v, sd):
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    cols = ["AUPRC"] + [f"R@{b}" for b in budgets] + ["IoU@thr"]
    keys = ["auprc"] + [f"recall@{b}" for b in budgets] + ["iou_at_threshold"]
    lines = ["| class | k | method | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for s in sorted(summary, key=lambda s: (s["class"], s["k"], s["method"])):
        lines.append(f"| {s['class']} | {s['k']} | {s['method']} | "
                     + " | ".join(f(s[k], s[k + '_std']) for k in keys) + " |")
    return "\n".join(lines)


def best_method(summary: List[dict]) -> Dict[str, float]:
    """Mean AUPRC of each method over classes and ks (what decides CAT's default K)."""
    acc: Dict[str, List[float]] = {}
    for s in summary:
        if s["auprc"] is not None:
            acc.setdefault(s["method"], []).append(s["auprc"])
    return {m: float(np.mean(v)) for m, v in sorted(acc.items(), key=lambda kv: -np.mean(kv[1]))}


def paired_comparison(rows: List[dict], reference: str = "prototype", resamples: int = 10000,
                      seed: int = 0) -> Dict[str, dict]:
    """Each method's AUPRC minus the ``reference`` method's on the same (class, k, draw) — the same support
    and the same features, so the pairing removes the draw-to-draw spread: mean difference, its 95 %
    bootstrap interval (``resamples`` resamples of the pairs), wins/ties/losses and the number of pairs."""
    by_key: Dict[tuple, Dict[str, float]] = {}
    for r in rows:
        if r["auprc"] is not None:
            by_key.setdefault((r["class"], r["k"], r["draw"]), {})[r["method"]] = r["auprc"]
    rng = np.random.default_rng(seed)
    out = {}
    methods = sorted({m for v in by_key.values() for m in v} - {reference})
    for m in methods:
        d = np.array([v[m] - v[reference] for v in by_key.values() if m in v and reference in v])
        if not len(d):
            continue
        boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
        out[m] = {"mean_difference": float(d.mean()), "ci95": [float(np.quantile(boot, 0.025)),
                                                              float(np.quantile(boot, 0.975))],
                  "wins": int((d > 1e-12).sum()), "ties": int((np.abs(d) <= 1e-12).sum()),
                  "losses": int((d < -1e-12).sum()), "pairs": int(len(d))}
    return out


def paired_markdown(paired: Dict[str, dict], reference: str = "prototype") -> str:
    lines = [f"| method | AUPRC − {reference} (mean) | 95 % bootstrap interval | wins / ties / losses |",
             "|---|---|---|---|"]
    for m, p in sorted(paired.items(), key=lambda kv: -kv[1]["mean_difference"]):
        lines.append(f"| {m} | {p['mean_difference']:+.4f} | [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] | "
                     f"{p['wins']} / {p['ties']} / {p['losses']} |")
    return "\n".join(lines)


# -- training ----------------------------------------------------------------------------------------------
def train_model(out: Path, train, val, classes: List[dict], args, *, iterations: int, contrastive_weight: float = 0.0,
                seed: int = 0, rep=None) -> dict:
    """Fine-tune a fresh SRMF (ImageNet EfficientNet-Lite0 + MiniLM text bank) with the recipe's optimiser,
    validating once at the end; returns the finetune result."""
    import io

    from core.finetune.job import finetune
    from core.model.modelfile import DEFAULT_INPUT
    from core.protocol import Reporter
    from bench.recipes import DUBAI_GSD_M, _BaseStub, default_config

    config = default_config(iterations=iterations, batch_size=args.batch_size, crop=args.crop,
                            eval_interval=iterations, checkpoint_interval=iterations, seed=seed,
                            warmup_iterations=max(1, iterations // 10), log_interval=max(1, iterations // 5),
                            contrastive_weight=contrastive_weight,
                            contrastive_temperature=args.contrastive_temperature)
    arch = {"backbone": "efficientnet_lite0", "text_fusion": not args.no_text, "encoder_weights": "imagenet",
            "text_encoder": "minilm", "gsd_m": DUBAI_GSD_M}
    base = _BaseStub({"input": DEFAULT_INPUT, "classes": classes})
    reporter = Reporter(json_mode=True, stream=io.StringIO())
    import torch

    torch.manual_seed(seed)  # the fresh head's initialisation: the same for every model of a comparison
    return finetune(out, images=train, classes=classes, base_model=base, config=config, device=args.device,
                    val_images=val, overwrite=True, reporter=reporter, architecture=arch)


def without_class(images, class_id: int):
    """Labels with ``class_id`` merged into ignore (255) and the ids above it shifted down by one."""
    lut = np.arange(256, dtype=np.uint8)
    lut[class_id] = 255
    lut[class_id + 1:255] = np.arange(class_id, 254, dtype=np.uint8)
    return [dataclasses.replace(im, label=lut[im.label]) for im in images]


def contrastive_comparison(train, val, args, rep, out_dir: Path) -> dict:
    from core.classtable import dubai_class_table
    from core.metrics import metrics_from_confusion
    from core.model.modelfile import read_header

    classes = [dict(c) for c in dubai_class_table().to_header()]
    names = [c["name"] for c in classes]
    res = {}
    for label, w in (("plain SRMF", 0.0), (f"SRMF + contrastive (w={args.contrastive_weight})", args.contrastive_weight)):
        t = time.perf_counter()
        rep(f"contrastive comparison: training {label} for {args.contrastive_iterations} iterations")
        r = train_model(out_dir / f"contrastive_{'on' if w else 'off'}.srmf", train, val, classes, args,
                        iterations=args.contrastive_iterations, contrastive_weight=w, seed=args.seed)
        cm = read_header(r["output"])["metrics"]["validation_confusion_matrix"]
        m = metrics_from_confusion(np.array(cm), names)
        res[label] = {"miou": m["miou"], "tail_miou": m["tail_miou"], "tail_classes": m["tail_classes"],
                      "per_class_iou": {pc["name"]: pc["iou"] for pc in m["per_class"]},
                      "iterations": r["iterations"], "seconds": round(time.perf_counter() - t, 1),
                      "last_loss": r["last_loss"]}
    return res


def contrastive_markdown(res: dict) -> str:
    if not res:
        return ""
    names = list(next(iter(res.values()))["per_class_iou"])
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | " + " | ".join(names) + " | mIoU | tail mIoU (tail classes) | iterations | time (s) |",
             "|" + "---|" * (len(names) + 5)]
    for label, r in res.items():
        lines.append(f"| {label} | " + " | ".join(f(r["per_class_iou"][n]) for n in names)
                     + f" | {f(r['miou'])} | {f(r['tail_miou'])} ({', '.join(r['tail_classes'])}) | "
                     f"{r['iterations']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="building,road,vegetation,water", help="classes held out in turn")
    ap.add_argument("--ks", default="1,3,5,10", help="example components per draw")
    ap.add_argument("--draws", type=int, default=3, help="seeded draws per k")
    ap.add_argument("--cat-k", default="1,3,5", help="K values of CAT (1 = spherical k-means with one centroid)")
    ap.add_argument("--budgets", default="50,100,200", help="review budgets (patches) for recall")
    ap.add_argument("--patch", type=int, default=64, help="patch size in pixels")
    ap.add_argument("--positive-share", type=float, default=0.25,
                    help="a patch is positive when the class covers at least this share of its labelled pixels")
    ap.add_argument("--min-component", type=int, default=256, help="smallest example component, pixels")
    ap.add_argument("--loco-iterations", type=int, default=0,
                    help="fine-tune iterations of each leave-one-class-out model (0: use --base-model as is)")
    ap.add_argument("--model", action="append", default=[], help="CLASS=PATH: a ready leave-one-class-out model")
    ap.add_argument("--base-model", default=None, help="model for --loco-iterations 0 (default: the embedded one)")
    ap.add_argument("--contrastive-iterations", type=int, default=300, help="budget of each model (0: skip)")
    ap.add_argument("--contrastive-weight", type=float, default=0.1)
    ap.add_argument("--contrastive-temperature", type=float, default=0.1)
    ap.add_argument("--train-tiles", default="tile_1,tile_2,tile_5,tile_6,tile_7,tile_8")
    ap.add_argument("--val-tile", default="tile_3")
    ap.add_argument("--val-parts", default=None, help="parts of the validation tile (default all 9)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-text", action="store_true", help="train without the text bank")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="bench-output")
    ap.add_argument("--quick", action="store_true", help="smoke run (see the module docstring)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_tiles, args.val_parts, args.draws, args.ks = "tile_2", "1,2,3", 2, "1,3"
        args.cat_k, args.crop, args.batch_size = "1,3", 128, 4
        args.contrastive_iterations = min(args.contrastive_iterations, 8)
        args.loco_iterations = min(args.loco_iterations, 8)
    args.ks = [int(k) for k in _csv(args.ks)]
    args.cat_k = [int(k) for k in _csv(args.cat_k)]
    args.budgets = [int(b) for b in _csv(args.budgets)]
    if args.patch % 4 or args.patch < 8:
        ap.error("--patch must be a multiple of 4, at least 8")

    import torch

    from core.classtable import dubai_class_table
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model
    from core.device import resolve_device

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def rep(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    dev = str(resolve_device(args.device))
    train, val = load_data(_csv(args.train_tiles), args.val_tile,
                           [int(p) for p in _csv(args.val_parts)] if args.val_parts else None)
    rep(f"data: {len(train)} training images ({args.train_tiles}), {len(val)} validation images ({args.val_tile})")
    table = dubai_class_table()
    ready = dict(m.split("=", 1) for m in args.model)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": dev, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "args": {k: v for k, v in vars(args).items()}, "loco": [], "loco_summary": [], "contrastive": {}}

    def write():
        md = ["# bench.coldstart", "", f"device {dev}, torch {torch.__version__}, {report['threads']} threads; "
              f"train tiles {args.train_tiles}, validation {args.val_tile}"
              + (f" parts {args.val_parts}" if args.val_parts else "") + ("; QUICK smoke run" if args.quick else ""),
              "", "## Leave-one-class-out (patch level, pooled over the validation images)", "",
              loco_markdown(report["loco_summary"], args.budgets), "",
              "Mean AUPRC per method: " + json.dumps(best_method(report["loco_summary"])), "",
              "Paired against one prototype (same class, k, draw):", "",
              paired_markdown(paired_comparison(report["loco"])), "",
              "## Contrastive option vs plain SRMF", "", contrastive_markdown(report["contrastive"])]
        (out_dir / "coldstart-bench.md").write_text("\n".join(md) + "\n")
        (out_dir / "coldstart-bench.json").write_text(json.dumps(report, indent=2, default=str))
        return "\n".join(md)

    base = None
    caches: Dict[int, FeatureCache] = {}
    for name in _csv(args.classes):
        cid = table.index(name)
        if name in ready:
            lm = load_model(ready[name])
            how = f"given model {ready[name]}"
        elif args.loco_iterations > 0:
            keep = [dict(c) for c in table.to_header() if c["id"] != cid]
            rep(f"{name}: fine-tuning a model with {name} merged into ignore ({args.loco_iterations} iterations)")
            r = train_model(out_dir / f"loco_without_{name}.srmf", without_class(train, cid), without_class(val, cid),
                            keep, args, iterations=args.loco_iterations, seed=args.seed)
            lm = load_model(r["output"])
            how = f"fine-tuned {r['iterations']} iterations without {name}"
        else:
            if base is None:
                base = load_model(args.base_model or DEFAULT_MODEL_PATH)
            lm = base
            how = f"base model {lm.path.name} as is (untrained head: {lm.untrained})"
        rep(f"{name}: features from {how}")
        if id(lm) not in caches:  # one cache per model: the base model's features serve every class
            # only the current model's features are kept: a model's cache of the whole training and
            # validation tiles is ~10 GB (256 float32 channels at stride 4), so three would exhaust 24 GB
            caches.clear()
            caches[id(lm)] = FeatureCache(lm.model, lm.header["input"]["mean"], lm.header["input"]["std"], dev)
        feats = caches[id(lm)]
        rows = evaluate_class(cid, name, train, val, feats, args, rep)
        rep(f"{name}: {len(rows)} rows; feature extraction {feats.seconds:.0f} s")
        for r in rows:
            r["model"] = how
        report["loco"].extend(rows)
        report["loco_summary"] = summarise(report["loco"], args.budgets)
        write()
    if args.contrastive_iterations > 0:
        report["contrastive"] = contrastive_comparison(train, val, args, rep, out_dir)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print(write())
    rep(f"done in {report['seconds']:.0f} s; {out_dir / 'coldstart-bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
