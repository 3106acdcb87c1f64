"""Label-efficiency evaluation of self-supervised pretraining (issue 14): ``make eval-pretrain``.

``python -m bench.pretrain_eval [--out pretrain-eval] [--iterations 240] [--fractions 0.01,0.05,0.1]
[--draws 0,1,2] [--modes frozen,full] [--ft-iterations 40] [--val-parts 1,5,9] [--device auto] [--report]``

1. **Pool**: every Dubai image of ``../shared/data`` (all seven tiles, 63 JPEGs, about 91 MP) *without its
   mask*. The pool includes the evaluation tile's pixels, unlabelled: that is the product's use (an analyst
   pretrains on the imagery they will map).
2. **Arms at equal budget** (the same number of optimiser steps, the same seed, batch and views):
   E0 the ImageNet encoder (no pretraining); E1 ImageNet + SimCLR (``--method simclr``); E2 ImageNet + the
   same SimCLR warm-up (its first half: the same steps, seeds and learning rates as E1's) + GraSS's
   gradient-guided steps (``--method grass``). Seconds are reported: a GS step costs more.
3. **Mechanism check** (E1's final encoder and projection head, i.e. what GS sees after its warm-up): on
   windows of the *labelled* training tiles, are the GS crops purer (the share of the majority class of
   their labelled pixels) than random crops of the same size in the same views? How often do the two
   crops of a pair overlap (IoU > 0 in window pixels), against the two views themselves? A contact sheet
   (``contact_sheet.png``): views, their gradient maps, the boxes.
4. **Fine-tuning with few labels**: the labelled pixels of the training tiles (all but tile 3; the known
   bad label left out) are cut to random 128 px windows holding 1 %, 5 % or 10 % of them (a draw = a seed:
   the same windows for every arm), the rest ignored; each arm's encoder is fine-tuned (fresh SRMF head,
   the default model's recipe at ``--ft-iterations``) with the encoder frozen and fully, and scored on the
   held-out tile 3 (``--val-parts``). Noise floor: E0 fine-tuned again with another training seed on the
   same draws (mean |difference|).

Every run is appended to ``<out>/runs.jsonl`` when it ends (a finished run is skipped on a rerun: the grid
can be stopped and continued); ``--report`` prints the tables (``<out>/report.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_TILES = ["tile_1", "tile_2", "tile_5", "tile_6", "tile_7", "tile_8"]
VAL_TILE = "tile_3"
ARMS = ("E0", "E1", "E2")
FT_WINDOW = 128


def _dubai_images():
    from core.finetune.sources import dubai_root

    return sorted(str(p) for p in dubai_root().glob("tile_*/images/*.jpg"))


def pretrain_arms(out: Path, iterations: int, seed: int, rep, device: str = "auto") -> dict:
    """The three encoders as model files in ``out`` (E0 written directly; E1, E2 by ``pretrain``)."""
    from core.model.modelfile import save_model
    from core.pretrain.config import PretrainConfig
    from core.pretrain.job import pretrain, starting_model

    paths = {a: out / f"{a}.srmf" for a in ARMS}
    if not paths["E0"].exists():
        model, header, note = starting_model(None, seed)
        save_model(paths["E0"], model, {**header, "provenance": {"untrained_head": True, "note": f"E0: {note}"},
                                        "pretraining": {"method": "none", "iterations": 0, "started_from": note}})
    for arm, method in (("E1", "simclr"), ("E2", "grass")):
        if paths[arm].exists():
            continue
        config = PretrainConfig(method=method, iterations=iterations, warmup_iterations=iterations // 2,
                                checkpoint_interval=max(1, iterations // 4), seed=seed)
        resume = (out / f"{arm}.srmf.work" / "checkpoint.safetensors").exists()
        pretrain(paths[arm], rasters=_dubai_images(), config=config, resume=resume, reporter=rep, keep_work_dir=True,
                 device=device)
    return paths


def mechanism_check(out: Path, n_windows: int = 48, seed: int = 7, sign: str = "loss") -> dict:
    """GS crops against random crops of the same size (purity), and pair overlap, on labelled windows; the
    maps of dL/dF (``sign="loss"``, the reference's) or of -dL/dF (``"negative"``). The same windows for both
    signs (same seed)."""
    import torch

    from core.checkpoint import load_checkpoint
    from core.finetune.sources import load_dubai
    from core.losses import nt_xent
    from core.model.modelfile import load_model
    from core.pretrain.grass import ProjectionHead, gradient_guided_boxes
    from core.pretrain.views import box_in_window, box_iou, purity, simclr_views

    lm = load_model(out / "E1.srmf")
    net = torch.nn.ModuleDict({"encoder": lm.model.encoder, "projector": ProjectionHead(lm.model.encoder.out_channels[-1])})
    opt = torch.optim.AdamW(net.parameters())
    load_checkpoint(out / "E1.srmf.work" / "checkpoint.safetensors", net, opt)
    net.train()
    mean, std = lm.header["input"]["mean"], lm.header["input"]["std"]
    images = load_dubai(TRAIN_TILES, exclude_bad=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    patch, view = 448, 224
    wins, labs = [], []
    while len(wins) < n_windows:
        im = images[int(rng.integers(len(images)))]
        H, W = im.label.shape
        y, x = int(rng.integers(H - patch + 1)), int(rng.integers(W - patch + 1))
        lab = im.label[y:y + patch, x:x + patch]
        if (lab != 255).mean() < 0.5:
            continue
        wins.append(np.asarray(im.image[:, y:y + patch, x:x + patch], dtype=np.float32))
        labs.append(lab)
    rows = []
    for start in range(0, n_windows, 16):
        w, lb = wins[start:start + 16], labs[start:start + 16]
        v1, v2 = simclr_views(w, view, mean, std), simclr_views(w, view, mean, std)
        b1, b2, c1, c2, _ = gradient_guided_boxes(net["encoder"], net["projector"], v1.images, v2.images,
                                                  lambda a, b: nt_xent(a, b, 0.5), 0.5, sign, view)
        for i in range(len(w)):
            pair = []
            for v, boxes in ((v1, b1), (v2, b2)):
                gs = box_in_window(v.boxes[i].tolist(), bool(v.flipped[i]), boxes[i], view)
                y0, x0, y1, x1 = boxes[i]
                ry, rx = int(rng.integers(view - (y1 - y0) + 1)), int(rng.integers(view - (x1 - x0) + 1))
                rnd = box_in_window(v.boxes[i].tolist(), bool(v.flipped[i]), (ry, rx, ry + y1 - y0, rx + x1 - x0), view)
                full = box_in_window(v.boxes[i].tolist(), bool(v.flipped[i]), (0, 0, view, view), view)
                pair.append((gs, rnd, full, (y1 - y0) * (x1 - x0) / view ** 2))
                rows.append({"gs_purity": purity(lb[i], gs), "random_purity": purity(lb[i], rnd),
                             "view_purity": purity(lb[i], full), "area_share": pair[-1][3]})
            rows[-1]["gs_pair_iou"] = box_iou(pair[0][0], pair[1][0])
            rows[-1]["view_pair_iou"] = box_iou(pair[0][2], pair[1][2])
        if start == 0:
            contact_sheet(out / ("contact_sheet.png" if sign == "loss" else f"contact_sheet_{sign}.png"), v1, c1, b1,
                          mean, std, view)
    return {"cam_sign": sign, **summarise_mechanism(rows)}


def summarise_mechanism(rows) -> dict:
    def m(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return (float(np.mean(vals)), float(np.std(vals, ddof=1)), len(vals)) if len(vals) > 1 else (None, None, len(vals))

    ok = [r for r in rows if r["gs_purity"] is not None and r["random_purity"] is not None]
    diff = np.array([r["gs_purity"] - r["random_purity"] for r in ok])
    pairs = [r for r in rows if "gs_pair_iou" in r]
    return {"views": len(rows), "gs_purity": m("gs_purity"), "random_purity": m("random_purity"),
            "view_purity": m("view_purity"), "crop_area_share": m("area_share"),
            "purity_gain": _t_interval(diff),
            "gs_pairs_overlapping": float(np.mean([r["gs_pair_iou"] > 0 for r in pairs])) if pairs else None,
            "view_pairs_overlapping": float(np.mean([r["view_pair_iou"] > 0 for r in pairs])) if pairs else None,
            "gs_pair_iou": m("gs_pair_iou"), "view_pair_iou": m("view_pair_iou")}


def contact_sheet(path: Path, views, cams, boxes, mean, std, view: int, n: int = 8) -> None:
    """Row 1: views with their GS box (white); row 2: their gradient maps (min-max grey). A PNG via GDAL."""
    import torch.nn.functional as F
    from osgeo import gdal

    n = min(n, len(views.images))
    sheet = np.zeros((3, 2 * view, n * view), dtype=np.uint8)
    m, s = np.asarray(mean).reshape(3, 1, 1), np.asarray(std).reshape(3, 1, 1)
    up = F.interpolate(cams[:n, None], size=(view, view), mode="bilinear", align_corners=False)[:, 0].numpy()
    for i in range(n):
        img = np.clip(views.images[i, :3].numpy() * s + m, 0, 255).astype(np.uint8)
        y0, x0, y1, x1 = boxes[i]
        img[:, y0, x0:x1] = img[:, y1 - 1, x0:x1] = 255
        img[:, y0:y1, x0] = img[:, y0:y1, x1 - 1] = 255
        sheet[:, :view, i * view:(i + 1) * view] = img
        c = up[i]
        g = ((c - c.min()) / max(1e-12, float(c.max() - c.min())) * 255).astype(np.uint8)
        sheet[:, view:, i * view:(i + 1) * view] = g[None]
    mem = gdal.GetDriverByName("MEM").Create("", sheet.shape[2], sheet.shape[1], 3, gdal.GDT_Byte)
    for b in range(3):
        mem.GetRasterBand(b + 1).WriteArray(sheet[b])
    gdal.GetDriverByName("PNG").CreateCopy(str(path), mem)


def few_label_images(images, fraction: float, draw: int):
    """The images with their labels cut to random ``FT_WINDOW`` px windows holding ``fraction`` of all
    labelled pixels (draw = seed), everything else 255. Returns (images, labelled share reached)."""
    from dataclasses import replace

    rng = np.random.default_rng(1000 + draw)
    total = sum(int((im.label != 255).sum()) for im in images)
    keep = [np.zeros(im.label.shape, dtype=bool) for im in images]
    got = 0
    while got < fraction * total:
        i = int(rng.integers(len(images)))
        H, W = images[i].label.shape
        y, x = int(rng.integers(H - FT_WINDOW + 1)), int(rng.integers(W - FT_WINDOW + 1))
        before = int((keep[i] & (images[i].label != 255)).sum())
        keep[i][y:y + FT_WINDOW, x:x + FT_WINDOW] = True
        got += int((keep[i] & (images[i].label != 255)).sum()) - before
    out = []
    for im, k in zip(images, keep):
        if (k & (im.label != 255)).any():
            lab = np.where(k, im.label, 255).astype(np.uint8)
            out.append(replace(im, label=lab))
    return out, got / total


def finetune_run(arm_path: Path, train, val, iterations: int, freeze: bool, seed: int, work: Path,
                 device: str = "auto") -> dict:
    import io

    from bench.recipes import default_config
    from core.classtable import dubai_class_table
    from core.finetune.job import finetune
    from core.protocol import Reporter

    config = default_config(iterations=iterations, eval_interval=iterations, checkpoint_interval=iterations,
                            warmup_iterations=max(1, iterations // 10), seed=seed, freeze_encoder=freeze)
    classes = [dict(c) for c in dubai_class_table().to_header()]
    out = work / f"ft-{arm_path.stem}-{seed}.srmf"
    t0 = time.perf_counter()
    res = finetune(out, images=train, classes=classes, base_model=str(arm_path), config=config, val_images=val,
                   overwrite=True, device=device, reporter=Reporter(json_mode=True, stream=io.StringIO()))
    out.unlink(missing_ok=True)
    return {"miou": res["metrics"]["miou"], "per_class_iou": res["metrics"]["per_class_iou"],
            "seconds": round(time.perf_counter() - t0, 1)}


def finetune_grid(out: Path, paths: dict, fractions, draws, modes, iterations: int, val_parts,
                  device: str = "auto") -> None:
    from core.finetune.sources import load_dubai

    runs = out / "runs.jsonl"
    done = {(r["kind"], r.get("arm"), r.get("fraction"), r.get("draw"), r.get("mode"), r.get("seed"))
            for r in _rows(runs)}
    train_all = load_dubai(TRAIN_TILES, exclude_bad=True)
    val = load_dubai([VAL_TILE], parts=val_parts)
    plan = [(f, d, mode, arm, d) for f in fractions for d in draws for mode in modes for arm in ARMS]
    plan += [(f, d, "full", "E0", d + 100) for f in fractions for d in draws[:1]]  # the noise floor
    draws_cache = {}  # (fraction, draw) -> the few-label images every arm and mode of that cell trains on
    for f, d, mode, arm, seed in plan:
        key = ("finetune", arm, f, d, mode, seed)
        if key in done:
            continue
        if (f, d) not in draws_cache:
            draws_cache = {(f, d): few_label_images(train_all, f, d)}  # the plan visits a cell's runs together
        train, share = draws_cache[(f, d)]
        r = finetune_run(paths[arm], train, val, iterations, mode == "frozen", seed, out, device)
        row = {"kind": "finetune", "arm": arm, "fraction": f, "draw": d, "mode": mode, "seed": seed,
               "labelled_share": round(share, 4), "iterations": iterations, "val": f"{VAL_TILE} parts {val_parts}", **r}
        with runs.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _rows(path: Path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _t_interval(d) -> dict:
    """Mean, sd and 95 % t interval of paired differences ``d``."""
    from scipy import stats

    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return {"mean": float(d.mean()) if len(d) else None, "n": int(len(d))}
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    h = float(stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d)))
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 1e-12 else None
    return {"mean": mean, "sd": sd, "ci95": [mean - h, mean + h], "n": int(len(d)), "p": p}


def report(out: Path) -> str:
    rows = _rows(out / "runs.jsonl")
    lines = ["# Pretraining evaluation (issue 14)", ""]
    meta = [r for r in rows if r["kind"] in ("pretrain", "mechanism")]
    for r in meta:
        lines.append(f"- {r['kind']}: `{json.dumps({k: v for k, v in r.items() if k != 'kind'})}`")
    ft = [r for r in rows if r["kind"] == "finetune" and r["seed"] == r["draw"]]
    noise = [r for r in rows if r["kind"] == "finetune" and r["seed"] != r["draw"]]
    lines += ["", "| fraction | mode | E0 mIoU | E1 mIoU | E2 mIoU | E2 - E1 | E1 - E0 | E2 - E0 |", "|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["fraction"], r["mode"]) for r in ft})
    all_d = {"E2-E1": [], "E1-E0": [], "E2-E0": []}
    for f, mode in cells:
        by = {a: {r["draw"]: r["miou"] for r in ft if r["fraction"] == f and r["mode"] == mode and r["arm"] == a}
              for a in ARMS}
        cell = [f"{f:.0%}", mode]
        for a in ARMS:
            v = list(by[a].values())
            cell.append(f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f} (n={len(v)})" if len(v) > 1 else
                        (f"{v[0]:.4f} (n=1)" if v else "—"))
        for name, (a, b) in (("E2-E1", ("E2", "E1")), ("E1-E0", ("E1", "E0")), ("E2-E0", ("E2", "E0"))):
            d = [by[a][k] - by[b][k] for k in by[a] if k in by[b]]
            all_d[name] += d
            t = _t_interval(d)
            cell.append(f"{t['mean']:+.4f}" + (f" [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]" if "ci95" in t else "")
                        if t["mean"] is not None else "—")
        lines.append("| " + " | ".join(cell) + " |")
    lines.append("")
    for name, d in all_d.items():
        t = _t_interval(d)
        if t["mean"] is not None:
            lines.append(f"- {name} over all cells: mean {t['mean']:+.4f} mIoU"
                         + (f", 95 % CI [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}], p {t['p']:.3g}" if t.get("p") else "")
                         + f" (n={t['n']}); ahead in {sum(x > 0 for x in d)} of {len(d)}")
    floor = None
    if noise:
        diffs = []
        for r in noise:
            twin = [x for x in ft if (x["arm"], x["fraction"], x["mode"], x["draw"]) == (r["arm"], r["fraction"], r["mode"], r["draw"])]
            if twin:
                diffs.append(abs(r["miou"] - twin[0]["miou"]))
        if diffs:
            floor = float(np.mean(diffs))
            lines.append(f"- noise floor (E0, same labels, another training seed): mean |ΔmIoU| {floor:.4f} "
                         f"over {len(diffs)} pairs (max {max(diffs):.4f})")
    lines += _verdict(ft, cells, all_d, floor)
    lines.append("")
    lines.append("Every run: " + ", ".join(f"{r['arm']}/{r['fraction']:.0%}/{r['mode']}/d{r['draw']}/s{r['seed']} "
                                            f"{r['miou']:.4f}" for r in rows if r["kind"] == "finetune"))
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    return text


def _verdict(ft, cells, all_d, floor) -> list:
    """The issue's success rule, checked on the runs: E2 - E1 >= +1 mIoU point on average, ahead in most cells and
    above twice the noise floor; pretraining (E1 or E2) ahead of E0 at 1 % and 5 %."""
    d = all_d["E2-E1"]
    if not d:
        return []
    ahead = 0
    for f, mode in cells:
        e2 = {r["draw"]: r["miou"] for r in ft if (r["fraction"], r["mode"], r["arm"]) == (f, mode, "E2")}
        e1 = {r["draw"]: r["miou"] for r in ft if (r["fraction"], r["mode"], r["arm"]) == (f, mode, "E1")}
        pairs = [e2[k] - e1[k] for k in e2 if k in e1]
        ahead += bool(pairs) and float(np.mean(pairs)) > 0
    mean = float(np.mean(d))
    gs_ok = mean >= 0.01 and ahead > len(cells) / 2 and (floor is None or mean > 2 * floor)
    out = [f"- verdict, GraSS over SimCLR (E2 - E1 >= +0.01 on average, ahead in most cells, above twice the noise "
           f"floor): {'met' if gs_ok else 'NOT met'} (mean {mean:+.4f}, ahead in {ahead} of {len(cells)} cells"
           + (f", twice the noise floor {2 * floor:.4f}" if floor is not None else "") + ")"]
    for f in (0.01, 0.05):
        best = []
        for arm in ("E1", "E2"):
            x = [r2["miou"] - r0["miou"] for r2 in ft for r0 in ft if r2["arm"] == arm and r0["arm"] == "E0"
                 and (r2["fraction"], r2["mode"], r2["draw"]) == (r0["fraction"], r0["mode"], r0["draw"]) and r2["fraction"] == f]
            if x:
                best.append(f"{arm} - E0 {np.mean(x):+.4f} (n={len(x)})")
        if best:
            out.append(f"- at {f:.0%} of the labels: " + ", ".join(best))
    return out


def main(argv=None) -> int:
    from core.protocol import Reporter

    p = argparse.ArgumentParser(prog="python -m bench.pretrain_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="pretrain-eval")
    p.add_argument("--iterations", type=int, default=240, help="pretraining steps per arm")
    p.add_argument("--fractions", default="0.01,0.05,0.1")
    p.add_argument("--draws", default="0,1,2")
    p.add_argument("--modes", default="frozen,full")
    p.add_argument("--ft-iterations", type=int, default=40)
    p.add_argument("--val-parts", default="1,5,9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--report", action="store_true", help="print the tables of the runs so far and stop")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(out))
        return 0
    rep = Reporter(json_mode=False)
    t0 = time.perf_counter()
    paths = pretrain_arms(out, args.iterations, args.seed, rep, args.device)
    runs = out / "runs.jsonl"
    if not any(r["kind"] == "pretrain" for r in _rows(runs)):
        from core.model.modelfile import read_header

        with runs.open("a") as fh:
            for a in ARMS:
                pre = read_header(paths[a]).get("pretraining", {})
                fh.write(json.dumps({"kind": "pretrain", "arm": a, **{k: pre.get(k) for k in (
                    "method", "iterations", "gs_iterations", "seconds", "first_loss", "last_loss")}}) + "\n")
    for sign in ("loss", "negative"):
        if not any(r["kind"] == "mechanism" and r.get("cam_sign", "loss") == sign for r in _rows(runs)):
            with runs.open("a") as fh:
                fh.write(json.dumps({"kind": "mechanism", **mechanism_check(out, sign=sign)}) + "\n")
    finetune_grid(out, paths, [float(x) for x in args.fractions.split(",")], [int(x) for x in args.draws.split(",")],
                  args.modes.split(","), args.ft_iterations, [int(x) for x in args.val_parts.split(",")], args.device)
    print(report(out))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
