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

from typing import Iterator, List, Optional, Sequence
import numpy as np
from core.errors import InputError
from core.finetune.augment import AUGMENTS, augment_sample
from core.finetune.crops import IGNORE, Sample, random_crop, random_flip
from core.finetune.mars import mars_samples
from core.finetune.srrta import RegionIndex, RegionMiner, mine_regions, srr_crops


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
            ``.name`` (e.g. :class:`core.finetune.sources.TrainingImage`). Images without any labelled pixel are
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
                 random_crops: int = 1, antialias: bool = True, augment: str = "flip"):
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
        if augment not in AUGMENTS:
            raise InputError(f"--augment must be one of {', '.join(AUGMENTS)} (got {augment!r})")
        self.augment = augment
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
        if self.augment != "flip":
            for s in out:
                augment_sample(s, rng, self.augment)
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
