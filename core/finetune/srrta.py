"""SRR-TA: semantic reranking and resampling (DESIGN.md, method 2): class-pure regions mined offline from the
label rasters (cached), ranked rarest class first; online, native-resolution crops around an image's top-k."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union
import numpy as np
from core.errors import InputError, WriteError
from core.finetune.crops import Box, IGNORE, Sample, _pad, random_flip
from core.files import atomic_output
REGION_CACHE_FORMAT = "srmf-srr-regions"
REGION_CACHE_VERSION = 1

RegionMiner = Callable[[np.ndarray, np.ndarray], Sequence[Box]]
"""An optional region proposer (e.g. SAM-HQ, as in the paper): ``miner(image, label) -> boxes``.

``image``: uint8/float32 (3, H, W) 0..255; ``label``: uint8 (H, W); returns candidate boxes
``(x0, y0, x1, y1)`` in pixels. The label then decides each box's class, purity and richness exactly as
for the default connected-component miner. Give the callable a ``cache_id`` attribute (a string naming
the model and its settings) so that its regions are cached apart from the default miner's.
"""


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
        cached = _cached_index(cache_file, key)
        if cached is not None:
            return cached
    counts = _class_pixels(labs, num_classes) if class_pixels is None else np.asarray(class_pixels, np.int64)
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
        _store_index(cache_file, index)
    return index


def _cached_index(cache_file: Path, key: str) -> Optional[RegionIndex]:
    """The cached :class:`RegionIndex` of ``key``, or None (no cache, another key, a damaged file)."""
    if cache_file.is_file():
        try:
            doc = json.loads(cache_file.read_text())
            if doc.get("format") == REGION_CACHE_FORMAT and doc.get("key") == key:
                return RegionIndex.from_obj(doc)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass  # a damaged cache is rebuilt
    return None


def _class_pixels(labs: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Pixels per class over all labels, int64 (num_classes,). Raises InputError: a class id ≥ num_classes."""
    counts = np.zeros(num_classes, np.int64)
    for i, lab in enumerate(labs):
        bc = np.bincount(lab.ravel(), minlength=256)
        if bc[num_classes:IGNORE].any():
            bad = np.flatnonzero(bc[num_classes:IGNORE]) + num_classes
            raise InputError(f"mine_regions: label {i} has class ids {bad.tolist()} >= num_classes ({num_classes})")
        counts += bc[:num_classes]
    return counts


def _store_index(cache_file: Path, index: RegionIndex) -> None:
    """Write the index's cache file atomically; an unwritable cache is skipped (it is an optimisation)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache_file) as tmp, open(tmp, "w") as f:
            json.dump(index.to_obj(), f)
    except (OSError, InputError, WriteError):  # atomic_output names I/O failures as InputError / WriteError
        pass  # the cache is an optimisation only


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
