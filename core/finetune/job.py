"""The ``finetune`` command: a base model + an analyst's labelled rasters → a new ``.srmf`` model.

Steps: read the base model and the class table; read the training data (raster + class raster, or
raster + polygons + class field, or image/mask folders) through :mod:`core.finetune.sources`; hold out the
validation images by tile/raster (or, with a single raster, by a region of rows — never by random
pixels); adapt the head to the class table (:mod:`core.model.adapt`); train with MARS + SRR-TA
(:mod:`core.finetune.sampler`, :mod:`core.finetune.loop`); write the best model by validation mIoU, with its metrics
and provenance, atomically to the output path. Bad input is refused before anything is written.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TYPE_CHECKING, Tuple
import numpy as np
from core.errors import InputError
from core.finetune.config import VAL_SHARE

if TYPE_CHECKING:
    import torch


def split_validation(images: Sequence, val_share: float = VAL_SHARE, val_groups: Optional[Sequence[str]] = None,
                     seed: int = 0, crop: int = 512) -> Tuple[list, list, str]:
    """Hold out validation data by group (tile / source raster), or by region when there is one group.

    Args:
        images: training images with ``.group``, ``.image`` (3, H, W), ``.label`` (H, W), ``.name``.
        val_share: target share of labelled pixels held out (0 disables validation).
        val_groups: explicit group names to hold out (overrides ``val_share``).

    Returns:
        ``(train, val, description)``.

    Raises:
        InputError: unknown ``val_groups``; a share outside [0, 0.9].
    """
    from core.finetune.sources import split_by_group

    if not 0.0 <= val_share <= 0.9:
        raise InputError(f"--val-share must be between 0 and 0.9 (got {val_share})")
    if not val_groups and val_share == 0:
        return list(images), [], "no validation"
    groups = sorted({im.group for im in images})
    if val_groups or len(groups) >= 2:
        train, val = split_by_group(images, list(val_groups) if val_groups else None, val_share, seed)
        held = sorted({im.group for im in val})
        share = sum(int((im.label != 255).sum()) for im in val) / max(1, sum(int((im.label != 255).sum()) for im in images))
        return train, val, f"held-out group(s): {', '.join(held)} ({share:.0%} of labelled pixels)"
    # one group: the bottom rows of each image are the validation region
    train, val = [], []
    for im in images:
        h = im.label.shape[0]
        vh = int(round(h * val_share))
        if vh < 32 or h - vh < 32:
            raise InputError(f"{im.name}: {h} rows are too few to hold out {val_share:.0%} as a validation region; "
                             "give a separate validation raster or --val-share 0")
        train.append(replace(im, image=im.image[:, :h - vh], label=im.label[:h - vh], name=im.name + " (train rows)"))
        val.append(replace(im, image=im.image[:, h - vh:], label=im.label[h - vh:], name=im.name + " (validation rows)"))
    return train, val, f"held-out region: the bottom {val_share:.0%} of the rows of each raster"


def mean_class_features(model, images: Sequence, class_ids: Sequence[int], mean, std, crop: int = 256,
                        max_crops: int = 8, seed: int = 0) -> Dict[int, torch.Tensor]:
    """Mean fused feature (the 256-channel map before the classifier) of each class's labelled pixels.

    Crops of ``crop`` px centred on labelled pixels of each class, model in eval mode.

    Returns:
        ``{class id: float32 (256,)}`` for the classes that have labelled pixels.
    """
    import torch

    with torch.no_grad():
        return _mean_class_features(model, images, class_ids, mean, std, crop, max_crops, seed)


def _mean_class_features(model, images, class_ids, mean, std, crop, max_crops, seed):
    import torch

    rng = np.random.default_rng(seed)
    model.eval()
    out = {}
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    for cid in class_ids:
        sums, n = None, 0
        cands = [im for im in images if (im.label == cid).any()]
        for _ in range(min(max_crops, 4 * len(cands))):
            if not cands:
                break
            im = cands[int(rng.integers(len(cands)))]
            ys, xs = np.nonzero(im.label == cid)
            j = int(rng.integers(len(ys)))
            H, W = im.label.shape
            c = min(crop, (min(H, W) // 32) * 32)
            if c < 32:
                continue
            y0 = int(np.clip(ys[j] - c // 2, 0, H - c))
            x0 = int(np.clip(xs[j] - c // 2, 0, W - c))
            x = (torch.from_numpy(np.ascontiguousarray(im.image[:, y0:y0 + c, x0:x0 + c], dtype=np.float32)) - m) / s
            feats = model.forward_features(x[None].to(next(model.parameters()).device))["fused"][0]
            lab = torch.from_numpy(np.ascontiguousarray(im.label[y0:y0 + c:4, x0:x0 + c:4]))
            sel = (lab == cid).to(feats.device)
            if sel.any():
                f = feats[:, sel].sum(1).cpu()
                sums = f if sums is None else sums + f
                n += int(sel.sum())
        if n:
            out[cid] = sums / n
    return out


def finetune(output, *, images: Sequence, classes: Sequence[dict], base_model=None, config=None,
             device: str = "auto", val_share: float = VAL_SHARE, val_groups: Optional[Sequence[str]] = None,
             val_images: Optional[Sequence] = None, overwrite: bool = False, resume: bool = False,
             reporter=None, data_description: Optional[List[str]] = None, stop_after: Optional[int] = None,
             keep_work_dir: bool = False, text_encoder=None, architecture: Optional[dict] = None,
             model_bands: Optional[Sequence[str]] = None) -> dict:
    """Fine-tune a base model on labelled images and write the best model by validation mIoU.

    Args:
        output: the ``.srmf`` file to write. images: :class:`core.finetune.sources.TrainingImage` list (labels hold
            class ids 0..K-1 of ``classes``, 255 = ignore). classes: the class table (``name``,
            ``colour``, ``prompt``, optional ``from``).
        base_model: path or :class:`~core.model.modelfile.LoadedModel` (default: the embedded model).
        config: :class:`core.finetune.config.TrainConfig`. device: auto/cpu/cuda/cuda:N.
        val_share / val_groups / val_images: how validation data is held out (see :func:`split_validation`).
        resume: continue a killed run from its checkpoint (in ``OUTPUT.work/``).
        architecture: build a fresh network instead of adapting the base model's head — a dict
            ``{"backbone", "text_fusion", "encoder_weights"}`` (used by the ablation and the default model).
        model_bands: the input bands by name (default the base model's; more widen its first convolution:
            :func:`_widen_input`); the images hold them, in this order.

    Returns:
        The result dict (output path, metrics, classes, iterations, seconds, ...).

    Raises:
        InputError: bad input, before anything is written.
    """
    from core.classtable import normalise_class_table
    from core.model.modelfile import DEFAULT_MODEL_PATH, load_model
    from core.protocol import Reporter
    from core.geo.raster import check_output_path
    from core.device import resolve_device
    from core.finetune.loop import train_loop
    from core.finetune.config import TrainConfig
    from core.finetune.distributed import init_distributed

    rep = reporter or Reporter()
    config = config or TrainConfig()
    config.validate()
    out = Path(output)
    if out.suffix.lower() != ".srmf":
        raise InputError(f"The output model {out} must end in .srmf")
    dev = resolve_device(device)
    dist_info = init_distributed(dev)
    if not resume:
        check_output_path(out, overwrite, "output model")
    classes = normalise_class_table(classes)
    _check_labelled(images)
    # a LoadedModel, or (for a network built from scratch) any object with the base ``header``
    lm = base_model if hasattr(base_model, "header") else load_model(base_model or DEFAULT_MODEL_PATH)
    train_imgs, val_imgs, split_note = _held_out(images, val_images, val_share, val_groups, config, rep)
    counts = _class_counts(train_imgs, classes, rep)
    model, new_header, report = _start_model(lm, classes, train_imgs, config, architecture, text_encoder, model_bands, rep)
    mean, std = new_header["input"]["mean"], new_header["input"]["std"]
    _log_class_changes(report, rep)
    sampler = _sampler(train_imgs, len(classes), config)
    work = out.with_name(out.name + ".work")
    best_path = work / "best.srmf"
    names = [c["name"] for c in classes]
    provenance = _provenance(
        config, architecture=architecture, base_name=str(getattr(lm, "path", "base model")),
        training_data=list(data_description or [im.name for im in images]), split_note=split_note,
        val_imgs=val_imgs, dev=dev, world_size=dist_info.world_size, report=report,
        pixels={n: int(v) for n, v in zip(names, counts)})
    on_best = _best_model_writer(best_path, new_header, config, provenance)
    import torch

    torch.manual_seed(config.seed)
    existed = work.exists()
    try:
        result = train_loop(model, names, sampler, val_imgs, config, mean, std, dev, work, on_best, reporter=rep,
                            resume=resume, dist_info=dist_info, stop_after=stop_after)
    except BaseException:
        _tidy_work_dir(work, existed, rep)
        raise
    payload = _payload(result, classes, report, dev, split_note)
    if dist_info.is_main:
        _publish(best_path, out, work, keep_work_dir)
        payload["output"] = str(out)
    return payload


def _start_model(lm, classes, train_imgs, config, architecture, text_encoder, model_bands, rep):
    """:func:`_initial_model` (on the base model's bands of the images), then :func:`_widen_input`."""
    n_base = len(lm.header["input"]["bands"])
    model, header, report = _initial_model(lm, classes, [_first_bands(im, n_base) for im in train_imgs], config,
                                           architecture, text_encoder)
    return model, _widen_input(model, header, model_bands, train_imgs, rep), report


def _first_bands(im, n: int):
    """``im`` with its first ``n`` bands only (what the base model reads, for its class features)."""
    return im if im.image.shape[0] <= n else replace(im, image=im.image[:n])


def _widen_input(model, header: dict, model_bands: Optional[Sequence[str]], train_imgs: Sequence, rep) -> dict:
    """The header for ``model_bands`` (multispectral, issue 15 part 3): ``header`` itself when they are the base
    model's bands; else the base model's first convolution widened to them in place and ``input`` extended
    with the added bands' names and their mean/std over the training images (logged).

    Raises:
        InputError: bands that do not start with the base model's, or images without as many bands.
    """
    from core.model.bands import band_statistics, check_band_names, widen_first_conv

    base = list(header["input"]["bands"])
    if model_bands is None or list(model_bands) == base:
        return header
    names = check_band_names(model_bands)
    if names[:len(base)] != base or len(names) <= len(base):
        raise InputError(f"--model-bands {','.join(names)}: a model on bands {','.join(base)} can be given more bands "
                         "after its own, not other ones")
    short = [im.name for im in train_imgs if im.image.shape[0] != len(names)]
    if short:
        raise InputError(f"the model reads {len(names)} bands ({', '.join(names)}) but {short[0]} has another number")
    mean, std = band_statistics(train_imgs, len(base))
    widen_first_conv(model, len(names))
    inp = {**header["input"], "bands": names, "mean": list(header["input"]["mean"]) + mean,
           "std": list(header["input"]["std"]) + std}
    rep.log(f"input bands {', '.join(names)}: the first convolution widened from {len(base)} to {len(names)} bands "
            "(RGB kernels kept, the added ones from their mean x 3/N); added bands' mean "
            + ", ".join(f"{n} {m:.1f} +- {s:.1f}" for n, m, s in zip(names[len(base):], mean, std)))
    return {**header, "input": inp}


def _held_out(images: Sequence, val_images: Optional[Sequence], val_share: float,
              val_groups: Optional[Sequence[str]], config, rep) -> Tuple[list, list, str]:
    """``(train, val, description)``: the separate validation images, else :func:`split_validation`'s."""
    if val_images is not None:
        train_imgs, val_imgs = list(images), list(val_images)
        split_note = "separate validation rasters" if val_imgs else "no validation data"
    else:
        train_imgs, val_imgs, split_note = split_validation(images, val_share, val_groups, config.seed, config.crop)
    rep.log(f"training on {len(train_imgs)} image(s), validating on {len(val_imgs)} ({split_note})")
    return train_imgs, val_imgs, split_note


def _payload(result, classes: Sequence[dict], report: dict, dev, split_note: str) -> dict:
    """The result dict of :func:`finetune` (without ``output``) from the loop's :class:`TrainResult`."""
    return {"iterations": result.iterations, "best_iteration": result.best_iteration,
            "metrics": {"miou": result.best_miou, "per_class_iou": result.per_class_iou},
            "classes": [{k: c[k] for k in ("id", "name", "colour", "prompt")} for c in classes],
            "class_changes": report, "first_loss": result.first_loss, "last_loss": result.last_loss,
            "seconds": round(result.seconds, 1), "device": str(dev), "validation": split_note}


def _check_labelled(images: Sequence) -> None:
    """Raises InputError: no image, or no labelled pixel (all 255) in any of them."""
    if not images:
        raise InputError("No training data: give at least one labelled raster")
    labelled = sum(int((im.label != 255).sum()) for im in images)
    if labelled == 0:
        raise InputError("The labels hold no labelled pixel (all are nodata/ignore)")


def _class_counts(train_imgs: Sequence, classes: Sequence[dict], rep) -> np.ndarray:
    """Training pixels per class, int64 (K,), logged; a warning names the classes with none."""
    counts = np.zeros(len(classes), dtype=np.int64)
    for im in train_imgs:
        counts += np.bincount(im.label[im.label != 255].ravel(), minlength=len(classes))[:len(classes)]
    rep.log("training pixels per class: " + ", ".join(f"{c['name']} {int(n)}" for c, n in zip(classes, counts)))
    absent = [c["name"] for c, n in zip(classes, counts) if n == 0]
    if absent:
        rep.warning(f"no training pixels for class(es) {', '.join(absent)}: the model cannot learn them")
    return counts


def _initial_model(lm, classes: Sequence[dict], train_imgs: Sequence, config, architecture: Optional[dict],
                   text_encoder):
    """The network training starts from → ``(model, header, class-change report)``: a fresh one for
    ``architecture``, else the base model's with its head adapted to ``classes`` (new classes start
    from their mean fused feature in the training images)."""
    from core.model.adapt import adapt_classes

    header = lm.header
    mean, std = header["input"]["mean"], header["input"]["std"]
    if architecture is not None:
        import torch

        torch.manual_seed(config.seed)  # the fresh head's initialisation is part of the recipe
        model, new_header = _fresh_model(architecture, classes, header, text_encoder)
        report = _all_added(classes)
        return model, new_header, report
    if (header.get("provenance") or {}).get("untrained_head"):
        return _pretrained_start(lm, classes, config, text_encoder)
    base_ids = {str(c["name"]).lower() for c in lm.classes}
    new_names = [c for c in classes if c.get("from") is None and c["name"].lower() not in base_ids]
    init = {}
    if new_names:
        # the base model's fused features equal the adapted model's (new fusion inputs start at zero)
        feats = mean_class_features(lm.model, train_imgs, [int(c["id"]) for c in new_names], mean, std, seed=config.seed)
        init = {c["name"]: feats[int(c["id"])] for c in new_names if int(c["id"]) in feats}
    return adapt_classes(lm.model, header, classes, text_encoder=text_encoder, init_features=init)


def _pretrained_start(lm, classes: Sequence[dict], config, text_encoder):
    """A pretrained encoder (``python -m core pretrain``; its head untrained) → ``(model, header, report)``: a
    fresh head of its architecture for ``classes`` (text bank rebuilt from the vocabulary and the classes'
    prompts, as for a new model) on its encoder, its input statistics and GSD kept."""
    import torch

    header = lm.header
    arch = {**header["architecture"], "encoder_weights": None, "gsd_m": header.get("gsd_m"),
            "text_encoder": (header.get("text_encoder") or {}).get("id", "minilm")}
    torch.manual_seed(config.seed)
    model, new_header = _fresh_model(arch, classes, header, text_encoder)
    if len(header["input"]["bands"]) != 3:
        from core.model.bands import widen_first_conv

        widen_first_conv(model, len(header["input"]["bands"]))
    model.encoder.load_state_dict(lm.model.encoder.state_dict())
    new_header["encoder_pretraining"] = {k: v for k, v in (header.get("pretraining") or {}).items() if k != "loss_curve"}
    report = _all_added(classes)
    return model, new_header, report


def _all_added(classes: Sequence[dict]) -> dict:
    """The class-change report of a fresh head: every class added, none kept from a base head."""
    return {"kept": [], "renamed": [], "dropped": [], "added": [c["name"] for c in classes], "appended_prompts": []}


def _log_class_changes(report: dict, rep) -> None:
    for k in ("kept", "renamed", "dropped", "added"):
        if report[k]:
            rep.log(f"classes {k}: {', '.join(report[k])}")


def _sampler(train_imgs: Sequence, num_classes: int, config):
    """Batches of MARS + SRR-TA crops of the training images (SRR-TA's regions cached on disk)."""
    from core.finetune.loop import SampleBatcher
    from core.finetune.sampler import TrainingSampler

    return SampleBatcher(TrainingSampler(train_imgs, num_classes, crop=config.crop, seed=config.seed,
                                         mars=config.mars, srr=config.srr, srr_k=config.srr_k,
                                         cache_dir=region_cache_dir(), augment=config.augment))


def _provenance(config, *, architecture, base_name: str, training_data: List[str], split_note: str, val_imgs,
                dev, world_size: int, report: dict, pixels: Dict[str, int]):
    """``provenance(metrics) -> dict``: the model header's provenance for the best model so far (the
    start time is taken now)."""
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    loss = "cross-entropy, ignore 255" + (
        f" + {config.contrastive_weight} x class-balanced InfoNCE on the fused features "
        f"(temperature {config.contrastive_temperature})" if config.contrastive_weight > 0 else "")

    def provenance(metrics: dict) -> dict:
        return {
            "untrained": False,
            "base_model": None if architecture is not None else Path(base_name).name,
            "architecture_from_scratch": architecture,
            "training_data": training_data,
            "validation": split_note,
            "validation_images": [im.name for im in val_imgs],
            "recipe": {**asdict(config), "warmup": config.warmup(), "optimizer": "AdamW",
                       "schedule": "linear warm-up then poly(1.0)", "loss": loss},
            "device": str(dev), "world_size": world_size,
            "started": started,
            "best_iteration": metrics.get("iteration"),
            "class_changes": report,
            "training_pixels_per_class": pixels,
        }

    return provenance


def _best_model_writer(best_path: Path, new_header: dict, config, provenance):
    """``on_best(model, metrics)``: write the model with its metrics, provenance and inference window."""
    from core.model.modelfile import save_model

    def on_best(m, metrics: dict) -> None:
        h = dict(new_header)
        h["metrics"] = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
        if "confusion_matrix" in metrics:
            h["metrics"]["validation_confusion_matrix"] = metrics["confusion_matrix"]
        h["provenance"] = provenance(metrics)
        window, stride = config.inference_window()
        h["inference"] = {"window": window, "stride": stride}
        h.pop("format", None)
        h.pop("format_version", None)
        save_model(best_path, m, h)

    return on_best


def _tidy_work_dir(work: Path, existed: bool, rep) -> None:
    """After a failed or cancelled run: remove the work folder when this run made it and left nothing in it
    (issue 13: a refused run leaves nothing it created); when it holds a checkpoint, say how to go on."""
    if not work.is_dir():
        return
    if (work / "checkpoint.safetensors").exists():
        rep.log(f"the last checkpoint is kept in {work}: run the same command with --resume to continue")
    elif not existed and not any(work.iterdir()):
        shutil.rmtree(work, ignore_errors=True)


def _publish(best_path: Path, out: Path, work: Path, keep_work_dir: bool) -> None:
    """Move the best model to ``out`` and remove the work folder (unless kept).
    Raises InputError: no model was written."""
    if not best_path.exists():
        raise InputError("training produced no model (no validation improvement was recorded)")
    os.replace(best_path, out)
    if not keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)


def region_cache_dir() -> Path:
    """Where SRR-TA's mined regions are cached: ``$SRMF_CACHE_DIR/regions`` or ``~/.cache/srmf/regions``."""
    root = os.environ.get("SRMF_CACHE_DIR")
    return Path(root) / "regions" if root else Path.home() / ".cache" / "srmf" / "regions"


def _fresh_model(arch: dict, classes: Sequence[dict], base_header: dict, text_encoder=None):
    """A new network (backbone with pretrained weights) for ``classes``, optionally with a text bank."""
    from core.model.network import SRMFNet, architecture_config
    from core.model.text.bank import build_text_bank
    from core.model.text.encoders import get_text_encoder
    from core.model.text.prompts import load_vocabulary, prompts_for

    bank, te, bank_info = None, None, None
    if arch.get("text_fusion", True):
        enc = text_encoder or get_text_encoder(arch.get("text_encoder", "minilm"))
        concepts = load_vocabulary()
        prompts = prompts_for(concepts)
        extra = [c["prompt"] for c in classes if c["prompt"] not in prompts]
        bank = build_text_bank(prompts + extra, enc)
        te = {"id": enc.encoder_id, "dim": int(bank.shape[1])}
        bank_info = {"concepts": concepts + [None] * len(extra), "prompts": prompts + extra}
    model = SRMFNet(arch["backbone"], len(classes), text_bank=bank, encoder_weights=arch.get("encoder_weights", "imagenet"))
    header = {"architecture": architecture_config(model),
              "classes": [{k: c[k] for k in ("id", "name", "colour", "prompt")} for c in classes],
              "text_encoder": te, "text_bank": bank_info, "input": base_header["input"],
              "gsd_m": arch.get("gsd_m")}
    return model, header
