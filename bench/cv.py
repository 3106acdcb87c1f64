"""Leave-one-tile-out cross-validation of training recipes on the shared Dubai tiles (issue 12, part 2).

``python -m bench.cv [--folds tile_1,tile_2,tile_3] [--recipes flip,d4,photometric] [--seeds 0,1,2]
[--iterations 800] [--eval-interval N] [--out cv-output] [--record bench/results/cv_runs.jsonl]``: for
every (seed, fold, recipe), trains the default model's architecture (EfficientNet-Lite0 ImageNet + MiniLM text bank, SRMF: MARS + SRR-TA) from ImageNet on all
Dubai tiles but the fold's, at the same budget, and validates on the whole held-out tile — never random
pixels of the training images. The figure of a run is its **last** validation (the budget is fixed in
advance; choosing the best iteration on the held-out tile would flatter it); the curve is kept.

Every run is appended to the record (``--record``, default ``bench/results/cv_runs.jsonl``, kept in git so
that a study spread over several sessions keeps its runs) as soon as it ends (losers included) and a run
already there is skipped, so the grid can be stopped and continued (``nohup python -m bench.cv ... &``); a run
stopped part-way continues from its last checkpoint (every 50 iterations, ``<out>/<run>.srmf.work/``) —
its record then says from which iteration (``resumed_at``) and its curve holds the validations after it.
``--report`` prints, per recipe and budget, the mean ± sd of the held-out mIoU over folds and seeds,
per-class means, and the paired difference to ``flip`` (the default recipe; same fold, seed and budget)
with a 95 % t interval and the paired t-test's p.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

from bench.recipes import RECIPES  # the recipes live with the trainer; the study runs them by name

TILES = ["tile_1", "tile_2", "tile_3", "tile_5", "tile_6", "tile_7", "tile_8"]
RECORD = Path(__file__).resolve().parent / "results" / "cv_runs.jsonl"


def _key(r) -> tuple:
    return r["fold"], r["recipe"], r["seed"], r["iterations"], r.get("eval_interval")


def _done(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {_key(r): r for r in rows}


def run_one(fold: str, recipe: str, seed: int, iterations: int, out: Path, device: str,
            eval_interval: int = 0) -> dict:
    """Train one recipe with ``fold`` held out; returns the run's record (the last validation's figures).

    ``eval_interval`` 0 validates every quarter of the budget (a curve); ``N`` every N iterations (the
    budget itself: one validation, at the end, which is the figure anyway)."""
    from bench.recipes import _dubai
    from bench.recipes import recipe as recipe_parts
    from core.protocol import Reporter

    config, arch = recipe_parts(recipe, iterations=iterations, eval_interval=eval_interval or max(1, iterations // 4),
                                checkpoint_interval=min(50, iterations), seed=seed)
    train = _dubai([t for t in TILES if t != fold])
    val = _dubai([fold], exclude_bad=False)
    log = io.StringIO()
    t0 = time.perf_counter()
    output = out / f"{fold}-{recipe}-s{seed}-i{iterations}.srmf"
    resumed_at = _checkpoint_iteration(output)
    res = _train(train, val, config, arch, output, device, Reporter(json_mode=True, stream=log),
                 resume=resumed_at is not None)
    curve = [json.loads(ln) for ln in log.getvalue().splitlines() if '"type": "metrics"' in ln and '"miou"' in ln]
    last = curve[-1] if curve else {}
    return {"fold": fold, "recipe": recipe, "seed": seed, "iterations": iterations,
            "eval_interval": eval_interval or None,
            "miou": last.get("miou"), "per_class_iou": last.get("per_class_iou"),
            "curve": [(c.get("iteration"), c.get("miou")) for c in curve], "best_miou": res["metrics"]["miou"],
            "best_iteration": res["best_iteration"], "best_confusion": res.get("best_confusion"),
            "train_images": len(train), "val_images": len(val),
            "seconds": round(time.perf_counter() - t0, 1), "config": dict(RECIPES[recipe]), "resumed_at": resumed_at,
            "torch_threads": _threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _checkpoint_iteration(output: Path):
    """The iteration of the run's last checkpoint (``OUTPUT.work/checkpoint.safetensors``), or None."""
    ckpt = output.with_name(output.name + ".work") / "checkpoint.safetensors"
    if not ckpt.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as fh:
        return int(json.loads(fh.metadata()["srmf-checkpoint"])["state"]["iteration"])


def _train(train, val, config, arch, output: Path, device: str, rep, resume: bool = False) -> dict:
    from bench.recipes import train_default

    try:
        res = train_default(output, config, device, rep, arch, train=train, val=val, resume=resume)
        res["best_confusion"] = _best_confusion(output)
        return res
    finally:
        output.unlink(missing_ok=True)  # the figures are the product, not 15 MB per run


def _best_confusion(output: Path):
    """The confusion matrix (reference rows × predicted columns, pixels) of the best validation, from the
    model file's header, or None."""
    from core.errors import ModelFileError
    from core.model.modelfile import read_header

    try:
        return (read_header(output).get("metrics") or {}).get("validation_confusion_matrix")
    except (OSError, ModelFileError):
        return None


def cv_estimate(recipe: str, iterations: int, record: Path = RECORD) -> dict:
    """The cross-validated figures of ``recipe`` at ``iterations`` from the record: for a model trained on
    every tile (nothing left to validate it on), the estimate of how it does on a tile it has not seen.

    Returns:
        ``{"miou", "miou_sd", "per_class_iou": {class: mean}, "runs", "folds", "seeds", "estimate"}``
        (means over the (fold, seed) runs; ``estimate`` says how they were made).

    Raises:
        ValueError: the record has no finished run of that recipe at that budget.
    """
    import numpy as np

    rows = [r for r in _done(Path(record)).values()
            if r["recipe"] == recipe and r["iterations"] == iterations and r.get("miou") is not None]
    if not rows:
        raise ValueError(f"{record}: no finished cross-validation run of {recipe!r} at {iterations} iterations")
    m = np.array([r["miou"] for r in rows])
    classes = _classes(rows)
    per = {c: round(float(np.mean([r["per_class_iou"][c] for r in rows if r["per_class_iou"].get(c) is not None])), 4)
           for c in classes}
    folds, seeds = sorted({r["fold"] for r in rows}), sorted({r["seed"] for r in rows})
    return {"miou": round(float(m.mean()), 4), "miou_sd": round(float(m.std(ddof=1)) if len(m) > 1 else 0.0, 4),
            "per_class_iou": per, "runs": len(rows), "folds": folds, "seeds": seeds,
            "estimate": (f"leave-one-tile-out cross-validation of this recipe at {iterations} iterations "
                         f"(bench/cv.py): mean of {len(rows)} runs, each trained on the other Dubai tiles and "
                         f"validated on the whole held-out tile ({', '.join(folds)}; seeds "
                         f"{', '.join(map(str, seeds))}); the model itself was trained on every tile")}


def report(rows: list, baseline: str = "flip") -> str:
    """Markdown table: per (recipe, budget), the held-out mIoU mean ± sd over (fold, seed), per-class means,
    and the paired difference to ``baseline`` at the same budget (same fold and seed): mean, 95 % t interval,
    paired t-test p, and how many pairs it is ahead in. Runs without a figure are listed, not dropped."""
    import numpy as np

    done = [r for r in rows if r.get("miou") is not None]
    arms = list(dict.fromkeys((r["recipe"], r["iterations"]) for r in done))
    classes = _classes(done) if done else []
    lines = ["| recipe | iterations | runs | held-out mIoU (mean ± sd) | " + " | ".join(classes)
             + " | Δ mIoU vs " + baseline + " (paired: mean [95 % CI], p, ahead) |",
             "|---|---:|---:|---:|" + "---:|" * len(classes) + "---|"]
    by = {(r["recipe"], r["iterations"], r["fold"], r["seed"]): r["miou"] for r in done}
    for rec, its in sorted(arms, key=lambda a: (a[1], a[0] != baseline, a[0])):
        mine = [r for r in done if (r["recipe"], r["iterations"]) == (rec, its)]
        m = np.array([r["miou"] for r in mine])
        per = [np.nanmean([r["per_class_iou"].get(c) if r["per_class_iou"].get(c) is not None else np.nan
                           for r in mine]) for c in classes]
        pairs = [v - by[(baseline, its, f, s)] for (x, i, f, s), v in by.items()
                 if (x, i) == (rec, its) and (baseline, its, f, s) in by]
        sd = m.std(ddof=1) if len(m) > 1 else 0.0
        lines.append(f"| {rec} | {its} | {len(m)} | {m.mean():.3f} ± {sd:.3f} | " + " | ".join(f"{v:.3f}" for v in per)
                     + f" | {_paired(pairs) if rec != baseline else '—'} |")
    missing = [r for r in rows if r.get("miou") is None]
    if missing:
        lines.append(f"\n{len(missing)} run(s) without a validation figure: "
                     + ", ".join(f"{r['fold']}/{r['recipe']}/s{r['seed']}" for r in missing))
    return "\n".join(lines)


def _classes(rows) -> list:
    return list(next(r["per_class_iou"] for r in rows if r.get("per_class_iou")))


def _paired(diffs) -> str:
    """``+0.012 [−0.003, +0.027], p 0.11, 6/9``: mean, 95 % t interval, paired t-test p, pairs ahead."""
    import numpy as np
    from scipy import stats

    if len(diffs) < 2:
        return f"{diffs[0]:+.3f} (n = 1)" if diffs else "n/a"
    d = np.array(diffs)
    if np.all(d == d[0]):
        return f"{d[0]:+.3f} (no spread, n = {len(d)})"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    p = stats.ttest_1samp(d, 0.0).pvalue
    return (f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}], p {p:.2g}, "
            f"ahead {int((d > 0).sum())}/{len(d)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cv", description=__doc__.splitlines()[0])
    ap.add_argument("--folds", default="tile_1,tile_2,tile_3")
    ap.add_argument("--recipes", default="flip,d4,photometric")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--eval-interval", type=int, default=0,
                    help="validate every N iterations (default: every quarter of the budget)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="cv-output", help="folder of the runs' checkpoints")
    ap.add_argument("--record", default=str(RECORD), help="JSON-lines file of the finished runs")
    ap.add_argument("--report", action="store_true", help="print the table of the runs so far and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.record)
    runs.parent.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(list(_done(runs).values())))
        return 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        for fold in args.folds.split(","):
            for recipe in args.recipes.split(","):
                if (fold, recipe, seed, args.iterations, args.eval_interval or None) in _done(runs):
                    continue
                row = run_one(fold, recipe, seed, args.iterations, out, args.device, args.eval_interval)
                with runs.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: row[k] for k in ("fold", "recipe", "seed", "miou", "seconds")}), flush=True)
    print(report(list(_done(runs).values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
