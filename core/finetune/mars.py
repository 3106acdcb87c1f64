"""MARS: multi-scale anchored region sampling (DESIGN.md, method 1): an anchor crop with >= 2 classes and
no class over 75 %, plus one 512*k context window per k on the 512 grid, each resized and trained alone."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple
import numpy as np
from core.finetune.crops import Box, IGNORE, Sample, _cut, _pad, _stats


@dataclass
class ContextWindow:
    """A MARS window (the anchor or a context window; not :class:`core.windows.Window`, a sliding-window
    position): box (x0, y0, x1, y1) px in the padded image; ``k`` the requested scale;
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

    anchor: ContextWindow
    anchor_ok: bool
    anchor_classes: int
    anchor_max_share: float
    tries: int
    windows: List[ContextWindow]
    samples: List[Sample]
    padded_shape: Tuple[int, int]
    notes: List[str] = field(default_factory=list)

    @property
    def boxes(self) -> List[Box]:
        return [self.anchor.box] + [w.box for w in self.windows]


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
    n, share, frac, lab, nx = _probe_windows(sub, present, H, W, crop, f)
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


def _probe_windows(sub: np.ndarray, present: np.ndarray, H: int, W: int, crop: int, f: int):
    """Statistics of every crop position on the ``f``-subsampled label ``sub`` (per-class summed-area
    tables): ``(classes present, largest share, labelled fraction, labelled probe cells, nx)``, each
    (ny, nx) over the positions ``(row * f, col * f)`` whose crop fits in (H, W)."""
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
    return n, share, frac, lab, nx


def context_window(anchor: Box, k: int, shape: Tuple[int, int], crop: int, rng: np.random.Generator) -> ContextWindow:
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
    return ContextWindow("context", (x0, y0, x0 + side, y0 + side), int(k), side, shrunk, False, note)


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
    anchor = ContextWindow("anchor", box, 1, crop)
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
