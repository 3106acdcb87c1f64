"""Models of any number of input bands (issue 15, part 3): red, green, blue and more (near-infrared, red edge …).

- **Band names.** A model's header lists its input bands by name (``input.bands``: ``["red", "green", "blue",
  "nir"]``). A raster's bands are named by their GDAL colour interpretation (red, green, blue) or, where that
  says nothing (GDAL 3.6 has no near-infrared interpretation), by their description ("NIR", "near-infrared",
  "Band 4: NIR" …), see :func:`raster_band_name`.
- **The first convolution for N bands** (:func:`widen_first_conv`): the standard adaptation of an ImageNet
  (RGB) stem — the RGB kernels are kept as they are and each added band's kernel starts from the mean of the
  RGB kernels, scaled by 3/N (timm's ``adapt_input_conv`` scaling for its repeated kernels, so that an added
  band of typical values adds activation on the scale of the RGB ones). With the added kernels set to zero
  the widened network gives exactly the RGB network's logits (tested).
- **Normalisation of the added bands** (:func:`band_statistics`): mean and standard deviation over the valid
  pixels of the training images, stored in the model file beside ImageNet's RGB statistics (which the
  pretrained RGB kernels expect, so they are kept).
"""
from __future__ import annotations

import copy
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

RGB = ("red", "green", "blue")
_ALIASES = {"nir": "nir", "near-infrared": "nir", "near infrared": "nir", "nearinfrared": "nir", "infrared": "nir",
            "ir": "nir", "n": "nir", "rededge": "rededge", "red edge": "rededge", "red-edge": "rededge", "re": "rededge",
            "swir": "swir", "swir1": "swir1", "swir2": "swir2", "coastal": "coastal", "yellow": "yellow",
            "pan": "pan", "panchromatic": "pan", "red": "red", "green": "green", "blue": "blue"}


def canonical_band_name(text: str) -> Optional[str]:
    """The standard name of a band description or a model band name (``"NIR"``, ``"Band 4: near-infrared"``
    → ``"nir"``; ``"Red"`` → ``"red"``), or None when it names no known band."""
    t = str(text or "").strip().lower()
    if not t:
        return None
    t = re.sub(r"^band\s*\d+\s*[:\-–]?\s*", "", t).strip() or t
    t = re.sub(r"\s*\(.*\)$", "", t).strip()
    return _ALIASES.get(t) or _ALIASES.get(t.replace("_", " ")) or _ALIASES.get(t.replace(" ", ""))


def raster_band_name(ds, band: int) -> Optional[str]:
    """The standard name of band ``band`` (1-based) of a GDAL dataset: its colour interpretation (red, green,
    blue), else its description (:func:`canonical_band_name`), else None."""
    from osgeo import gdal

    b = ds.GetRasterBand(band)
    interp = {gdal.GCI_RedBand: "red", gdal.GCI_GreenBand: "green", gdal.GCI_BlueBand: "blue"}.get(
        b.GetColorInterpretation())
    return interp or canonical_band_name(b.GetDescription())


def check_band_names(names: Sequence[str], what: str = "--model-bands") -> List[str]:
    """The model's band names, standardised: ``red, green, blue`` first (the pretrained kernels are RGB's),
    then any others, each named once.

    Raises:
        InputError: fewer than the three RGB bands, RGB not first, an unknown or repeated name.
    """
    from core.errors import InputError

    out = []
    for n in names:
        c = canonical_band_name(n)
        if c is None:
            raise InputError(f"{what}: unknown band name {n!r} (use red, green, blue, nir, rededge, swir1, swir2, "
                             "coastal, yellow, pan)")
        if c in out:
            raise InputError(f"{what}: band {c!r} is named twice")
        out.append(c)
    if tuple(out[:3]) != RGB:
        raise InputError(f"{what}: the first three bands must be red, green, blue (the pretrained kernels are RGB's); "
                         f"got {', '.join(out)}")
    return out


def widen_first_conv(model, n_bands: int) -> Tuple[str, int]:
    """Replace the first convolution of ``model``'s encoder (the stem, reading 3 bands) by one reading
    ``n_bands`` bands (see the module docstring); returns ``(its module name, the old in_channels)``.

    Raises:
        ValueError: ``n_bands`` < the stem's bands, or no convolution found.
    """
    import torch
    from torch import nn

    name, conv = next(((n, m) for n, m in model.encoder.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None:
        raise ValueError("the encoder has no convolution")
    old = conv.in_channels
    if n_bands < old:
        raise ValueError(f"cannot narrow the first convolution from {old} to {n_bands} bands")
    if n_bands == old:
        return name, old
    if conv.groups != 1:
        raise ValueError("the first convolution is grouped: it cannot be widened")
    new = copy.deepcopy(conv)  # the same module class (a "same"-padding stem keeps its padding rule)
    with torch.no_grad():
        w = torch.empty(conv.out_channels, n_bands, *conv.kernel_size, dtype=conv.weight.dtype,
                        device=conv.weight.device)
        w[:, :old] = conv.weight
        w[:, old:] = conv.weight.mean(1, keepdim=True) * (3.0 / n_bands)
    new.weight = nn.Parameter(w)
    new.in_channels = n_bands
    parent = model.encoder
    *path, leaf = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, new)
    return name, old


def band_statistics(images: Sequence, first: int) -> Tuple[List[float], List[float]]:
    """Mean and standard deviation of bands ``first..`` (0-based) over the labelled pixels of ``images``
    (:class:`~core.finetune.sources.TrainingImage`: ``image`` (C, H, W) in 0..255, ``label`` (H, W) with 255
    where ignored — nodata is ignored there too), in the model's value units; a band with no spread gets
    std 1.

    Raises:
        InputError: no valid pixel at all.
    """
    from core.errors import InputError

    total, s1, s2 = 0, None, None
    for im in images:
        x = np.asarray(im.image[first:], dtype=np.float64)
        if x.shape[0] == 0:
            return [], []
        v = x.reshape(x.shape[0], -1)[:, np.asarray(im.label).ravel() != 255]
        total += v.shape[1]
        s1 = v.sum(1) if s1 is None else s1 + v.sum(1)
        s2 = (v * v).sum(1) if s2 is None else s2 + (v * v).sum(1)
    if not total:
        raise InputError("the training images hold no labelled pixel to compute the added bands' statistics from")
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return [float(m) for m in mean], [float(s) for s in std]
