"""SRMF's training samplers: MARS and SRR-TA (SRMF, arXiv 2504.19839, "Multi-scale anchored region
sampling" and "Semantic reranking and resampling" sections), with the reference code's flaws fixed.

* **MARS** (:func:`mars_samples`): an anchor crop of ``crop`` px with at least 2 classes and a largest
  class share below 0.75 (255 ignored), found with a BOUNDED number of tries (the reference loops until
  it finds one, forever on an all-background label); then, for each k in ``scales``, one random
  window of side ``crop·k`` on a ``crop``-px grid aligned to the anchor that CONTAINS the anchor
  (shifted to stay inside the image; the largest square window that fits when the image is smaller),
  resized to ``crop`` (bilinear image, nearest label). Each window is an independent sample with its
  own label.
* **SRR-TA**: offline, :func:`mine_regions` finds class-pure boxes (dominant class ≥ 75 % of the box's
  labelled pixels) from the label rasters (connected components per class, split recursively when
  their box is not pure; or the boxes of an optional miner such as SAM), ranks them rarest class first
  by the training set's pixel counts, ties broken by richness (classes in the box), and caches them
  per dataset. Online, :func:`srr_crops` cuts native-resolution ``crop`` px crops CENTRED on an
  image's top-k regions (the reference pins the region in the top-left corner) and flips them like
  every other sample (the reference does not).
* :class:`TrainingSampler`: each time an image is drawn, MARS samples + SRR-TA crops, each randomly
  flipped, as float32 image (3, crop, crop) 0..255 and uint8 label (crop, crop); deterministic given a
  seed, the epoch and the image index (so independent of worker or GPU sharding); MARS and SRR-TA can
  be turned off (plain random crops) for the ablation.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the image, end exclusive. Images smaller than ``crop`` are
padded at the bottom/right (label 255, image ``pad_value``), and boxes then refer to the padded image.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError

IGNORE = 255
Box = Tuple[int, int, int, int]
REGION_CACHE_FORMAT = "srmf-srr-regions"
REGION_CACHE_VERSION = 1

RegionMiner = Callable[[np.ndarray, np.ndarray], Sequence[Box]]
"""An optional region proposer (e.g. SAM-HQ, as in the paper): ``miner(image, label) -> boxes``.

``image``: uint8/float32 (3, H, W) 0..255; ``label``: uint8 (H, W); returns candidate boxes
``(x0, y0, x1, y1)`` in pixels. The label then decides each box's class, purity and richness exactly as
for the default connected-component miner. Give the callable a ``cache_id`` attribute (a string naming
the model and its settings) so that its regions are cached apart from the default miner's.
"""


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
        source: the image's name; note: e.g. why a window is smaller than asked.
    """

    image: Optional[np.ndarray]
    label: np.ndarray
    kind: str
    box: Box
    scale: float = 1.0
    flip_h: bool = False
    flip_v: bool = False
    source: str = ""
    note: str = ""


@dataclass
class Window:
    """A MARS window: box (x0, y0, x1, y1) px in the padded image; ``k`` the requested scale;
    ``side`` the side used (``crop·k``, or less when ``shrunk``); ``duplicate`` when it equals an
    earlier window of the same draw (no sample is made for it)."""

    kind: str
    box: Box
    k: int
    side: int
    shrunk: bool = False
    duplicate: bool = False
    note: str = ""


@dataclass
class MarsResult:
    """What :func:`mars_samples` did.

    Attributes:
        anchor: the anchor window (k = 1). anchor_ok: it meets the constraints (≥ ``min_classes``
            classes, largest share < ``max_share``, both over labelled pixels); when false it is the
            best-scoring crop tried (or a random one on a label with no labelled pixel) and ``notes``
            says why. anchor_classes / anchor_max_share: the anchor's exact statistics.
        tries: full-resolution anchor checks made. windows: the context windows, one per k.
        samples: anchor + non-duplicate context windows, resized to crop (unflipped).
        padded_shape: (H, W) after padding.
    """

    anchor: Window
    anchor_ok: bool
    anchor_classes: int
    anchor_max_share: float
    tries: int
    windows: List[Window]
    samples: List[Sample]
    padded_shape: Tuple[int, int]
    notes: List[str] = field(default_factory=list)

    @property
    def boxes(self) -> List[Box]:
        return [self.anchor.box] + [w.box for w in self.windows]


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


# -- MARS --------------------------------------------------------------------------------------------
def find_anchor(label: np.ndarray, rng: np.random.Generator, crop: int = 512, max_tries: int = 16,
                max_share: float = 0.75, min_classes: int = 2, probe_step: int = 8, min_labelled: float = 0.5
                ) -> Tuple[Box, bool, int, List[str]]:
    """An anchor crop of ``crop`` px: ≥ ``min_classes`` classes and largest class share < ``max_share``
    over its labelled pixels (SRMF, MARS section), at least ``min_labelled`` of it labelled (the
    reference likewise rejects crops where ignore is the majority). Bounded — never hangs.

    Every crop position is screened at once on a ``probe_step``-subsampled label (per-class summed-area
    tables); one qualifying position is drawn uniformly (plus a random sub-step offset) and confirmed on
    all pixels, at most ``max_tries`` times. When no position qualifies, the best-scoring one (most
    classes, then the most even mix × labelled share) is returned with ``ok = False``; a label with
    fewer than ``min_classes`` classes gets a random crop at once. ``label`` must be at least ``crop``
    px a side (pad first).

    Returns:
        ``(box, ok, tries, notes)``: box (x0, y0, x1, y1) px; tries = full-resolution checks made.
    """
    H, W = label.shape
    if H < crop or W < crop:
        raise ValueError(f"label {W}x{H} is smaller than the crop {crop}; pad it first")
    notes: List[str] = []
    f = max(1, min(int(probe_step), crop))
    sub = label[::f, ::f]
    present = np.flatnonzero(np.bincount(sub.ravel(), minlength=256)[:IGNORE])
    if len(present) < min_classes:
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=256)[:IGNORE])
    if len(present) < min_classes:
        y0 = int(rng.integers(0, H - crop + 1))
        x0 = int(rng.integers(0, W - crop + 1))
        notes.append(f"the label has {len(present)} class{'es' if len(present) != 1 else ''} (255 ignored): no crop "
                     f"can meet the anchor constraints; a random crop is used")
        return (x0, y0, x0 + crop, y0 + crop), False, 1, notes
    m = max(1, crop // f)                       # window side in probe cells
    ny = (H - crop) // f + 1                    # probe positions whose crop fits
    nx = (W - crop) // f + 1
    h, w = sub.shape
    if h < m + ny - 1 or w < m + nx - 1:        # pad the probe grid (label 255) so every window has m cells
        sub = np.pad(sub, ((0, max(0, m + ny - 1 - h)), (0, max(0, m + nx - 1 - w))), constant_values=IGNORE)
    sat = np.zeros((len(present), sub.shape[0] + 1, sub.shape[1] + 1), np.int32)
    for j, c in enumerate(present):
        sat[j, 1:, 1:] = np.cumsum(np.cumsum(sub == c, axis=0, dtype=np.int32), axis=1, dtype=np.int32)
    win = sat[:, m:m + ny, m:m + nx] - sat[:, :ny, m:m + nx] - sat[:, m:m + ny, :nx] + sat[:, :ny, :nx]
    lab = win.sum(axis=0)
    n = (win > 0).sum(axis=0)
    share = win.max(axis=0) / np.maximum(lab, 1)
    frac = lab / float(m * m)
    ok = (n >= min_classes) & (share < max_share) & (frac >= min_labelled)
    cand = np.flatnonzero(ok)
    tries = 0
    while len(cand) and tries < max(1, int(max_tries)):
        tries += 1
        k = int(cand[int(rng.integers(0, len(cand)))])
        y0 = min(H - crop, (k // nx) * f + int(rng.integers(0, f)))
        x0 = min(W - crop, (k % nx) * f + int(rng.integers(0, f)))
        n2, share2, lab2 = _stats(label[y0:y0 + crop, x0:x0 + crop])
        if n2 >= min_classes and share2 < max_share and lab2 >= min_labelled * crop * crop:
            return (x0, y0, x0 + crop, y0 + crop), True, tries, notes
    # Fallback: the best-scoring position (ties broken at random).
    score = np.minimum(n, min_classes) * 4.0 + (1.0 - share) * np.minimum(frac, 1.0) * (lab > 0)
    best = np.flatnonzero(score == score.max())
    k = int(best[int(rng.integers(0, len(best)))])
    y0, x0 = (k // nx) * f, (k % nx) * f
    notes.append(f"no crop meets the anchor constraints (>= {min_classes} classes, largest share < {max_share}, "
                 f">= {min_labelled:.0%} labelled)" + (f" in {tries} checks" if tries else "") +
                 "; the best-scoring crop is used")
    return (x0, y0, x0 + crop, y0 + crop), False, tries, notes


def context_window(anchor: Box, k: int, shape: Tuple[int, int], crop: int, rng: np.random.Generator) -> Window:
    """A random square window of side ``crop·k`` that contains ``anchor`` (MARS, SRMF).

    The anchor falls on one of the k×k cells of a ``crop``-px grid laid over the window (cell drawn
    uniformly); the window is then shifted, if needed, to lie inside the image (``shape`` = (H, W)),
    which keeps the anchor inside. When the image is smaller than ``crop·k``, the largest square
    that fits (side ``min(H, W)``) is used and ``shrunk`` is set.
    """
    H, W = shape
    ax0, ay0, ax1, ay1 = anchor
    req = crop * int(k)
    side = min(req, H, W)
    ix, iy = (int(v) for v in rng.integers(0, int(k), size=2))
    lo_x, hi_x = max(0, ax1 - side), min(ax0, W - side)
    lo_y, hi_y = max(0, ay1 - side), min(ay0, H - side)
    x0 = int(np.clip(ax0 - ix * crop, lo_x, hi_x))
    y0 = int(np.clip(ay0 - iy * crop, lo_y, hi_y))
    shrunk = side < req
    note = f"image {W}x{H} px is smaller than {req} px: the largest square window ({side} px) is used" if shrunk else ""
    return Window("context", (x0, y0, x0 + side, y0 + side), int(k), side, shrunk, False, note)


def mars_samples(label: np.ndarray, rng: np.random.Generator, crop: int = 512, scales: Sequence[int] = (2, 3, 4),
                 max_tries: int = 16, *, image: Optional[np.ndarray] = None, max_share: float = 0.75,
                 min_classes: int = 2, min_labelled: float = 0.5, pad_value: float = 0.0, antialias: bool = True,
                 source: str = "") -> MarsResult:
    """MARS — multi-scale anchored region sampling (SRMF, arXiv 2504.19839, MARS section).

    Args:
        label: uint8 (H, W) class ids, 255 ignore. image: optional uint8/float32 (3, H, W) 0..255.
        rng: numpy Generator (all randomness comes from it).
        crop: anchor and output side, px. scales: the context factors k (window side crop·k px).
        max_tries: bound on the anchor search (never hangs; see :func:`find_anchor`).

    Returns:
        MarsResult: the anchor and context windows (boxes in the padded image, every context window
        contains the anchor) and the samples: anchor + one per k, each resized to (crop, crop) —
        image float32 (3, crop, crop) bilinear (antialiased), label uint8 (crop, crop) nearest —
        unflipped. A context window identical to an earlier one (images ≤ crop) is marked duplicate
        and makes no sample.
    """
    image, label = _pad(image, np.asarray(label), crop, pad_value)
    H, W = label.shape
    box, ok, tries, notes = find_anchor(label, rng, crop, max_tries, max_share, min_classes, min_labelled=min_labelled)
    n, share, _ = _stats(label[box[1]:box[3], box[0]:box[2]])
    anchor = Window("anchor", box, 1, crop)
    samples = []
    img, lab = _cut(image, label, box, crop, antialias)
    samples.append(Sample(img, lab, "anchor", box, 1.0, source=source))
    windows = []
    seen = {box}
    for k in scales:
        w = context_window(box, int(k), (H, W), crop, rng)
        if w.box in seen:
            w.duplicate = True
            w.note = (w.note + "; " if w.note else "") + "same as an earlier window: no sample"
        else:
            seen.add(w.box)
            img, lab = _cut(image, label, w.box, crop, antialias)
            samples.append(Sample(img, lab, "context", w.box, w.side / crop, source=source, note=w.note))
        windows.append(w)
    return MarsResult(anchor, ok, n, share, tries, windows, samples, (H, W), notes)


# -- SRR-TA: region mining -----------------------------------------------------------------------------
@dataclass
class Region:
    """A class-pure region (SRR-TA): ``image`` index, class ``cls``, ``box`` (x0, y0, x1, y1) px,
    ``area`` (pixels of the class in the box), ``purity`` (share of ``cls`` among the box's labelled
    pixels), ``richness`` (classes present in the box)."""

    image: int
    cls: int
    box: Box
    area: int
    purity: float
    richness: int


@dataclass
class RegionIndex:
    """Mined regions of a training set, ranked per image (SRR-TA, SRMF).

    Attributes:
        regions: per image, its regions in rank order (rarest class first, then richer, then larger).
        class_pixels: int (K,) labelled pixels per class over the training set.
        class_rank: per class its rarity rank (0 = rarest present class).
        key: the cache key (hash of the labels and parameters). params: the mining parameters.
        cached: loaded from the cache.
    """

    regions: List[List[Region]]
    class_pixels: np.ndarray
    class_rank: List[int]
    key: str
    params: dict
    cached: bool = False

    def top(self, index: int, k: int) -> List[Region]:
        """The top-k regions of image ``index``."""
        return self.regions[index][:max(0, int(k))]

    def to_obj(self) -> dict:
        return {"format": REGION_CACHE_FORMAT, "version": REGION_CACHE_VERSION, "key": self.key,
                "params": self.params, "class_pixels": [int(v) for v in self.class_pixels],
                "class_rank": list(self.class_rank),
                "regions": [[[r.cls, *r.box, r.area, round(r.purity, 6), r.richness] for r in rs] for rs in self.regions]}

    @classmethod
    def from_obj(cls, doc: dict) -> "RegionIndex":
        regions = [[Region(i, int(r[0]), (int(r[1]), int(r[2]), int(r[3]), int(r[4])), int(r[5]), float(r[6]), int(r[7]))
                    for r in rs] for i, rs in enumerate(doc["regions"])]
        return cls(regions, np.asarray(doc["class_pixels"], np.int64), list(doc["class_rank"]), doc["key"],
                   doc["params"], cached=True)


def _labels_key(labels: Sequence[np.ndarray], params: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": REGION_CACHE_FORMAT, "version": REGION_CACHE_VERSION, **params},
                        sort_keys=True).encode())
    for lab in labels:
        a = np.ascontiguousarray(lab, dtype=np.uint8)
        h.update(np.asarray(a.shape, np.int64).tobytes())
        h.update(a.data)
    return h.hexdigest()


def _box_stats(label: np.ndarray, box: Box, cls: int) -> Tuple[float, int, int, int]:
    """(purity of cls, richness, labelled pixels, pixels of cls) in a box."""
    x0, y0, x1, y1 = box
    counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)[:IGNORE]
    lab = int(counts.sum())
    if lab == 0:
        return 0.0, 0, 0, 0
    return float(counts[cls]) / lab, int((counts > 0).sum()), lab, int(counts[cls])


def _tight_box(mask: np.ndarray, ox: int, oy: int) -> Optional[Box]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (ox + int(cols[0]), oy + int(rows[0]), ox + int(cols[-1]) + 1, oy + int(rows[-1]) + 1)


def _component_regions(label: np.ndarray, comp: np.ndarray, comp_id: int, box: Box, cls: int, purity: float,
                       min_area: int, depth: int, out: List[Tuple[Box, float, int, int]]) -> None:
    """Pure sub-boxes of one component: its box if pure, else split in two along the longer side."""
    p, rich, _, area = _box_stats(label, box, cls)
    if area < min_area:
        return
    if p >= purity:
        out.append((box, p, rich, area))
        return
    if depth <= 0:
        return
    x0, y0, x1, y1 = box
    if x1 - x0 >= y1 - y0:
        m = (x0 + x1) // 2
        halves = [(x0, y0, m, y1), (m, y0, x1, y1)]
    else:
        m = (y0 + y1) // 2
        halves = [(x0, y0, x1, m), (x0, m, x1, y1)]
    for hx0, hy0, hx1, hy1 in halves:
        if hx1 <= hx0 or hy1 <= hy0:
            continue
        sub = comp[hy0:hy1, hx0:hx1] == comp_id
        tb = _tight_box(sub, hx0, hy0)
        if tb is not None:
            _component_regions(label, comp, comp_id, tb, cls, purity, min_area, depth - 1, out)


def _mine_components(label: np.ndarray, class_order: Sequence[int], purity: float, min_area: int, max_depth: int,
                     connectivity: int, enough: int) -> List[Tuple[int, Box, float, int, int]]:
    """Regions of the classes in ``class_order`` (rarest first); stops after the class that brings the
    count to ``enough`` (the ranking puts every region of a rarer class first, so later ones would be cut)."""
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy is a dependency of the engine
        raise InputError("SRR-TA region mining needs scipy (scipy.ndimage); install it with pip install scipy") from exc

    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    found: List[Tuple[int, Box, float, int, int]] = []
    bc = np.bincount(label.ravel(), minlength=256)
    for c in class_order:
        if bc[c] < min_area:
            continue
        if len(found) >= enough:
            break
        comp, n = ndimage.label(label == c, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        slices = ndimage.find_objects(comp)
        for j in np.flatnonzero(sizes[1:] >= min_area) + 1:
            sl = slices[j - 1]
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            out: List[Tuple[Box, float, int, int]] = []
            _component_regions(label, comp, int(j), box, int(c), purity, min_area, max_depth, out)
            found.extend((int(c), b, p, r, a) for b, p, r, a in out)
    return found


def _mine_proposals(label: np.ndarray, boxes: Sequence[Box], num_classes: int, purity: float, min_area: int
                    ) -> List[Tuple[int, Box, float, int, int]]:
    H, W = label.shape
    found = []
    for b in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)[:IGNORE]
        lab = int(counts.sum())
        if lab == 0:
            continue
        c = int(np.argmax(counts[:num_classes]))
        p = float(counts[c]) / lab
        if p >= purity and counts[c] >= min_area:
            found.append((c, (x0, y0, x1, y1), p, int((counts > 0).sum()), int(counts[c])))
    return found


def mine_regions(labels: Sequence[np.ndarray], num_classes: int, *, purity: float = 0.75, min_area: int = 100,
                 max_per_image: int = 32, max_depth: int = 4, connectivity: int = 8,
                 class_pixels: Optional[np.ndarray] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 miner: Optional[RegionMiner] = None, images: Optional[Sequence[np.ndarray]] = None) -> RegionIndex:
    """SRR-TA offline step: class-pure regions of every training label, ranked (SRMF, SRR-TA section).

    Default miner (dependency-free apart from scipy.ndimage): connected components of each class
    (8-connected by default) → their bounding boxes; a box is kept when its component's class is the
    dominant class with ≥ ``purity`` of the box's labelled pixels, otherwise it is split in two along
    its longer side (tightened to the component) up to ``max_depth`` times. Regions with fewer than
    ``min_area`` pixels of their class are dropped. With ``miner`` (e.g. SAM), its boxes on each
    ``images[i]`` replace the components and the label decides their class and purity.

    Ranking, per image: rarest class first (ascending pixel count over the whole training set,
    ``class_pixels`` or counted from ``labels``), ties broken by richness (number of classes in the
    box, richer first), then by area (larger first); the top ``max_per_image`` are kept.

    Args:
        labels: uint8 (H, W) arrays (or objects with ``.label``), class ids < num_classes, 255 ignore.
        cache_dir: when given, the result is stored there as JSON keyed by a SHA-256 of the labels and
            the parameters, and re-used when the key matches.

    Returns:
        RegionIndex (regions per image, in rank order).

    Raises:
        InputError: a label with class ids ≥ num_classes (other than 255); ``miner`` without ``images``.
    """
    labs = [np.asarray(getattr(l, "label", l)) for l in labels]
    params = {"num_classes": int(num_classes), "purity": float(purity), "min_area": int(min_area),
              "max_per_image": int(max_per_image), "max_depth": int(max_depth), "connectivity": int(connectivity),
              "miner": None if miner is None else str(getattr(miner, "cache_id", getattr(miner, "__qualname__", "miner")))}
    if miner is not None and images is None:
        raise InputError("mine_regions: a region miner needs the images")
    key = _labels_key(labs, {**params, "class_pixels": None if class_pixels is None else [int(v) for v in class_pixels]})
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"srr-regions-{key[:20]}.json"
        if cache_file.is_file():
            try:
                doc = json.loads(cache_file.read_text())
                if doc.get("format") == REGION_CACHE_FORMAT and doc.get("key") == key:
                    return RegionIndex.from_obj(doc)
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                pass  # a damaged cache is rebuilt
    if class_pixels is None:
        counts = np.zeros(num_classes, np.int64)
        for i, lab in enumerate(labs):
            bc = np.bincount(lab.ravel(), minlength=256)
            if bc[num_classes:IGNORE].any():
                bad = np.flatnonzero(bc[num_classes:IGNORE]) + num_classes
                raise InputError(f"mine_regions: label {i} has class ids {bad.tolist()} >= num_classes ({num_classes})")
            counts += bc[:num_classes]
    else:
        counts = np.asarray(class_pixels, np.int64)
    order = sorted(range(num_classes), key=lambda c: (counts[c] == 0, counts[c], c))
    rank = [0] * num_classes
    for r, c in enumerate(order):
        rank[c] = r
    per_image: List[List[Region]] = []
    for i, lab in enumerate(labs):
        if miner is not None:
            found = _mine_proposals(lab, miner(images[i], lab), num_classes, purity, min_area)
        else:
            found = _mine_components(lab, order, purity, min_area, max_depth, connectivity, max_per_image)
        regs = [Region(i, c, tuple(int(v) for v in b), a, p, r) for c, b, p, r, a in found]
        regs.sort(key=lambda g: (rank[g.cls], -g.richness, -g.area, g.box[1], g.box[0]))
        per_image.append(regs[:max_per_image])
    index = RegionIndex(per_image, counts, rank, key, params)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=str(cache_file.parent), prefix=".srr-regions.", suffix=".partial")
            with os.fdopen(fd, "w") as f:
                json.dump(index.to_obj(), f)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # the cache is an optimisation only
    return index


# -- SRR-TA: online crops ------------------------------------------------------------------------------
def centred_box(region_box: Box, shape: Tuple[int, int], crop: int) -> Box:
    """The ``crop``-px box centred on a region's box, shifted to stay inside an image of ``shape``
    (H, W) ≥ crop."""
    H, W = shape
    x0, y0, x1, y1 = region_box
    cx = int(np.floor((x0 + x1) / 2.0 - crop / 2.0 + 0.5))
    cy = int(np.floor((y0 + y1) / 2.0 - crop / 2.0 + 0.5))
    cx = int(np.clip(cx, 0, W - crop))
    cy = int(np.clip(cy, 0, H - crop))
    return (cx, cy, cx + crop, cy + crop)


def srr_crops(image: Optional[np.ndarray], label: np.ndarray, regions: Sequence[Region], k: int,
              rng: np.random.Generator, crop: int = 512, *, flips: bool = True, pad_value: float = 0.0,
              source: str = "") -> List[Sample]:
    """SRR-TA online step: native-resolution crops around an image's top-k regions (SRMF, SRR-TA).

    Each crop is ``crop`` px, CENTRED on the region's box (shifted only at the image's borders) and,
    with ``flips``, randomly flipped horizontally and vertically, jointly for image and label.

    Args:
        image: uint8/float32 (3, H, W) 0..255 or None; label: uint8 (H, W).
        regions: the image's ranked regions (``RegionIndex.regions[i]``); the first ``k`` are used.

    Returns:
        up to k Samples: image float32 (3, crop, crop), label uint8 (crop, crop), kind ``"srr"``.
    """
    image, label = _pad(image, np.asarray(label), crop, pad_value)
    H, W = label.shape
    out = []
    for reg in list(regions)[:max(0, int(k))]:
        box = centred_box(reg.box, (H, W), crop)
        x0, y0, x1, y1 = box
        lab = np.ascontiguousarray(label[y0:y1, x0:x1])
        img = None if image is None else np.ascontiguousarray(image[:, y0:y1, x0:x1], dtype=np.float32)
        s = Sample(img, lab, "srr", box, 1.0, source=source,
                   note=f"class {reg.cls} region {reg.box}")
        out.append(random_flip(s, rng) if flips else s)
    return out


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


# -- the sampler ---------------------------------------------------------------------------------------
class TrainingSampler:
    """SRMF's training sample stream: for each drawn image, MARS samples + SRR-TA crops, randomly flipped.

    Per draw (SRMF, MARS and SRR-TA sections): with ``mars``, the anchor and one context window per
    k in ``scales`` (1 + len(scales) samples, fewer when a small image makes windows coincide);
    without it, ``random_crops`` plain random crops; with ``srr``, the image's top ``srr_k`` regions
    as centred native-resolution crops. Every sample is flipped horizontally / vertically with
    probability 0.5 each, jointly for image and label.

    Determinism: the randomness of a draw comes only from ``(seed, epoch, image index)``, so results
    do not depend on the order of draws, the number of data-loader workers or the DDP rank.

    Args:
        images: objects with ``.image`` (3, H, W) uint8/float32 0..255, ``.label`` uint8 (H, W) and
            ``.name`` (e.g. :class:`core.data.TrainingImage`). Images without any labelled pixel are
            left out (listed in :attr:`notes`).
        num_classes: K. regions: a :class:`RegionIndex` of these images (mined when None and ``srr``;
            cached in ``cache_dir`` when given; ``miner``: optional SAM-like :data:`RegionMiner`).

    Output: :class:`Sample` with image float32 (3, crop, crop) 0..255 (normalise with the model's
    mean/std) and label uint8 (crop, crop).
    """

    def __init__(self, images: Sequence, num_classes: int, *, crop: int = 512, seed: int = 0, mars: bool = True,
                 scales: Sequence[int] = (2, 3, 4), srr: bool = True, srr_k: int = 4,
                 regions: Optional[RegionIndex] = None, cache_dir=None, miner: Optional[RegionMiner] = None,
                 flips: bool = True, max_tries: int = 16, max_share: float = 0.75, pad_value: float = 0.0,
                 random_crops: int = 1, antialias: bool = True):
        if crop < 1:
            raise InputError(f"crop must be a positive number of pixels, got {crop}")
        if any(int(k) < 1 for k in scales):
            raise InputError(f"MARS scales must be >= 1, got {list(scales)}")
        self.notes: List[str] = []
        keep = []
        for i, im in enumerate(images):
            if not (np.asarray(im.label) != IGNORE).any():
                self.notes.append(f"{getattr(im, 'name', i)}: no labelled pixel; left out of training")
            else:
                keep.append(im)
        if not keep:
            raise InputError("no training image has a labelled pixel")
        self.images = keep
        self.num_classes = int(num_classes)
        self.crop, self.seed = int(crop), int(seed)
        self.mars, self.scales = bool(mars), tuple(int(k) for k in scales)
        self.srr, self.srr_k = bool(srr), int(srr_k)
        self.flips, self.max_tries, self.max_share = bool(flips), int(max_tries), float(max_share)
        self.pad_value, self.random_crops, self.antialias = float(pad_value), int(random_crops), bool(antialias)
        self.regions: Optional[RegionIndex] = None
        if self.srr:
            if regions is None:
                regions = mine_regions([im.label for im in keep], self.num_classes, cache_dir=cache_dir, miner=miner,
                                       images=[im.image for im in keep] if miner is not None else None)
            elif len(regions.regions) != len(keep):
                raise InputError(f"the region index covers {len(regions.regions)} images, the sampler has {len(keep)}")
            self.regions = regions

    def __len__(self) -> int:
        return len(self.images)

    def rng_for(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def draw(self, index: int, epoch: int = 0) -> List[Sample]:
        """The samples of one draw of image ``index`` in ``epoch`` (deterministic)."""
        im = self.images[index]
        rng = self.rng_for(index, epoch)
        name = str(getattr(im, "name", index))
        out: List[Sample] = []
        if self.mars:
            res = mars_samples(im.label, rng, self.crop, self.scales, self.max_tries, image=im.image,
                               max_share=self.max_share, pad_value=self.pad_value, antialias=self.antialias,
                               source=name)
            out.extend(res.samples)
        else:
            for _ in range(self.random_crops):
                out.append(random_crop(im.image, im.label, rng, self.crop, pad_value=self.pad_value, source=name))
        if self.flips:
            for s in out:
                random_flip(s, rng)
        if self.srr and self.srr_k > 0:
            out.extend(srr_crops(im.image, im.label, self.regions.top(index, self.srr_k), self.srr_k, rng, self.crop,
                                 flips=self.flips, pad_value=self.pad_value, source=name))
        return out

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The image order of ``epoch`` (a seeded permutation)."""
        return np.random.default_rng([self.seed, int(epoch), 2 ** 31 - 1]).permutation(len(self.images))

    def iter_epoch(self, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
        """The samples of one epoch, in order; with DDP, rank ``rank`` of ``world_size`` gets every
        world_size-th image of the permutation."""
        for idx in self.epoch_order(epoch)[rank::world_size]:
            yield from self.draw(int(idx), epoch)

    def __iter__(self) -> Iterator[Sample]:
        epoch = 0
        while True:
            yield from self.iter_epoch(epoch)
            epoch += 1
