"""Training samples and the crop geometry shared by MARS, SRR-TA and the sampler: padding, bilinear/nearest
resizing, flips, random crops. Boxes are (x0, y0, x1, y1) in pixels; labels uint8 with IGNORE = 255."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple
import numpy as np
from core.classtable import IGNORE

Box = Tuple[int, int, int, int]


# -- samples -----------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One training sample.

    Attributes:
        image: float32 (3, crop, crop) on 0..255 (not normalised), or None when no image was given.
        label: uint8 (crop, crop), class ids, 255 = ignore.
        kind: ``"anchor"``, ``"context"`` (MARS k > 1), ``"srr"`` or ``"random"``.
        box: the window in the (padded) source image, (x0, y0, x1, y1) px, end exclusive.
        scale: the window's side / crop (1 for native-resolution crops; < k when a context window was
            shrunk to fit the image).
        flip_h / flip_v: horizontal / vertical flip applied (jointly to image and label) after cropping.
        turns: quarter turns counter-clockwise applied after the flips (``--augment d4``/``photometric``).
        source: the image's name; note: e.g. why a window is smaller than asked.
    """

    image: Optional[np.ndarray]
    label: np.ndarray
    kind: str
    box: Box
    scale: float = 1.0
    flip_h: bool = False
    flip_v: bool = False
    turns: int = 0
    source: str = ""
    note: str = ""


# -- helpers -----------------------------------------------------------------------------------------
def _pad(image: Optional[np.ndarray], label: np.ndarray, crop: int, pad_value: float
         ) -> Tuple[Optional[np.ndarray], np.ndarray]:
    H, W = label.shape
    ph, pw = max(0, crop - H), max(0, crop - W)
    if ph == 0 and pw == 0:
        return image, label
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    if image is not None:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)), constant_values=image.dtype.type(pad_value))
    return image, label


def _stats(lab: np.ndarray) -> Tuple[int, float, int]:
    """(classes present, largest share, labelled pixels) over the labelled (non-255) pixels."""
    counts = np.bincount(lab.ravel(), minlength=256)[:IGNORE]
    n = int(counts.sum())
    if n == 0:
        return 0, 1.0, 0
    return int((counts > 0).sum()), float(counts.max()) / n, n


def _nearest_index(side: int, out: int) -> np.ndarray:
    # Centre-aligned nearest neighbour (as bilinear with align_corners=False).
    return np.minimum(((np.arange(out) + 0.5) * (side / out)).astype(np.int64), side - 1)


def resize_label(label: np.ndarray, out: int) -> np.ndarray:
    """Nearest-neighbour resize of a square uint8 (s, s) label to (out, out)."""
    s = label.shape[0]
    if s == out and label.shape[1] == out:
        return np.ascontiguousarray(label)
    iy = _nearest_index(label.shape[0], out)
    ix = _nearest_index(label.shape[1], out)
    return label[np.ix_(iy, ix)]


def resize_image(image: np.ndarray, out: int, antialias: bool = True) -> np.ndarray:
    """Bilinear resize of an image (3, s, s) to float32 (3, out, out) (antialiased when shrinking)."""
    img = np.asarray(image, dtype=np.float32)
    if img.shape[1] == out and img.shape[2] == out:
        return np.ascontiguousarray(img)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img))[None]
    r = F.interpolate(t, size=(out, out), mode="bilinear", align_corners=False,
                      antialias=antialias and img.shape[1] > out)
    out_img = r[0].numpy()
    return np.clip(out_img, 0.0, 255.0, out=out_img)  # the antialias filter can overshoot by ~1e-4


def _cut(image: Optional[np.ndarray], label: np.ndarray, box: Box, out: int, antialias: bool = True
         ) -> Tuple[Optional[np.ndarray], np.ndarray]:
    x0, y0, x1, y1 = box
    lab = resize_label(label[y0:y1, x0:x1], out)
    img = None
    if image is not None:
        img = resize_image(image[:, y0:y1, x0:x1], out, antialias)
    return img, lab


def flip_sample(sample: Sample, flip_h: bool, flip_v: bool) -> Sample:
    """Flip a sample's image and label jointly (horizontal: last axis; vertical: rows), in place."""
    if flip_h:
        sample.label = np.ascontiguousarray(sample.label[:, ::-1])
        if sample.image is not None:
            sample.image = np.ascontiguousarray(sample.image[:, :, ::-1])
    if flip_v:
        sample.label = np.ascontiguousarray(sample.label[::-1, :])
        if sample.image is not None:
            sample.image = np.ascontiguousarray(sample.image[:, ::-1, :])
    sample.flip_h, sample.flip_v = bool(flip_h), bool(flip_v)
    return sample


def random_flip(sample: Sample, rng: np.random.Generator) -> Sample:
    """Horizontal and vertical flips, each with probability 0.5, applied jointly to image and label."""
    fh, fv = rng.random(2) < 0.5
    return flip_sample(sample, bool(fh), bool(fv))


def random_crop(image: Optional[np.ndarray], label: np.ndarray, rng: np.random.Generator, crop: int = 512, *,
                pad_value: float = 0.0, source: str = "") -> Sample:
    """A plain random ``crop``-px crop (the ablation baseline; mmsegmentation's RandomCrop without
    the class-ratio retry), unflipped."""
    image, label = _pad(image, np.asarray(label), crop, pad_value)
    H, W = label.shape
    y0 = int(rng.integers(0, H - crop + 1))
    x0 = int(rng.integers(0, W - crop + 1))
    box = (x0, y0, x0 + crop, y0 + crop)
    img = None if image is None else np.ascontiguousarray(image[:, y0:y0 + crop, x0:x0 + crop], dtype=np.float32)
    return Sample(img, np.ascontiguousarray(label[y0:y0 + crop, x0:x0 + crop]), "random", box, 1.0, source=source)
